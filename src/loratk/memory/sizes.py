"""Memory sizes as people write them ("24GiB", "24GB", "512MiB", "1.5G"), in bytes; no torch needed."""

from __future__ import annotations

import re

_UNITS = {
    "": 1, "b": 1,
    "k": 2**10, "kib": 2**10, "kb": 10**3,
    "m": 2**20, "mib": 2**20, "mb": 10**6,
    "g": 2**30, "gib": 2**30, "gb": 10**9,
    "t": 2**40, "tib": 2**40, "tb": 10**12,
}  # fmt: skip


def parse_size(text: str) -> int:
    """Bytes in `text`: a number with an optional unit (KiB/MiB/GiB/TiB, KB/MB/GB/TB; K/M/G = KiB/MiB/GiB)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"expected a memory size such as 24GiB, 24GB or 512MiB, got {text!r}")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"a memory size must be more than 0, got {text!r}")
    return value


def format_gib(nbytes: float) -> str:
    """`12.34 GiB`, or MiB below 1 GiB (tiny test models)."""
    if abs(nbytes) >= 2**30:
        return f"{nbytes / 2**30:.2f} GiB"
    return f"{nbytes / 2**20:.1f} MiB"
