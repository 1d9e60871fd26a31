"""The shared loop: exact resume, dual checkpoints, skipped batches and clear failures."""

import json
import os
import signal

import pytest
import torch

from core.train.loop import Interrupted, Task, Trainer, TrainerConfig, TrainingFailed
from core.train.run import build_task, run_experiment
from core.train.signals import request_stop, stop_on_signals
from launchers.config import compose_experiment
from tests.helpers import StopAfter, assert_same_final_weights

VOLATILE = {"epoch_time_s"}


def _stable(rows):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def _rows(run_dir):
    return _stable(json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())


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
    assert_same_final_weights(tmp_path / "full", tmp_path / "cut")


class TinyTask(Task):
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

    def evaluate_checkpoint(self, run_dir, checkpoint):
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


# ---------------------------------------------------------------- stop requests (preemption, time limits)
STOP_CFG = ["debug=fast", "trainer.epochs=2", "logger.enabled=false"]


def interrupt_at(task, epoch: int, batch: int) -> None:
    """Make `task` signal its own process (SIGUSR2, as SLURM before a time limit) while it computes the
    losses of its `batch`-th training batch (1-based, counted in this process) of `epoch`: the loop
    must finish that batch, then stop."""
    real, seen = task.losses, {}

    def losses(b, ep, generator):
        out = real(b, ep, generator)
        if task.model.training:
            seen[ep] = seen.get(ep, 0) + 1
            if (ep, seen[ep]) == (epoch, batch):
                os.kill(os.getpid(), signal.SIGUSR2)
        return out

    task.losses = losses


def test_mid_epoch_stops_resume_to_the_uninterrupted_run_bit_for_bit(tmp_path):
    cfg = compose_experiment("progress_learnable", STOP_CFG)
    full = run_experiment(cfg, tmp_path / "full")
    # 6 batches an epoch: the first batch, a second stop inside the resumed epoch, the last batch
    done = (0, 0)
    for epoch, batch in [(0, 1), (0, 4), (1, 6)]:
        task = build_task(cfg, tmp_path / "cut")
        interrupt_at(task, epoch, batch - (done[1] if done[0] == epoch else 0))
        with stop_on_signals(), pytest.raises(Interrupted) as stopped:
            run_experiment(cfg, tmp_path / "cut", task=task)
        assert (stopped.value.reason, stopped.value.epoch, stopped.value.batch) == ("SIGUSR2", epoch, batch)
        saved = torch.load(tmp_path / "cut/checkpoints/last.pt", weights_only=True)
        assert saved["epoch"] == epoch - 1 and saved["partial"]["batches"] == batch
        assert len(saved["partial"]["rows"]) == batch  # the loss rows of the done batches
        assert epoch == 0 or len(_rows(tmp_path / "cut")) == epoch  # the completed epochs only
        done = (epoch, batch)

    resumed = run_experiment(cfg, tmp_path / "cut")
    assert resumed["resumed_from_epoch"] == 1
    assert _rows(tmp_path / "cut") == _rows(tmp_path / "full")
    assert resumed["eval"] == full["eval"]
    a = torch.load(tmp_path / "full/checkpoints/last.pt", weights_only=True)
    b = torch.load(tmp_path / "cut/checkpoints/last.pt", weights_only=True)
    assert "partial" not in b
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(a["generator"], b["generator"]) and torch.equal(a["torch_rng"], b["torch_rng"])


class StopAtEpochEnd:
    """A reporter requesting a stop while epoch `n` is reported (as if the signal came during validation)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def report(self, epoch, metrics):
        if epoch == self.n:
            request_stop("test")


def test_stop_between_epochs_resumes_at_the_next_epoch_and_the_last_epoch_completes(tmp_path):
    cfg = TrainerConfig(epochs=3, lr=0.05, best={})
    with stop_on_signals(), pytest.raises(Interrupted, match="stopped by test before epoch 1") as stopped:
        Trainer(TinyTask(bad=set()), cfg, tmp_path / "cut", StopAtEpochEnd(0)).fit()
    assert (stopped.value.epoch, stopped.value.batch) == (1, 0)
    assert "partial" not in torch.load(tmp_path / "cut/checkpoints/last.pt", weights_only=True)
    resumed = Trainer(TinyTask(bad=set()), cfg, tmp_path / "cut")
    assert resumed.resume() and (resumed.start_epoch, resumed.start_batch) == (1, 0)
    full = Trainer(TinyTask(bad=set()), cfg, tmp_path / "full").fit()
    assert _stable(resumed.fit().history) == _stable(full.history)
    with stop_on_signals():  # nothing left to train after the last epoch: the run completes
        result = Trainer(TinyTask(bad=set()), cfg, tmp_path / "last", StopAtEpochEnd(2)).fit()
    assert result.status == "completed" and len(result.history) == 3


class LazyDrawTask(TinyTask):
    """Breaks the Task contract: draws from the generator between batches."""

    def train_batches(self, epoch, generator):
        for i in range(self.n):
            torch.rand(1, generator=generator)
            yield i


def test_resume_inside_an_epoch_refuses_batches_it_cannot_rebuild(tmp_path):
    cfg = TrainerConfig(epochs=1, lr=0.05, best={})
    task = LazyDrawTask(bad=set())
    real = task.losses

    def losses(i, epoch, generator):
        if i == 2:
            request_stop("test")
        return real(i, epoch, generator)

    task.losses = losses
    with stop_on_signals(), pytest.raises(Interrupted):
        Trainer(task, cfg, tmp_path).fit()
    trainer = Trainer(LazyDrawTask(bad=set()), cfg, tmp_path)
    assert trainer.resume() and (trainer.start_epoch, trainer.start_batch) == (0, 3)
    with pytest.raises(TrainingFailed, match="cannot resume epoch 0 after batch 3"):
        trainer.fit()
