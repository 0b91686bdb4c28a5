"""`loratk sample`: render saved adapters alone, against the base model, other epochs and strengths."""

from __future__ import annotations

import argparse
import sys

from loratk.commands.arguments import image_size, positive_int, scales


def add_parser(sub: argparse._SubParsersAction) -> None:
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
        "--steps", type=positive_int, help="denoising steps (default 30; without --prompt, the run's)"
    )
    sample.add_argument("--cfg", type=float, help="CFG scale (default 7; without --prompt, the run's)")
    sample.add_argument(
        "--size", type=image_size, metavar="WxH", help="image size; default: the LoRA's training resolution"
    )
    sample.add_argument(
        "--scheduler",
        default="euler",
        choices=["euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras"],
        help="sampler (default euler)",
    )
    sample.add_argument(
        "--scale", type=scales, action="append", metavar="S1,S2", help="LoRA strengths, e.g. 0.5,0.8,1.0"
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
    sample.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.lora:
        from loratk.baselines.outputs import read_generator_metadata

        generators = [read_generator_metadata(path) is not None for path in args.lora]
        if any(generators):
            return _run_generators(args, all(generators))
    import logging

    import diffusers
    import transformers

    from loratk.adapters.lora_files import LoraFileError
    from loratk.models.family import ModelLoadError
    from loratk.prompts import PromptError, load_prompts_file, parse_prompt_lines
    from loratk.sampling.command import run_sample
    from loratk.sampling.specs import SampleError

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
    except (PromptError, SampleError, LoraFileError, ModelLoadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{len(result.images)} image(s) in {args.out}; grid: {result.grid}")
    return 0


def _run_generators(args: argparse.Namespace, only_generators: bool) -> int:
    """GAN generator files (methods dcgan / wgan-gp): no prompts, no base model; one image per seed."""
    if not only_generators or args.prompt or args.prompts_file or args.compare_base:
        print(
            "error: --lora mixes GAN generator files with other files, or adds prompts / --compare-base; a "
            "generator renders from seeds alone: pass only generator files and --seed",
            file=sys.stderr,
        )
        return 2
    from loratk.baselines.outputs import GeneratorFileError
    from loratk.baselines.sample import render_generator_files

    try:
        images, grid = render_generator_files(args.lora, args.seed or [0], args.out, args.grid)
    except (GeneratorFileError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{len(images)} image(s) in {args.out}; grid: {grid}")
    return 0
