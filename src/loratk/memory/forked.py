"""A piece of the estimate in a forked process, beside the rest: the second step of the line and the samples
run there while the parent runs the first step (`estimate.estimate_memory(parallel=True)`). The child works
on its copy of the fake run and sends back what it returns, pickled, through a pipe."""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import sys
from typing import Any

import torch

from loratk.memory.estimate import EstimateError


def can_fork() -> bool:
    """Whether a forked second process can run beside this one (Linux, two cores or more)."""
    return hasattr(os, "fork") and sys.platform == "linux" and (os.cpu_count() or 1) >= 2


class Forked:
    """`work()` in a forked process, on its copy of everything (the fake run); `result()` waits for what it
    returned (`EstimateError` if it failed), `kill()` stops it."""

    def __init__(self, work: Any):
        read, write = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the child: the work, its result down the pipe, then out without cleaning up
            os.close(read)
            try:
                torch.set_num_threads(1)
                payload = pickle.dumps(("ok", work()))
            except BaseException as err:  # noqa: BLE001 - every failure goes back to the parent
                payload = pickle.dumps(("error", f"{type(err).__name__}: {err}"))
            with os.fdopen(write, "wb") as pipe:
                pipe.write(payload)
            os._exit(0)
        os.close(write)
        self.read = read

    def result(self) -> Any:
        with os.fdopen(self.read, "rb") as pipe:
            data = pipe.read()
        os.waitpid(self.pid, 0)
        status, value = pickle.loads(data) if data else ("error", "the process died")
        if status != "ok":
            raise EstimateError(f"the estimate's second process failed: {value}")
        return value

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            os.close(self.read)
