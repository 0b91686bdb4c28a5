"""`loratk caption FOLDER`: BLIP captions for a folder, written where training reads them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CAPTION_MODEL = "Salesforce/blip-image-captioning-large"  # = loratk.captioning.DEFAULT_MODEL (a test checks)
CAPTION_MANIFESTS = Path("captions")  # where `--output manifest` writes, and `loratk check` looks


def add_parser(sub: argparse._SubParsersAction) -> None:
    caption = sub.add_parser(
        "caption",
        help="caption a folder of images with BLIP (sidecar .txt and/or captions/<folder>.jsonl)",
        description="Caption every image that has no caption yet. Reruns skip captioned images, so an "
        "interrupted run goes on where it stopped; a caption is only ever replaced with --overwrite. "
        "Exit status: 0 all done, 1 some images could not be read (listed), 2 bad arguments/folder/model.",
    )
    caption.add_argument("folder", help="folder of images (.png .jpg .jpeg .webp .bmp .tif .tiff)")
    caption.add_argument(
        "--model",
        default=CAPTION_MODEL,
        help="BLIP captioning model: hub id, local folder, or builtin:tiny-blip (random, offline, for trying "
        "the command) (default: %(default)s; Salesforce/blip-image-captioning-base is smaller)",
    )
    caption.add_argument("--batch-size", type=int, help="images per batch (default: 16 on CUDA, 4 on CPU)")
    caption.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    caption.add_argument(
        "--dtype", choices=("fp32", "fp16", "bf16"), help="weights dtype (default: fp16 on CUDA, fp32 on CPU)"
    )
    caption.add_argument("--beams", type=int, default=3, help="beam-search width (default: %(default)s)")
    caption.add_argument("--min-length", type=int, default=5, help="minimum tokens (default: %(default)s)")
    caption.add_argument("--max-length", type=int, default=75, help="maximum tokens (default: %(default)s)")
    caption.add_argument(
        "--top-p", type=float, help="nucleus sampling with this top-p (e.g. 0.9) instead of beam search"
    )
    caption.add_argument("--prefix", default="", help='text put before each caption, e.g. "ukiyoe style, "')
    caption.add_argument("--suffix", default="", help="text put after each caption")
    caption.add_argument(
        "--output",
        choices=("sidecar", "manifest", "both"),
        default="sidecar",
        help="sidecar: image.txt next to each image; manifest: <manifest-dir>/<folder-name>.jsonl; "
        "both (default: %(default)s)",
    )
    caption.add_argument("--overwrite", action="store_true", help="replace existing captions")
    caption.add_argument("--recursive", action="store_true", help="also caption images in subfolders")
    caption.add_argument(
        "--seed", type=int, default=0, help="seed for --top-p sampling, per image (default: %(default)s)"
    )
    caption.add_argument(
        "--manifest-dir",
        default=str(CAPTION_MANIFESTS),
        help="where the manifest goes (default: %(default)s)",
    )
    caption.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import logging

    from loratk.captioning import CaptioningError, CaptioningInterrupted, caption_images
    from loratk.files import OutputWriteError

    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        report = caption_images(
            args.folder,
            model=args.model,
            batch_size=args.batch_size,
            device=args.device,
            dtype=args.dtype,
            beams=args.beams,
            min_length=args.min_length,
            max_length=args.max_length,
            top_p=args.top_p,
            prefix=args.prefix,
            suffix=args.suffix,
            output=args.output,
            overwrite=args.overwrite,
            recursive=args.recursive,
            seed=args.seed,
            manifest_dir=args.manifest_dir,
        )
    except CaptioningError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OutputWriteError as err:
        print(f"error: {err}; the captions finished before it are saved", file=sys.stderr)
        return 1
    except CaptioningInterrupted as interrupted:
        print_summary(interrupted.report)
        print("interrupted: finished captions are saved; rerun the same command to go on", file=sys.stderr)
        return 130
    print_summary(report)
    return 1 if report.failed else 0


def print_summary(report) -> None:
    for failure in report.failed:
        print(f"failed: {failure.path}: {failure.reason}", file=sys.stderr)
    rate = f" ({report.images_per_second:.1f} images/s)" if report.captioned else ""
    copied = (
        f", copied {len(report.copied)} (a caption from one side written to the other)"
        if report.copied
        else ""
    )
    print(
        f"captioned {len(report.captioned)}{rate}{copied}, skipped {len(report.skipped)} (already had a "
        f"caption), failed {len(report.failed)}"
    )
    if report.manifest is not None:
        print(f"manifest: {report.manifest}")
