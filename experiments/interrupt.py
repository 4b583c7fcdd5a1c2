"""Ctrl-C and SIGTERM in the experiments' commands: both stop a run where it is, as a
`KeyboardInterrupt`, so that the command keeps what finished, says so in one line, and exits with
128 + the signal (130 Ctrl-C, 143 SIGTERM), as a shell reports a process the signal killed."""

from __future__ import annotations

import signal

from hwloop.process import Terminated


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def raise_on_sigterm() -> None:
    """From now on SIGTERM raises `Terminated` in the main thread."""
    signal.signal(signal.SIGTERM, _terminate)


def signal_of(interrupt: KeyboardInterrupt) -> signal.Signals:
    """SIGTERM for `Terminated` (ours, or a real-engine runner's, which sets its own handler while it
    runs), else SIGINT."""
    return signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT
