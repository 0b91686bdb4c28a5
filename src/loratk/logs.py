"""What a loratk command prints besides its progress bars: loratk's own lines, and the libraries' warnings
that matter. Messages known to be harmless here are dropped, each named below. (Pillow's
DecompressionBombWarning is dropped where images are decoded: loratk reports an over-large image itself.)"""

from __future__ import annotations

import logging
import os
import re
import sys

# (logger name prefix, message pattern): harmless on every machine loratk runs on.
KNOWN_NOISE = (
    # transformers 5 falls back to its PIL image processors without torchvision, which loratk never needs.
    ("transformers", re.compile(r"requires torchvision")),
    # bitsandbytes' CPU backend looks for an optional kernel package at import.
    ("bitsandbytes", re.compile(r"kernels")),
    # diffusers warns on every cast of a model, even one with no module to keep in fp32 (the list is empty).
    ("diffusers", re.compile(r"should be kept in float32: \[\]")),
)
_RANK = re.compile(r"^\[RANK \d+\] ")


class _DropKnownNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(record.name.startswith(n) and p.search(message) for n, p in KNOWN_NOISE)


class _LoratkFormat(logging.Formatter):
    """`message` for information, `warning: message` / `error: message` above; accelerate's `[RANK 0]` prefix
    only when several processes print."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            message = _RANK.sub("", message)
        if record.levelno > logging.INFO:
            message = f"{record.levelname.lower()}: {message}"
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        return message


class _TqdmHandler(logging.Handler):
    """Writes to the stderr of the moment, between progress-bar updates, so a log line never breaks a bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def configure_logging(level: int = logging.INFO) -> None:
    """loratk's lines at `level` and above; other libraries' warnings and errors only; known noise dropped.

    Call once at the start of a command, before the heavy libraries are imported (some warn on import).
    """
    handler = _TqdmHandler()
    handler.setFormatter(_LoratkFormat())
    handler.addFilter(_DropKnownNoise())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("loratk").setLevel(level)
    _quiet_libraries()


def _quiet_libraries() -> None:
    """transformers and diffusers print through handlers of their own (not the root's): filter those too,
    keep their warnings and errors, and hide their progress bars over weight files (loratk's own bars count
    images and steps)."""
    import diffusers
    import transformers

    for library in (transformers, diffusers):
        library.utils.logging.get_logger(library.__name__)  # creates the library's own handler
        library.utils.logging.set_verbosity_warning()
        library.utils.logging.disable_progress_bar()
        for own in logging.getLogger(library.__name__).handlers:
            own.addFilter(_DropKnownNoise())
