"""Extract a LoRA from full fine-tuning: truncated SVD of (tuned - base) per target module, kohya layout.

Answers the 4 GB-file complaint: a full DreamBooth run also yields a LoRA file of a chosen rank.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch


def matches_targets(name: str, targets: str | list[str]) -> bool:
    """peft's rule: a string is a regex over the full module name; a list holds module-name suffixes."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def target_weights(module: torch.nn.Module, targets: str | list[str]) -> dict[str, torch.Tensor]:
    """`{module name: weight}` of every Linear / Conv2d in `module` that `targets` selects."""
    return {
        name: m.weight
        for name, m in module.named_modules()
        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d) and matches_targets(name, targets)
    }


def compute_low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factors of a weight difference: (down [r, in(, kh, kw)], up [out, r(, 1, 1)]).

    up @ down is the truncated SVD of `delta` (flattened to [out, in * kh * kw] for convolutions).
    """
    out_features = delta.shape[0]
    matrix = delta.float().reshape(out_features, -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    r = min(rank, s.numel())
    up, down = u[:, :r] * s[:r], vh[:r]
    if delta.ndim == 4:
        return down.reshape(r, *delta.shape[1:]), up.reshape(out_features, r, 1, 1)
    return down, up


def extract_lora(
    base: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor], rank: int, alpha: float
) -> dict[str, torch.Tensor]:
    """PEFT-layout LoRA weights (`<module>.lora_A.weight`, `.lora_B.weight`) approximating tuned - base.

    Loaders apply (alpha / r) * up @ down with r = this module's rank, which is smaller than `rank` where a
    weight has fewer dimensions; `up` is rescaled so that one file-wide alpha is exact everywhere.
    """
    out: dict[str, torch.Tensor] = {}
    for name, weight in tuned.items():
        down, up = compute_low_rank(weight.detach().float().cpu() - base[name].float().cpu(), rank)
        r = down.shape[0]
        out[f"{name}.lora_A.weight"] = down.contiguous()
        out[f"{name}.lora_B.weight"] = (up * (r / alpha)).contiguous()
    return out
