"""A piece of the estimate in a forked process, beside the rest: the second step of the line and the samples
run there while the parent runs the first step (`estimate.estimate_memory(parallel=True)`). The child works
on its copy of the fake run and sends back what it returns as JSON through a pipe (no pickle: the package
never unpickles, whatever the source)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
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
    returned, a JSON value (`EstimateError` if it failed), `kill()` stops it."""

    def __init__(self, work: Any):
        read, write = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the child: the work, its result down the pipe, then out without cleaning up
            os.close(read)
            try:
                torch.set_num_threads(1)
                payload = json.dumps(["ok", work()]).encode()
            except BaseException as err:  # noqa: BLE001 - every failure goes back to the parent
                payload = json.dumps(["error", f"{type(err).__name__}: {err}"]).encode()
            with os.fdopen(write, "wb") as pipe:
                pipe.write(payload)
            os._exit(0)
        os.close(write)
        self.read = read

    def result(self) -> Any:
        with os.fdopen(self.read, "rb") as pipe:
            data = pipe.read()
        os.waitpid(self.pid, 0)
        status, value = json.loads(data) if data else ("error", "the process died")
        if status != "ok":
            raise EstimateError(f"the estimate's second process failed: {value}")
        return value

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            os.close(self.read)


def encode_point(step: Any, renders: list[Any]) -> dict[str, Any]:
    """A step estimate and render estimates as JSON values (`decode_point` gives them back)."""
    return {"step": dataclasses.asdict(step), "renders": [dataclasses.asdict(r) for r in renders]}


def decode_point(data: dict[str, Any]) -> tuple[Any, list[Any]]:
    from loratk.memory.estimate import StepEstimate
    from loratk.memory.render import RenderEstimate, RenderJob
    from loratk.memory.tracker import PeakBreakdown

    step = data["step"]
    renders = [
        RenderEstimate(RenderJob(**r["job"]), PeakBreakdown(**r["peak"]), r["seconds"])
        for r in data["renders"]
    ]
    return StepEstimate(step["batch_size"], PeakBreakdown(**step["peak"]), step["seconds"]), renders
