"""Stop cleanly when a cluster asks: SIGTERM or SIGUSR1 -> finish the iteration, save a state, exit 75.

SLURM sends SIGTERM to every process of a job some seconds before it kills it (and any signal chosen
with ``--signal=USR1@120`` that many seconds before the time limit). While training, these signals
only set a flag; the loop reads it at the end of each iteration, logs the iterations since the last
log line, writes a training state for that iteration and stops with ``Preempted``; ``train.py`` then
exits with ``EXIT_PREEMPTED``. Under torchrun
the ranks agree through one all-reduce of the flag per iteration, so they all stop after the same
iteration even when the signal reaches them at different moments; rank 0 writes the state, and every
rank waits for it (``wait_for_every_rank``) before any of them exits.
"""
from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as tdist

EXIT_PREEMPTED = 75  # EX_TEMPFAIL (sysexits.h): a temporary failure; run the same command with --resume
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """The run stopped on a signal after ``nimg`` images seen; its state is saved."""

    def __init__(self, message: str, nimg: int):
        super().__init__(message)
        self.nimg = nimg


class StopSignal:
    """While active (``with StopSignal() as stop``), SIGTERM/SIGUSR1 set ``stop.received`` instead of
    killing the process. Handlers can only be installed from the main thread; elsewhere (a library
    caller's worker thread) the signals keep their previous behaviour."""

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signal.Signals(signum).name

    def agreed(self, dist) -> bool:
        """True on every rank once any rank received a signal (one all-reduce of one number)."""
        flag = float(self.received is not None)
        if dist.enabled:
            t = torch.tensor([flag], device=dist.device)
            tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
            flag = float(t)
        return flag > 0


def wait_for_every_rank() -> None:
    """Block until every rank has arrived here (nothing to wait for in one process).

    ``train.py`` calls this on ``Preempted`` just before exiting with ``EXIT_PREEMPTED``. torchrun
    SIGTERMs every other worker the moment one exits non-zero (and SIGKILLs them 30 s later), so a rank
    that left first would cut rank 0 short while it still writes the state, closes its logs or prints
    the resume hint. Rank 0 arrives here only after all of that."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()
