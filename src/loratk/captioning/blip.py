"""The BLIP captioner: device and dtype, loading (a hub id, a folder, `builtin:tiny-blip`), and decoding
(beam search, or nucleus sampling seeded per image so that a caption never depends on its batch)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TopPLogitsWarper

from loratk.captioning.outputs import OUTPUTS, CaptioningError
from loratk.core.precision import DTYPES
from loratk.models.tiny import TINY_BLIP_ID, materialise_tiny_blip

DEFAULT_MODEL = "Salesforce/blip-image-captioning-large"


def resolve_device(device: str | None) -> torch.device:
    try:
        resolved = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as err:
        raise CaptioningError(f"device {device!r}: {err}; use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise CaptioningError(f"device {device!r}: no CUDA GPU is available here; use --device cpu")
    return resolved


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in ("fp32", "fp16", "bf16"):
        raise CaptioningError(f"dtype {dtype!r}: must be one of fp32, fp16, bf16")
    return DTYPES[dtype]


def load_blip(model: str, device: torch.device, dtype: torch.dtype):
    """`BlipForConditionalGeneration` + `BlipProcessor` from a hub id, a folder or `builtin:tiny-blip`."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    where = str(materialise_tiny_blip()) if model == TINY_BLIP_ID else model
    if model.startswith((".", "/", "~")) and not Path(model).expanduser().is_dir():
        raise CaptioningError(f"--model {model!r}: no such folder; give a BLIP folder or a hub id")
    where = os.path.expanduser(where)
    try:
        processor = BlipProcessor.from_pretrained(where)
        blip = BlipForConditionalGeneration.from_pretrained(where, dtype=dtype)
    except (OSError, ValueError) as err:
        hint = (
            "it is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 is set"
            if os.environ.get("HF_HUB_OFFLINE") == "1"
            else "check the hub id or folder (a BLIP captioning model, e.g. Salesforce/blip-image-captioning-base)"
        )
        raise CaptioningError(
            f"--model {model!r}: could not load a BLIP captioner: {err}\n  hint: {hint}"
        ) from err
    return blip.to(device).eval(), processor


def compute_image_seed(seed: int, file_name: str) -> int:
    """A 63-bit seed from (run seed, image path): a caption never depends on which batch the image is in."""
    digest = hashlib.sha256(f"{seed}\0{file_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class PerImageGumbelSampler(LogitsProcessor):
    """Sampling as argmax(logits + Gumbel noise), with one noise generator per image (Gumbel-max trick).

    This draws exactly from softmax(logits), like `do_sample=True`, but `torch.multinomial` would draw the
    whole batch from one stream, so an image's caption would change with its neighbours and the batch size.
    Here row i only ever sees its own stream, so batch 1, batch 16 and a resumed run all agree.
    """

    def __init__(self, seeds: Sequence[int]):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # scores: [B, vocab]; one row per image (a single beam). The noise is drawn on the CPU in fp32 so it is
        # the same on every device.
        uniform = torch.stack([torch.rand(scores.shape[-1], generator=g) for g in self.generators])
        gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(torch.float32).tiny)))
        return scores + gumbel.to(device=scores.device, dtype=scores.dtype)


def build_generate_kwargs(
    beams: int, min_length: int, max_length: int, top_p: float | None, seeds: Sequence[int]
) -> dict[str, Any]:
    """Arguments for `generate`: beam search by default, nucleus sampling when `top_p` is set."""
    kwargs: dict[str, Any] = dict(min_length=min_length, max_length=max_length, do_sample=False)
    if top_p is None:
        return dict(kwargs, num_beams=beams)
    # Greedy decoding over top-p-filtered logits plus per-image Gumbel noise = seeded nucleus sampling.
    processors = LogitsProcessorList([TopPLogitsWarper(top_p), PerImageGumbelSampler(seeds)])
    return dict(kwargs, num_beams=1, logits_processor=processors)


def validate_options(
    batch_size: int | None, beams: int, min_length: int, max_length: int, top_p: float | None, output: str
) -> None:
    problems = []
    if batch_size is not None and batch_size < 1:
        problems.append(f"batch_size must be >= 1, got {batch_size}")
    if beams < 1:
        problems.append(f"beams must be >= 1, got {beams}")
    if min_length < 0 or max_length < 1 or min_length > max_length:
        problems.append(f"need 0 <= min_length <= max_length, got {min_length} and {max_length}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        problems.append(f"top_p must be in (0, 1], got {top_p}")
    if output not in OUTPUTS:
        problems.append(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
    if problems:
        raise CaptioningError("; ".join(problems))


@torch.inference_mode()
def generate_captions(
    blip: Any,
    processor: Any,
    pixel_values: torch.Tensor,
    names: Sequence[str],
    beams: int,
    min_length: int,
    max_length: int,
    top_p: float | None,
    seed: int,
) -> list[str]:
    seeds = [compute_image_seed(seed, name) for name in names]
    kwargs = build_generate_kwargs(beams, min_length, max_length, top_p, seeds)
    pixel_values = pixel_values.to(device=blip.device, dtype=blip.dtype)
    tokens = blip.generate(pixel_values=pixel_values, **kwargs)  # [B, <= max_length], padded
    return [" ".join(text.split()) for text in processor.batch_decode(tokens, skip_special_tokens=True)]
