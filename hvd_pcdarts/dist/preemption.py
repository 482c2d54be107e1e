"""Preemption: SIGTERM or SIGUSR1 ends a run after the step in progress, with a checkpoint that `--resume auto`
continues from exactly.

Slurm sends SIGTERM at a time limit or preemption, or a chosen signal some time before it (`sbatch
--signal=B:USR1@300`, forwarded to the ranks by the job script). A signal that reaches one rank stops them all:
after every step the ranks agree on whether any of them received one (one small allreduce). Rank 0 then writes
the checkpoint and every rank exits with status 75 (cli.EXIT_STATUS; EX_TEMPFAIL, "try again"), which the job
scripts in `scripts/slurm/` take as "requeue this job".
"""

from __future__ import annotations

import argparse
import signal
import threading

from . import horovod as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def add_preemption_args(parser: argparse.ArgumentParser) -> None:
    # testing aid: NAME@STEP[:RANK] makes RANK (default every rank) send itself SIGNAME after global step STEP
    parser.add_argument("--raise-signal", default=None, type=_signal_at, help=argparse.SUPPRESS)


def _signal_at(text: str):
    try:
        name, rest = text.split("@")
        step, _, rank = rest.partition(":")
        return signal.Signals["SIG" + name.upper().removeprefix("SIG")], int(step), int(rank) if rank else None
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"expected NAME@STEP[:RANK], got {text!r}") from None


class StopSignals:
    """While open (a `with` block in the main thread): SIGTERM and SIGUSR1 are noted instead of ending the
    process; `agreed()` says, identically on every rank, whether any rank received one. The previous handlers
    come back on exit. `enabled=False` (elastic runs, where Horovod handles lost workers) leaves them alone."""

    def __init__(self, enabled: bool = True, raise_at=None):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.raise_at = raise_at
        self.received = None
        self._previous = {}

    def __enter__(self):
        if self.enabled:
            self._previous = {s: signal.signal(s, self._note) for s in SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _note(self, signum, frame):
        self.received = self.received or signal.Signals(signum).name

    def agreed(self, global_step: int) -> str | None:
        """After a step: the name of the signal any rank received (SIGTERM before SIGUSR1), else None."""
        if not self.enabled:
            return None
        if self.raise_at and self.raise_at[1] == global_step and self.raise_at[2] in (None, dist.rank()):
            signal.raise_signal(self.raise_at[0])
        got = dist.sum_metrics([float(self.received == s.name) for s in SIGNALS], "stop_signal")
        return next((s.name for s, n in zip(SIGNALS, got) if n > 0), None)
