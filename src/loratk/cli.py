"""`loratk <command>`: parse arguments, lazy-import the handler, turn errors into exit codes.

Heavy libraries (torch, diffusers, transformers) load inside the command that needs them, so `loratk --help`
is instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loratk import __version__

CAPTION_MODEL = "Salesforce/blip-image-captioning-large"  # = loratk.captioning.DEFAULT_MODEL (a test checks)
CAPTION_MANIFESTS = Path("captions")  # = `loratk caption --manifest-dir` default


def _cmd_caption(args: argparse.Namespace) -> int:
    import logging

    from loratk.captioning import CaptioningError, CaptioningInterrupted, caption_images
    from loratk.core.checkpoint import OutputWriteError

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
        _print_caption_summary(interrupted.report)
        print("interrupted: finished captions are saved; rerun the same command to go on", file=sys.stderr)
        return 130
    _print_caption_summary(report)
    return 1 if report.failed else 0


def _print_caption_summary(report) -> None:
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


def _add_caption_parser(sub: argparse._SubParsersAction) -> None:
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
    caption.set_defaults(handler=_cmd_caption)


def _size(text: str) -> tuple[int, int]:
    """`1024` or `1024x768` (width x height)."""
    width, _, height = text.lower().partition("x")
    try:
        size = (int(width), int(height or width))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected WIDTH or WIDTHxHEIGHT, e.g. 1024x768, got {text!r}"
        ) from None
    if any(side < 8 or side % 8 for side in size):
        raise argparse.ArgumentTypeError(f"each side must be a multiple of 8, got {text!r}")
    return size


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _scales(text: str) -> list[float]:
    """`0.5,0.8,1.0` -> [0.5, 0.8, 1.0]."""
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas, e.g. 0.5,0.8,1, got {text!r}"
        ) from None


def _cmd_sample(args: argparse.Namespace) -> int:
    import logging

    import diffusers
    import transformers

    from loratk.models.sdxl import ModelLoadError
    from loratk.prompts import PromptError, load_prompts_file, parse_prompt_lines
    from loratk.sampling import SampleError, run_sample

    # Loading a second LoRA makes transformers print a "LOAD REPORT" of the first one's keys: noise here.
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()  # ours counts images; theirs count weight files
    transformers.utils.logging.disable_progress_bar()
    for noisy in ("huggingface_hub", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        prompts = parse_prompt_lines(args.prompt or [], "--prompt")
        for path in args.prompts_file or []:
            prompts += load_prompts_file(path)
        result = run_sample(
            prompts=prompts,
            loras=args.lora or [],
            model=args.model,
            model_config=args.model_config,
            lora_dir=args.lora_dir,
            seeds=args.seed,
            steps=args.steps,
            guidance=args.cfg,
            size=args.size,
            scheduler=args.scheduler,
            scales=[s for group in args.scale for s in group] if args.scale else [1.0],
            compare_base=args.compare_base,
            negative_prompt=args.negative,
            out_dir=args.out,
            grid_path=args.grid,
            device=args.device,
            precision=args.precision,
        )
    except (PromptError, SampleError, ModelLoadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{len(result.images)} image(s) in {args.out}; grid: {result.grid}")
    return 0


_FOLDER_OPTIONS = (
    "resolution",
    "min_side",
    "caption_ext",
    "manifest",
    "trigger",
    "bucket_step",
    "no_buckets",
)


FOLDER_REPORTS = Path("runs") / "check"  # a folder's CSV report: runs/check/<folder>.csv (git ignores runs/)


def _folder_spec(target: Path, args: argparse.Namespace) -> tuple[Any, list[str]]:
    """The preflight spec of `loratk check FOLDER`, with the recipe's defaults for what is not given.

    A folder that holds only folders is checked one level down (each subfolder with images a subset), and a
    folder's caption manifest is found where `loratk caption` writes it (captions/<folder>.jsonl)."""
    from loratk.data.captions import Subset
    from loratk.data.check import DataSpec
    from loratk.data.images import list_image_files
    from loratk.recipe import DataConfig

    defaults = {name: field.default for name, field in DataConfig.model_fields.items()}
    notes = []
    folders = [target]
    if not list_image_files(target):
        below = [d for d in sorted(target.iterdir()) if d.is_dir() and not d.name.startswith(".")]
        below = [d for d in below if list_image_files(d)]
        if below:
            folders = below
            names = ", ".join(f"{d} ({len(list_image_files(d))})" for d in below)
            notes.append(f"{target} holds no images itself; checking the folders in it that do: {names}")
    subsets = []
    for folder in folders:
        manifest = (
            Path(args.manifest) if args.manifest else CAPTION_MANIFESTS / f"{folder.resolve().name}.jsonl"
        )
        found = args.manifest is not None or manifest.is_file()
        if found and not args.manifest:
            notes.append(f"{folder}: captions from {manifest} (found where `loratk caption` writes them)")
        subsets.append(
            Subset(
                dir=folder,
                caption_source="manifest" if args.manifest else defaults["caption_source"],
                manifest=manifest if found else None,
                caption_ext=args.caption_ext or defaults["caption_ext"],
                trigger=args.trigger,
            )
        )
    resolution = defaults["resolution"]
    spec = DataSpec(
        subsets=tuple(subsets),
        resolution=args.resolution or (resolution, resolution),
        buckets=not args.no_buckets,
        bucket_step=args.bucket_step or defaults["bucket_step"],
        min_side=args.min_side,
    )
    return spec, notes


