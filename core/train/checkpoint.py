"""The checkpoint format shared by every family, written atomically (see core.atomic)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from core.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "load_checkpoint",
    "save_checkpoint",
]


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with `weights_only=True`: a checkpoint is data, never code."""
    return torch.load(path, map_location=map_location, weights_only=True)
