"""Stop requests: a signal asks the training loop to stop cleanly at the next batch boundary.

Clusters ask a job to stop with a signal and kill it a little later: SLURM sends submitit's USR2
`signal_delay_s` before a time limit (or at preemption), and SIGTERM on a cancel, a requeue, a time
limit or preemption (SIGKILL follows after the cluster's KillWait). A handler runs between any two
bytecodes of the main thread, in the middle of an optimiser step or a checkpoint write, so the one
installed here does nothing but record the request; `core.train.loop.Trainer` reads it after each
batch, saves a mid-epoch checkpoint and raises `Interrupted`, and whoever started the run decides
what happens next (a sweep worker gives the trial back and requeues its job; `ablate run` exits with
a resume hint).

The flag lives in core because the loop reads it and core imports no launcher; the handler is
installed by the process that owns the run (the CLI, a sweep worker) with `stop_on_signals`.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import FrameType

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)

_requested: str | None = None  # the first reason given since the last clear_stop()


def request_stop(reason: str) -> None:
    """Ask the running loop to stop at the next batch boundary (safe to call from a signal handler)."""
    global _requested
    if _requested is None:
        _requested = reason


def stop_requested() -> str | None:
    """The reason of the pending stop request (e.g. "SIGUSR2"), or None."""
    return _requested


def clear_stop() -> None:
    global _requested
    _requested = None


def _on_signal(signum: int, frame: FrameType | None) -> None:
    request_stop(signal.Signals(signum).name)


def ctrl_c_interrupts() -> None:
    """Make Ctrl-C (SIGINT) raise KeyboardInterrupt in this process even where it inherited SIGINT
    ignored, as anything a non-interactive shell starts with `&` does (CI runners, `ablate sweep ... &`,
    submitit's local cancel, which sends SIGINT); without this such a process shrugs Ctrl-C off.
    Called by the processes that own a run or a server (the CLI, a sweep worker), from the main thread."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


@contextmanager
def stop_on_signals(signals: Sequence[signal.Signals] = STOP_SIGNALS) -> Iterator[None]:
    """Within the block, `signals` request a stop instead of their previous action (terminate, or
    submitit's handler that would requeue at once, mid-batch); the previous handlers come back after.

    Any earlier request is cleared on entry and exit. Python runs handlers in the main thread only,
    so from another thread this installs nothing (a signal cannot reach a loop running there)."""
    clear_stop()
    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, _on_signal) for sig in signals} if main else {}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        clear_stop()
