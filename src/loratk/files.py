"""Where loratk keeps its files on this machine: the cache folder for built-in models and data caches."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """`$LORATK_CACHE`, else `$XDG_CACHE_HOME/loratk` (default `~/.cache/loratk`)."""
    root = os.environ.get("LORATK_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "loratk"
    )
    return Path(root)


def default_data_cache_dir() -> Path:
    """`<cache>/data`: the latent and text-embedding caches, shared by every run on this machine."""
    return default_cache_dir() / "data"
