"""Live tensor bytes, op by op: a dispatch mode that sees every tensor an op returns, counts its storage once,
and forgets it when the storage dies (a weakref finalizer). It works on fake tensors (no memory) and on real
ones alike, and uses only public PyTorch API (`TorchDispatchMode`, `untyped_storage`, `weakref`).

The peak is split by what the live storages are: frozen weights, trainable weights, gradients, optimizer
state, and everything else (activations kept for backward and temporaries).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from loratk.memory.sizes import format_gib

CATEGORIES = ("weights", "trainable", "gradients", "optimizer", "activations")


@dataclass(frozen=True)
class PeakBreakdown:
    """The bytes alive at the peak, by category, and where the step was then."""

    total: int
    by_category: dict[str, int]
    phase: str  # "forward" | "backward" | "optimizer" | "setup"
    module: str  # the innermost module running at the peak ("" outside any)

    def gib(self, category: str | None = None) -> float:
        return (self.total if category is None else self.by_category[category]) / 2**30


@dataclass
class _Storage:
    serial: int
    nbytes: int


class MemoryTracker(TorchDispatchMode):
    """`with MemoryTracker() as tracker:` counts every storage an op creates while it is active.

    Tensors made before it started are counted with `track`. `track(tensors, category)` names what some
    storages are (weights, optimizer state ...); unnamed storages are activations. `reset_peak()` starts a new
    peak (after warm-up). The peak's breakdown is taken at the moment memory starts falling from it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, _Storage] = {}  # storage address -> record
        self.categories: dict[int, str] = {}  # serial -> category (unnamed: activations)
        self.totals = dict.fromkeys(CATEGORIES, 0)  # live bytes by category
        self.current = 0
        self.peak = 0
        self.phase = "setup"
        self._serial = 0
        self._rising = False
        self._breakdown: PeakBreakdown | None = None
        self._modules: list[str] = []
        self._names: dict[int, str] = {}
        self._hooks: list[Any] = []

    # ------------------------------------------------------------------ counting
    def track(self, tensors: Iterable[Any], category: str | None = None) -> None:
        """Count the storages of `tensors` (if not counted yet) and, with `category`, name them."""
        for tensor in tensors:
            if not isinstance(tensor, torch.Tensor):
                continue
            record = self._count(tensor)
            if record is not None and category is not None:
                old = self.categories.get(record.serial, "activations")
                self.totals[old] -= record.nbytes
                self.totals[category] += record.nbytes
                self.categories[record.serial] = category

    def _count(self, tensor: torch.Tensor) -> _Storage | None:
        if tensor.layout != torch.strided:
            return None
        storage = tensor.untyped_storage()
        key = storage._cdata
        record = self.live.get(key)
        if record is not None:
            return record
        self._serial += 1
        record = self.live[key] = _Storage(self._serial, storage.nbytes())
        weakref.finalize(storage, self._free, key, record.serial)
        self.current += record.nbytes
        self.totals["activations"] += record.nbytes
        if self.current > self.peak:
            self.peak = self.current
            self._rising = True
        return record

    def _free(self, key: int, serial: int) -> None:
        record = self.live.get(key)
        if record is None or record.serial != serial:
            return
        if self._rising and self.current == self.peak:
            self._breakdown = self._snapshot()
        self._rising = False
        del self.live[key]
        self.current -= record.nbytes
        self.totals[self.categories.pop(serial, "activations")] -= record.nbytes

    def _snapshot(self) -> PeakBreakdown:
        by_category = dict(self.totals)
        module = self._modules[-1] if self._modules else ""
        return PeakBreakdown(self.current, by_category, self.phase, module)

    def breakdown(self) -> PeakBreakdown:
        """The peak so far, split by category (taken now if memory is still at its peak)."""
        if self._rising or self._breakdown is None:
            return self._snapshot() if self.current == self.peak else self._breakdown or self._snapshot()
        return self._breakdown

    def reset_peak(self) -> None:
        self.peak = self.current
        self._rising = False
        self._breakdown = None

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._count(tensor)
        return out

    # ------------------------------------------------------------------ where the step is
    def watch_modules(self, modules: dict[str, torch.nn.Module]) -> None:
        """Name the modules of `modules` (prefix -> root), so the peak says which one was running."""
        self.name_modules(modules)
        if not self._hooks:
            self._hooks = [
                torch.nn.modules.module.register_module_forward_pre_hook(self._enter),
                torch.nn.modules.module.register_module_forward_hook(self._leave, always_call=True),
            ]

    def name_modules(self, modules: dict[str, torch.nn.Module]) -> None:
        """Add names (prefix -> root) to those `watch_modules` gave: a model built later (an evaluator)."""
        for prefix, root in modules.items():
            for name, module in root.named_modules():
                self._names[id(module)] = f"{prefix}.{name}" if name else prefix

    def _enter(self, module: torch.nn.Module, args: Any) -> None:
        name = self._names.get(id(module))
        if name is not None:
            self._modules.append(name)

    def _leave(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if id(module) in self._names and self._modules:
            self._modules.pop()

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


def describe_breakdown(peak: PeakBreakdown) -> list[str]:
    labels = {
        "weights": "frozen weights",
        "trainable": "trainable weights",
        "gradients": "gradients",
        "optimizer": "optimizer state",
        "activations": "activations and temporaries",
    }
    return [f"{labels[c]:<28} {format_gib(peak.by_category[c]):>11}" for c in CATEGORIES]
