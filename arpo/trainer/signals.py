"""SIGTERM and Ctrl-C during training: finish the current step, checkpoint it, stop — the way schedulers expect.

A scheduler about to pre-empt a job sends SIGTERM and waits a grace period; a person presses Ctrl-C. The first
such signal only sets a flag: the step in flight finishes (a step half-applied to the weights would be neither
the old nor the new model), the trainer writes a checkpoint of it (`train.save_on_signal`) and returns, and
`arpo train` exits with the conventional status 128 + signal (143 for SIGTERM, 130 for Ctrl-C). A second Ctrl-C
raises SecondSignal (a KeyboardInterrupt) at once; checkpoints are written to a temporary directory and renamed,
and metrics lines are single writes, so even that leaves no torn checkpoint behind. A repeated SIGTERM is ignored:
schedulers such as Slurm send it to every process of a job, so a torchrun rank gets it from the scheduler and
again from torchrun.

Under torchrun every rank asks `agreed()` after each step, which all-reduces the flag: if any rank was
signalled, all of them stop after the same step and write the same checkpoint together.
"""
from __future__ import annotations

import signal
import threading
from typing import Callable

from arpo.trainer import distributed as D

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class SecondSignal(KeyboardInterrupt):
    """A second SIGTERM / SIGINT: stop at once. `signum`: which one (for the exit status)."""

    def __init__(self, signum: int):
        super().__init__(f"second {signal.Signals(signum).name}: stopping now")
        self.signum = signum


class StopOnSignal:
    """Context manager: while inside, SIGTERM / SIGINT request a stop (`signum`) instead of killing the process.
    Outside the main thread (where Python cannot install handlers) it does nothing."""

    def __init__(self, echo: Callable[[str], None] = print):
        self.echo = echo
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise SecondSignal(signum)
            return  # already stopping after this step
        self.signum = signum
        self.echo(f"{signal.Signals(signum).name}: finishing the current step, then checkpoint and stop "
                  "(Ctrl-C to stop at once)")

    def agreed(self) -> int | None:
        """The signal that stops the run, the same on every rank (collective under torchrun), or None."""
        return int(D.max_across_ranks(float(self.signum or 0))) or None


def exit_status(signum: int | None) -> int:
    """The shell's convention for a process ended by signal `signum`: 128 + its number (0 when none)."""
    return 128 + int(signum) if signum else 0
