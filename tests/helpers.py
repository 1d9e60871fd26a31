"""Small pieces several test modules share."""

from pathlib import Path

import torch


class StopAfter:
    """A reporter that kills the run (like a preemption) right after epoch `n` was checkpointed."""

    def __init__(self, n: int) -> None:
        self.n = n

    def report(self, epoch, metrics):
        if epoch == self.n:
            raise KeyboardInterrupt


def assert_same_final_weights(full: Path, cut: Path) -> None:
    """The resumed run (`cut`) ended with exactly the weights of the uninterrupted one (`full`)."""
    a = torch.load(full / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(cut / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
