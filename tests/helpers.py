"""Small pieces several test modules share."""


class StopAfter:
    """A reporter that kills the run (like a preemption) right after epoch `n` was checkpointed."""

    def __init__(self, n: int) -> None:
        self.n = n

    def report(self, epoch, metrics):
        if epoch == self.n:
            raise KeyboardInterrupt
