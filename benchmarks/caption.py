"""Captioning speed: images/s of `loratk.captioning.caption_images` at several batch sizes.

    python benchmarks/caption.py                          # CPU, tiny random BLIP, batch 1 vs 16
    python benchmarks/caption.py --full-size              # GPU, BLIP-large-shaped random weights, fp16, batch 16/32

Two figures per batch size:
- end-to-end: the real command path (decode + EXIF + preprocessing in threads, generate, atomic writes),
  timed by `caption_images` after the model has loaded;
- generate: `model.generate` alone on preprocessed pixels, the ceiling for the end-to-end figure.

Random weights never choose the end token (the tiny model is biased to stop after a few words), so full-size
captions run to `--max-length` tokens; the tokens/caption column says how long they were. Real BLIP captions
are ~10-20 tokens, so full-size figures at `--max-length 75` are a lower bound. Everything is offline.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from loratk.captioning import (
    build_generate_kwargs,
    caption_images,
    compute_image_seed,
    resolve_device,
    resolve_dtype,
)
from loratk.models.tiny import build_blip, save_tiny_blip

# Salesforce/blip-image-captioning-large: ViT-L/16 at 384² + BERT-base decoder (~470M parameters).
BLIP_LARGE_VISION_CONFIG = dict(
    hidden_size=1024,
    intermediate_size=4096,
    projection_dim=512,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=384,
    patch_size=16,
)
BLIP_LARGE_TEXT_CONFIG = dict(
    hidden_size=768,
    intermediate_size=3072,
    projection_dim=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=512,
)
BLIP_VOCAB_SIZE = 30524


def save_full_size_blip(folder: Path) -> Path:
    model, processor = build_blip(
        BLIP_LARGE_TEXT_CONFIG, BLIP_LARGE_VISION_CONFIG, vocab_size=BLIP_VOCAB_SIZE
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def write_images(folder: Path, count: int, size: tuple[int, int]) -> None:
    """Smooth random JPEGs (photo-like decode cost; pure noise would make JPEG decoding unrealistically slow)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        small = rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize(size, Image.Resampling.BICUBIC).save(
            folder / f"{i:05d}.jpg", quality=90
        )


def time_generate(model_dir: Path, device: torch.device, dtype: torch.dtype, batch_size: int, args) -> dict:
    from transformers import BlipForConditionalGeneration, BlipProcessor

    processor = BlipProcessor.from_pretrained(model_dir)
    blip = BlipForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    size = processor.image_processor.size["height"]
    pixels = torch.randn(batch_size, 3, size, size, device=device, dtype=dtype)
    seeds = [compute_image_seed(0, str(i)) for i in range(batch_size)]
    kwargs = build_generate_kwargs(args.beams, args.min_length, args.max_length, None, seeds)
    pad = blip.config.text_config.pad_token_id
    rounds, lengths = [], []
    for r in range(args.warmup + args.rounds):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            tokens = blip.generate(pixel_values=pixels, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if r >= args.warmup:
            rounds.append(batch_size / (time.perf_counter() - start))
            lengths.append((tokens != pad).sum(dim=1).float().mean().item())  # [DEC] + words + [SEP]
    return {
        "generate_images_per_s": statistics.median(rounds),
        "tokens_per_caption": statistics.mean(lengths),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--full-size", action="store_true", help="BLIP-large-shaped random model (needs a GPU)"
    )
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument(
        "--dtype", choices=("fp32", "fp16", "bf16"), help="default: fp16 on CUDA, fp32 on CPU"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="default: 1 16 (tiny), 16 32 (full size)")
    parser.add_argument("--images", type=int, help="images per end-to-end run (default: 64 tiny, 512 full)")
    parser.add_argument("--image-size", type=int, nargs=2, default=(768, 512), metavar=("W", "H"))
    parser.add_argument("--beams", type=int, default=3)
    parser.add_argument("--min-length", type=int, default=5)
    parser.add_argument("--max-length", type=int, default=75)
    parser.add_argument(
        "--rounds", type=int, default=3, help="timed rounds per batch size (medians are reported)"
    )
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.full_size and device.type != "cuda":
        print("--full-size is meant for a GPU (a 470M-parameter model on CPU takes hours)", file=sys.stderr)
        return 2
    batch_sizes = args.batch_sizes or ([16, 32] if args.full_size else [1, 16])
    count = args.images or (512 if args.full_size else 64)

    with tempfile.TemporaryDirectory(prefix="loratk-caption-bench-") as tmp:
        tmp = Path(tmp)
        model_dir = (save_full_size_blip if args.full_size else save_tiny_blip)(tmp / "model")
        write_images(tmp / "images", count, tuple(args.image_size))
        # Warm-up run (first CUDA kernels, allocator), not timed.
        caption_images(
            tmp / "images", model=str(model_dir), batch_size=batch_sizes[0], device=str(device),
            dtype=args.dtype, beams=args.beams, min_length=args.min_length, max_length=args.max_length,
            overwrite=True, progress=False,
        )  # fmt: skip
        # Rounds interleave the batch sizes, so load from other processes hits them alike; medians are reported.
        end_to_end: dict[int, list[float]] = {b: [] for b in batch_sizes}
        for _ in range(args.rounds):
            for batch_size in batch_sizes:
                report = caption_images(
                    tmp / "images", model=str(model_dir), batch_size=batch_size, device=str(device),
                    dtype=args.dtype, beams=args.beams, min_length=args.min_length,
                    max_length=args.max_length, overwrite=True, progress=False,
                )  # fmt: skip
                end_to_end[batch_size].append(len(report.captioned) / report.seconds)
        results = []
        for batch_size in batch_sizes:
            row = {"batch_size": batch_size, "images_per_s": statistics.median(end_to_end[batch_size])}
            row.update(time_generate(model_dir, device, dtype, batch_size, args))
            results.append(row)

    name = "BLIP-large-shaped (random)" if args.full_size else "tiny BLIP (random)"
    gpu = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"{name}, {device} ({gpu}), {str(dtype).removeprefix('torch.')}, {count} images "
          f"{args.image_size[0]}x{args.image_size[1]} JPEG, beams {args.beams}, max_length {args.max_length}")  # fmt: skip
    print("| batch | end-to-end images/s | generate images/s | tokens/caption |")
    print("|---:|---:|---:|---:|")
    for row in results:
        print(
            f"| {row['batch_size']} | {row['images_per_s']:.1f} | {row['generate_images_per_s']:.1f} "
            f"| {row['tokens_per_caption']:.1f} |"
        )
    base = results[0]
    for row in results[1:]:
        print(
            f"batch {row['batch_size']} vs {base['batch_size']}: "
            f"{row['images_per_s'] / base['images_per_s']:.2f}x end-to-end, "
            f"{row['generate_images_per_s'] / base['generate_images_per_s']:.2f}x generate"
        )
    if args.json:
        args.json.write_text(json.dumps({"model": name, "device": gpu, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