def _cmd_check(args: argparse.Namespace) -> int:
    target = Path(args.path)
    if target.is_file() and target.suffix == ".toml":
        given = [
            f"--{name.replace('_', '-')}"
            for name in _FOLDER_OPTIONS
            if getattr(args, name) not in (None, False)
        ]
        if given:
            print(
                f"error: {', '.join(given)} apply to a folder; for a recipe use overrides (data.min_side=128)",
                file=sys.stderr,
            )
            return 2
        from loratk.recipe import RecipeError, load_recipe
        from loratk.train import build_data_spec

        try:
            recipe = load_recipe(target, args.overrides)
        except RecipeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        spec = build_data_spec(recipe)
        default_csv = recipe.run_dir / "check.csv"
    elif target.is_dir():
        if args.overrides:
            print(
                f"error: overrides ({' '.join(args.overrides)}) apply to a recipe, not a folder",
                file=sys.stderr,
            )
            return 2
        spec, notes = _folder_spec(target, args)
        for note in notes:
            print(note)
        default_csv = FOLDER_REPORTS / f"{target.resolve().name}.csv"
    else:
        print(f"error: {target}: no such folder or .toml recipe", file=sys.stderr)
        return 2

    from loratk.data.check import format_summary, quarantine_bad_images, run_preflight, write_report_csv

    report = run_preflight(
        spec,
        perceptual_hash=not args.no_duplicates,
        max_distance=args.dup_distance,
        progress=sys.stderr.isatty(),
    )
    moved = []
    if args.quarantine:
        moved = quarantine_bad_images(report, Path(args.quarantine))
    csv_path = Path(args.report) if args.report else default_csv
    write_report_csv(report.images, csv_path)
    print(format_summary(report, csv_path=csv_path, quarantined=bool(moved)))
    too_small = any(p.kind == "too_small" for image in report.bad for p in image.problems)
    if target.is_dir() and too_small and not (args.resolution or args.min_side):
        side = spec.resolution[0]
        print(
            f"Hint: with no --resolution, a folder is checked for training at {side}x{side} (SDXL's size), "
            f"where images under {spec.effective_min_side} px are too small. For a smaller training size pass "
            "it, e.g. --resolution 512 (or --min-side PX), or check the recipe you train with: "
            "loratk check recipes/NAME.toml"
        )
    remaining = len(report.problems) + sum(1 for r in report.bad if not r.moved_to)
    if moved:
        print(f"Quarantine: moved {len(moved)} file(s) to {args.quarantine} (nothing was deleted).")
        print(f"Remaining errors after the move: {remaining}.")
    return 1 if remaining else 0


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loratk",
        description="Fine-tune Stable Diffusion XL into small character and style adapters.",
        epilog="Multi-GPU / mixed precision: accelerate launch -m loratk.train RECIPE.toml",
    )
    parser.add_argument("--version", action="version", version=f"loratk {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    sub.add_parser(
        "train",
        help="train an adapter from a TOML recipe in this process (`loratk train RECIPE --help` for options)",
        add_help=False,
    )

    _add_caption_parser(sub)
    sample = sub.add_parser(
        "sample",
        help="render prompts with LoRA files: epochs side by side, strength sweeps, vs the base model",
        description="Render prompts x seeds (grid rows) with each LoRA file x scale (grid columns).",
        epilog="example: loratk sample --lora runs/ukiyoe/epoch1.safetensors --lora runs/ukiyoe/epoch7.safetensors "
        '--prompt "Samurai on a hill with his sword drawn" --seed 1 2 --compare-base',
    )
    sample.add_argument(
        "--lora", action="append", metavar="FILE", help="LoRA .safetensors file; repeat: one column each"
    )
    sample.add_argument(
        "--prompt",
        action="append",
        help="prompt (repeatable); kohya options (--n, --w, --h, --d, --s, --l) and <lora:name:w> tags work. "
        "Without --prompt and --prompts-file: the [sample] prompts of the first --lora's run",
    )
    sample.add_argument(
        "--prompts-file", action="append", metavar="FILE", help="kohya prompt file, one per line"
    )
    sample.add_argument(
        "--negative", metavar="TEXT", help="default negative prompt (a prompt's --n replaces it)"
    )
    sample.add_argument(
        "--seed",
        type=int,
        nargs="+",
        help="seeds: one image per prompt and seed (default 0; without --prompt, the run's seeds)",
    )
    sample.add_argument(
        "--steps", type=_positive_int, help="denoising steps (default 30; without --prompt, the run's)"
    )
    sample.add_argument("--cfg", type=float, help="CFG scale (default 7; without --prompt, the run's)")
    sample.add_argument(
        "--size", type=_size, metavar="WxH", help="image size; default: the LoRA's training resolution"
    )
    sample.add_argument(
        "--scheduler",
        default="euler",
        choices=["euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras"],
        help="sampler (default euler)",
    )
    sample.add_argument(
        "--scale", type=_scales, action="append", metavar="S1,S2", help="LoRA strengths, e.g. 0.5,0.8,1.0"
    )
    sample.add_argument("--compare-base", action="store_true", help="add a column rendered by the base model")
    sample.add_argument(
        "--model",
        help="base model: hub id, diffusers folder or .safetensors checkpoint "
        "(default: the one named in the LoRA's metadata)",
    )
    sample.add_argument(
        "--model-config",
        metavar="DIR",
        help="diffusers folder with the configs of a single-file --model (offline)",
    )
    sample.add_argument(
        "--lora-dir",
        metavar="DIR",
        help="where <lora:name:w> tags are looked up (default: the LoRA's folder)",
    )
    sample.add_argument("--out", default="samples", metavar="DIR", help="output folder (default ./samples)")
    sample.add_argument("--grid", metavar="FILE", help="grid image path (default OUT/grid.png)")
    sample.add_argument("--device", help="cuda, cuda:1, cpu ... (default: cuda if available)")
    sample.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        help="UNet/text-encoder dtype (default: bf16 on GPU, fp32 on CPU); the VAE never runs in fp16",
    )
    sample.set_defaults(handler=_cmd_sample)

    check = sub.add_parser(
        "check",
        help="check training data without loading a model: bad images, captions, buckets, duplicates",
        description="Decode every image and read every caption; print a summary, write a per-image CSV report. "
        "Exit status: 0 no errors, 1 errors in the data, 2 usage error.",
    )
    check.add_argument("path", help="an image folder, or a recipe (.toml) whose [data] section is checked")
    check.add_argument("overrides", nargs="*", help="recipe overrides: section.key=value (recipe only)")
    check.add_argument(
        "--report",
        metavar="CSV",
        help="per-image CSV (default: <run dir>/check.csv for a recipe, runs/check/<folder>.csv for a folder)",
    )
    check.add_argument(
        "--quarantine", metavar="DIR", help="move bad images (and their captions) into DIR; never deletes"
    )
    check.add_argument(
        "--dup-distance",
        type=int,
        default=6,
        metavar="BITS",
        help="perceptual-hash distance (0-64) under which images count as near-duplicates (default 6)",
    )
    check.add_argument("--no-duplicates", action="store_true", help="skip the near-duplicate search")
    folder = check.add_argument_group("folder options (a recipe sets these in [data])")
    folder.add_argument(
        "--resolution", type=_size, metavar="W[xH]", help="training size / bucket area (1024)"
    )
    folder.add_argument(
        "--min-side", type=int, metavar="PX", help="smaller images are errors (default resolution/4)"
    )
    folder.add_argument("--caption-ext", metavar="EXT", help="sidecar caption extension (.txt)")
    folder.add_argument("--manifest", metavar="JSONL", help="read captions from this captions/<set>.jsonl")
    folder.add_argument("--trigger", help="trigger word put in front of each caption")
    folder.add_argument("--bucket-step", type=int, metavar="PX", help="bucket side step (64)")
    folder.add_argument(
        "--no-buckets", action="store_true", help="one fixed size instead of aspect-ratio buckets"
    )
    check.set_defaults(handler=_cmd_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # its own parser: the same options as `python -m loratk.train`
        from loratk.train import main as train_main

        return train_main(argv[1:], prog="loratk train")
    parser = build_parser()
    commands = {name: sub for name, sub in _subparsers(parser).items() if name != "train"}
    if argv[:1] and argv[0] in commands:
        # Options and positionals (a recipe's overrides) in any order: `check r.toml --report x a.b=1`.
        args = commands[argv[0]].parse_intermixed_args(argv[1:])
    else:
        args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
