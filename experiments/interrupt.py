"""Ctrl-C and SIGTERM in the experiments' commands: both stop a run where it is, as a
`KeyboardInterrupt`, so that the command keeps what finished, says so in one line, and exits with
128 + the signal (130 Ctrl-C, 143 SIGTERM), as a shell reports a process the signal killed."""

from __future__ import annotations

import signal


class Terminated(KeyboardInterrupt):
    """SIGTERM (what Slurm and `timeout` send), raised where the run is, so it stops as on Ctrl-C."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def raise_on_sigterm() -> None:
    """From now on SIGTERM raises `Terminated` in the main thread."""
    signal.signal(signal.SIGTERM, _terminate)


def signal_of(interrupt: KeyboardInterrupt) -> signal.Signals:
    """SIGTERM for ours, or for a real-engine runner's (which raises its own while it runs)."""
    from hwloop.replay import Interrupted

    return signal.SIGTERM if isinstance(interrupt, Terminated | Interrupted) else signal.SIGINT
