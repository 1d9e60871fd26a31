"""Shared fixtures: every test writes under its own tmp_path, wandb stays offline and quiet."""

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MPLBACKEND", "Agg")
# tiny tensors on a 2-core machine: one intra-op thread is several times faster than two
torch.set_num_threads(1)


@pytest.fixture
def results_root(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    monkeypatch.setenv("ABLATE_ROOT", str(root))
    return root
