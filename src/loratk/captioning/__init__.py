"""BLIP captioning of an image folder: batched, resumable, and never replaces a caption without `overwrite`.

Captions go to sidecar `.txt` files and/or a manifest `captions/<folder-name>.jsonl` (one
`{"file_name": <path relative to the folder>, "text": ...}` per line). Every file is written atomically after
each batch, so an interrupted run keeps what it finished and a rerun captions only the rest.
`blip` holds the model and decoding, `outputs` where captions go, `run` the loop over batches.
"""

from loratk.captioning.blip import (
    DEFAULT_MODEL,
    PerImageGumbelSampler,
    build_generate_kwargs,
    compute_image_seed,
    load_blip,
    resolve_device,
    resolve_dtype,
)
from loratk.captioning.outputs import (
    OUTPUTS,
    Captioned,
    CaptioningError,
    CaptionReport,
    Skipped,
    manifest_path,
    plan_captions,
)
from loratk.captioning.run import CaptioningInterrupted, caption_images

__all__ = [
    "DEFAULT_MODEL",
    "OUTPUTS",
    "CaptionReport",
    "Captioned",
    "CaptioningError",
    "CaptioningInterrupted",
    "PerImageGumbelSampler",
    "Skipped",
    "build_generate_kwargs",
    "caption_images",
    "compute_image_seed",
    "load_blip",
    "manifest_path",
    "plan_captions",
    "resolve_device",
    "resolve_dtype",
]
