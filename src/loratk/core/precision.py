"""Precision names as recipes and commands spell them, and the torch dtypes they mean: the one table."""

from __future__ import annotations

import torch

# "no" is Accelerate's name for plain fp32 training (`train.mixed_precision = "no"`).
DTYPES = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_dtype(name: str) -> torch.dtype:
    """The dtype of a precision name; `ValueError` naming the choices for an unknown one."""
    if name not in DTYPES:
        raise ValueError(f"precision must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]
