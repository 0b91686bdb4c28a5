"""Graceful stops: SIGTERM or a first Ctrl-C asks training to finish the step, save a state and exit.

A second Ctrl-C aborts at once (KeyboardInterrupt). Long stages (caching, sampling) poll `requested` too.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from types import FrameType

EXIT_CODES = {"SIGTERM": 143, "SIGINT": 130}


class TrainingInterrupted(Exception):
    """Raised after a requested stop was honoured (a state was saved if training had started)."""

    def __init__(self, signal_name: str, message: str):
        self.signal_name = signal_name
        self.exit_code = EXIT_CODES.get(signal_name, 1)
        super().__init__(message)


class StopRequest:
    """Installs SIGTERM/SIGINT handlers that record a stop request instead of killing the process."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def request(self, signal_name: str) -> None:
        self.signal_name = self.signal_name or signal_name

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt  # second Ctrl-C: abort now
        self.request(name)

    def install(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            # Outside the main thread signal handlers cannot be installed; then there are none, and no harm.
            with contextlib.suppress(ValueError):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> StopRequest:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()


_PR_SET_PDEATHSIG = 1


def stop_when_parent_exits(signum: int = signal.SIGTERM) -> bool:
    """Ask the kernel for `signum` when the parent process (a launcher) exits, so that killing the launcher
    alone stops training the graceful way (a state is saved) instead of leaving it running on its own.
    Linux only; returns whether it was set."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        armed = libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
    if armed and os.getppid() != parent:  # the parent exited before the request took effect
        os.kill(os.getpid(), signum)
    return armed
