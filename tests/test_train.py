"""The shared loop: exact resume, dual checkpoints, skipped batches and clear failures."""

import json

import pytest
import torch

from core.train.loop import Trainer, TrainerConfig, TrainingFailed
from core.train.run import run_experiment
from launchers.config import compose_experiment

VOLATILE = {"epoch_time_s"}


def _rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


class StopAfter:
    """A reporter that kills the run (like a preemption) right after epoch `n` was checkpointed."""

    def __init__(self, n: int) -> None:
        self.n = n

    def report(self, epoch, metrics):
        if epoch == self.n:
            raise KeyboardInterrupt


@pytest.mark.parametrize("experiment", ["progress_learnable_ab", "progress_cum_l2"])
def test_resume_from_last_reproduces_the_uninterrupted_run_exactly(experiment, tmp_path):
    cfg = compose_experiment(experiment, ["debug=fast", "trainer.epochs=3", "logger.enabled=false"])
    full = run_experiment(cfg, tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "cut", reporter=StopAfter(0))
    assert json.loads((tmp_path / "cut" / "summary.json").read_text())["status"] == "failed"
    assert len(_rows(tmp_path / "cut")) == 1
    resumed = run_experiment(cfg, tmp_path / "cut")
    assert resumed["resumed_from_epoch"] == 1
    assert _rows(tmp_path / "cut") == _rows(tmp_path / "full")
    assert resumed["eval"] == full["eval"]
    a = torch.load(tmp_path / "full/checkpoints/last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut/checkpoints/last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


class TinyTask:
    """A real (small) task: linear regression whose loss is NaN on the batches listed in `bad`."""

    def __init__(self, bad: set[int], n_batches: int = 4) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Linear(3, 1)
        self.bad, self.n = bad, n_batches
        self.x = torch.randn(n_batches, 8, 3)
        self.y = self.x.sum(-1, keepdim=True)

    def train_batches(self, epoch, generator):
        return range(self.n)

    def val_batches(self):
        return range(self.n)

    def losses(self, i, epoch, generator):
        loss = ((self.model(self.x[i]) - self.y[i]) ** 2).mean()
        return {"total_loss": loss * float("nan") if i in self.bad else loss}

    def evaluate(self, split, epoch):
        return {}


def test_non_finite_batches_are_skipped_and_counted(tmp_path):
    trainer = Trainer(TinyTask(bad={1}), TrainerConfig(epochs=2, lr=0.05, best={}), tmp_path)
    result = trainer.fit()
    assert result.skipped_batches == 2
    assert [r["train/skipped_batches"] for r in result.history] == [1.0, 1.0]
    assert result.history[-1]["train/total_loss"] < result.history[0]["train/total_loss"]


def test_too_many_skipped_batches_fail_with_a_reason(tmp_path):
    trainer = Trainer(TinyTask(bad={0, 1, 2}), TrainerConfig(epochs=2, best={}), tmp_path)
    with pytest.raises(TrainingFailed, match=r"3/4 batches had a non-finite"):
        trainer.fit()


def test_dual_checkpoints_track_their_own_metric(tmp_path):
    cfg = compose_experiment("progress_learnable", ["debug=fast", "trainer.epochs=3", "logger.enabled=false"])
    summary = run_experiment(cfg, tmp_path / "run")
    rows = _rows(tmp_path / "run")
    for name, key in (("combined", "val/total_loss"), ("alignment", "val/alignment_loss")):
        best = min(range(len(rows)), key=lambda i: rows[i][key])
        assert summary["best"][name] == {"value": rows[best][key], "epoch": best}
        saved = torch.load(tmp_path / f"run/checkpoints/best_model_{name}.pt", weights_only=True)
        assert saved["epoch"] == best
