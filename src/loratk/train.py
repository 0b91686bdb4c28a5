"""`python -m loratk.train RECIPE.toml [section.key=value ...]`: load the recipe, build, run.

Usually started as `accelerate launch -m loratk.train recipes/quickstart.toml`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loratk.core.engine import describe_engine
from loratk.recipe import Recipe, RecipeError, dump_recipe, load_recipe


def build_parser(prog: str = "python -m loratk.train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train an SDXL adapter from a TOML recipe. Options and overrides go in any order.",
        epilog="example: loratk train recipes/ukiyoe.toml train.epochs=3 lora.rank=64 --overwrite",
    )
    parser.add_argument("recipe", help="path to a TOML recipe (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="recipe overrides: section.key=value (TOML values)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        metavar="STATE",
        help="continue from the newest complete state (default), or from the given state folder",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start again: delete this run's states, metrics and adapter files",
    )
    return parser


def parse_args(argv: Sequence[str] | None, prog: str = "python -m loratk.train") -> argparse.Namespace:
    """Options and `section.key=value` overrides in any order (`RECIPE --overwrite train.epochs=1`)."""
    return build_parser(prog).parse_intermixed_args(argv)


LAUNCHERS = ("accelerate", "torchrun")


def _parent_command() -> list[str]:
    """The command line of the process that started this one ([] where it cannot be read)."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as fh:
            return [part.decode(errors="replace") for part in fh.read().split(b"\0") if part]
    except OSError:
        return []


def launcher_command() -> list[str] | None:
    """`accelerate launch ...` / `torchrun ...` as typed, when one of them started this process."""
    parent = _parent_command()
    for i, part in enumerate(parent):
        name = Path(part).name
        if name in LAUNCHERS or (name == "-m" and parent[i + 1 : i + 2] == ["torch.distributed.run"]):
            return [name if name in LAUNCHERS else "torchrun", *parent[i + (1 if name in LAUNCHERS else 2) :]]
    return None


def rerun_command(prog: str, argv: Sequence[str]) -> str:
    """The command to type again to resume: the launcher's when there is one, else this one; quoted."""
    import shlex

    launched = launcher_command()
    return shlex.join(launched) if launched else " ".join([prog, shlex.join(argv)]).strip()


class RunDirError(RuntimeError):
    pass


class LaunchError(RuntimeError):
    """The recipe asks for something the `accelerate launch` configuration cannot run."""


def gather_full_weights(accelerator: Any, modules: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Full state dicts of the (prepared) trained parts, by their plain names, through Accelerate's
    `get_state_dict`: a collective under FSDP and DeepSpeed ZeRO-3, which every rank calls and whose weights
    the main process receives."""
    return {name: accelerator.get_state_dict(module) for name, module in modules.items()}


def check_launch(recipe: Recipe, accelerator: Any, *, samples_during_training: bool) -> None:
    """Refuse, before any model loads, recipe options the launch's engine cannot run: every problem at
    once, each naming the key and a fix."""
    engine, sharded = describe_engine(accelerator)
    problems = []
    if recipe.optim.fused_backward and accelerator.num_processes > 1:
        problems.append(
            "optim.fused_backward steps each weight before the processes have combined their gradients: "
            "set optim.fused_backward = false, or train on one process"
        )
    if sharded and samples_during_training:
        problems.append(
            f"[sample] renders on the main process alone, but {engine} shards the weights across processes: "
            "set sample.prompts = [] (and no sample.prompts_file) and render the saved epochs with "
            "`loratk sample`, or launch with accelerate_configs/multi_gpu.yaml"
        )
    if engine.startswith("DeepSpeed") and _trains_text_encoders(recipe):
        section = "full" if _adapter_kind(recipe) == "full" else "lora"
        problems.append(
            f"{engine} trains one model per run, and {section}.train_text_encoders = true adds both text "
            "encoders: set it to false, or launch with accelerate_configs/multi_gpu.yaml or fsdp.yaml"
        )
    if problems:
        lines = "\n".join(f"  {p}" for p in problems)
        raise LaunchError(f"this recipe cannot run on {engine}:\n{lines}")


def _clear_run_outputs(run_dir: Path, name: str) -> None:
    import shutil

    for path in [run_dir / "state", run_dir / "samples", *run_dir.glob("epoch*_diffusers")]:
        shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(run_dir / f"{name}_diffusers", ignore_errors=True)
    for path in [
        run_dir / "metrics.jsonl",
        run_dir / "skipped.csv",
        run_dir / f"{name}.safetensors",
        run_dir / f"{name}.lora.safetensors",
    ]:
        path.unlink(missing_ok=True)
    for path in run_dir.glob("epoch*.safetensors"):
        path.unlink()


# ---------------------------------------------------------------- builders (recipe -> plain arguments)


def use_cpu_for_multiprocess_launch() -> bool:
    """True for a multi-process launch (torchrun / accelerate's multi-GPU launcher) on a machine with no GPU:
    its processes then run on the CPU with gloo, where Accelerate would start each as a lone process.
    """
    import torch

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def resolve_accumulation(recipe: Recipe, num_processes: int) -> int:
    """Gradient accumulation steps: given directly, or derived from `train.global_batch_size`."""
    train = recipe.train
    if train.global_batch_size is None:
        return train.gradient_accumulation_steps
    per_step = train.batch_size * num_processes
    if train.global_batch_size % per_step:
        raise RecipeError(
            "recipe",
            [
                f"train.global_batch_size: {train.global_batch_size} is not a multiple of batch_size x processes "
                f"= {train.batch_size} x {num_processes} = {per_step}; pick a multiple of {per_step}"
            ],
        )
    steps = train.global_batch_size // per_step
    if steps > 1 and recipe.optim.fused_backward:
        raise RecipeError(
            "recipe",
            [
                f"optim.fused_backward: train.global_batch_size = {train.global_batch_size} needs {steps} "
                f"accumulation steps at batch_size {train.batch_size} x {num_processes} process(es), and the "
                "fused step updates every weight at every micro-batch, so it cannot accumulate; set "
                f"train.batch_size = {train.global_batch_size // num_processes} (if it fits), or "
                "fused_backward = false"
            ],
        )
    return steps


# Which strategy pair each method is (shared/ARCHITECTURE.md): adapter kind x objective kind.
METHODS: dict[str, tuple[str, str]] = {
    "lora": ("lora", "caption"),
    "dreambooth": ("full", "dreambooth"),
    "dreambooth-lora": ("lora", "dreambooth"),
}


def _adapter_kind(recipe: Recipe) -> str:
    return METHODS[recipe.method][0]


def _objective_kind(recipe: Recipe) -> str:
    return METHODS[recipe.method][1]


def _trains_text_encoders(recipe: Recipe) -> bool:
    config = recipe.full if _adapter_kind(recipe) == "full" else recipe.lora
    return config.train_text_encoders


def build_adapter(recipe: Recipe) -> Any:
    if _adapter_kind(recipe) == "full":
        from loratk.adapters.full import FullAdapter

        return FullAdapter(
            train_text_encoders=recipe.full.train_text_encoders,
            text_encoder_lr=recipe.text_encoder_lr,
            export_dtype=recipe.export.dtype,
            extract_lora_rank=recipe.export.extract_lora_rank,
            lora_targets=recipe.lora.targets,
        )
    from loratk.adapters.lora import LoraAdapter

    return LoraAdapter(
        rank=recipe.lora.rank,
        alpha=recipe.lora.scale_alpha,
        dropout=recipe.lora.dropout,
        init=recipe.lora.init,
        targets=recipe.lora.targets,
        train_text_encoders=recipe.lora.train_text_encoders,
        text_encoder_lr=recipe.text_encoder_lr,
        export_dtype=recipe.export.dtype,
        export_diffusers=recipe.export.diffusers,
    )


def build_objective(recipe: Recipe, model: Any, *, device: Any, weight_dtype: Any) -> Any:
    from loratk.objectives.denoising import SDXLDenoiser

    denoiser = SDXLDenoiser(
        model,
        device=device,
        weight_dtype=weight_dtype,
        prediction_type=recipe.model.prediction_type,
        noise_offset=recipe.train.noise_offset,
        min_snr_gamma=recipe.train.min_snr_gamma,
        train_text_encoders=_trains_text_encoders(recipe),
    )
    if _objective_kind(recipe) == "dreambooth":
        from loratk.objectives.dreambooth import DreamBoothObjective

        return DreamBoothObjective(denoiser, prior_loss_weight=recipe.dreambooth.prior_loss_weight)
    from loratk.objectives.caption import CaptionObjective

    return CaptionObjective(denoiser)


def build_data_spec(recipe: Recipe) -> Any:
    """The recipe's [data] section as the plain values the preflight and the dataset take."""
    from loratk.data.captions import Subset
    from loratk.data.check import DataSpec

    data = recipe.data

    def path(value: str | None) -> Path | None:
        return Path(value) if value is not None else None

    if data.dir is not None:
        subsets = [
            Subset(
                Path(data.dir),
                data.caption_source,
                path(data.manifest),
                data.caption_ext,
                data.repeats,
                data.trigger,
            )
        ]
    else:
        subsets = [
            Subset(
                dir=Path(s.dir),
                caption_source=s.caption_source or data.caption_source,
                manifest=path(s.manifest),
                caption_ext=s.caption_ext or data.caption_ext,
                repeats=s.repeats or data.repeats,
                trigger=s.trigger if s.trigger is not None else data.trigger,
            )
            for s in data.subsets
        ]
    return DataSpec(
        subsets=tuple(subsets),
        resolution=data.size,
        buckets=data.buckets,
        bucket_step=data.bucket_step,
        bucket_min_side=data.bucket_min_side,
        bucket_max_side=data.bucket_max_side,
        bucket_no_upscale=data.bucket_no_upscale,
        min_side=data.min_side,
        max_pixels=data.max_pixels,
    )


def build_train_dataloader(recipe: Recipe, dataset: Any) -> Any:
    kwargs = dict(batch_size=recipe.train.batch_size, seed=recipe.seed, num_workers=recipe.data.num_workers)
    if _objective_kind(recipe) == "dreambooth":
        from loratk.data.dreambooth import build_dreambooth_dataloader

        return build_dreambooth_dataloader(dataset, **kwargs)
    from loratk.data.dataset import build_dataloader

    return build_dataloader(dataset, shuffle=recipe.data.shuffle, **kwargs)


def class_dir_of(recipe: Recipe) -> Path:
    db = recipe.dreambooth
    return Path(db.class_dir) if db.class_dir else recipe.run_dir / "class_images"


def prepare_class_images(
    recipe: Recipe, model: Any, dataset: Any, accelerator: Any, weight_dtype: Any
) -> None:
    """DreamBooth with prior preservation: top up the class images (main process), then pair them."""
    if _objective_kind(recipe) != "dreambooth" or not recipe.dreambooth.prior_preservation:
        return
    import contextlib

    import torch

    from loratk.class_images import generate_class_images, list_class_images
    from loratk.data.dataset import Record

    db, folder = recipe.dreambooth, class_dir_of(recipe)
    if accelerator.is_main_process:
        mixed = weight_dtype != torch.float32
        autocast = (
            torch.autocast(accelerator.device.type, dtype=weight_dtype) if mixed else contextlib.nullcontext()
        )
        with autocast:
            generate_class_images(
                model,
                class_dir=folder,
                prompt=db.class_prompt,
                num_images=db.num_class_images,
                size=recipe.data.size,
                steps=db.class_steps,
                guidance=db.class_guidance,
                batch_size=db.class_batch_size,
                seed=db.class_seed,
                negative_prompt=db.class_negative_prompt,
                scheduler=db.class_scheduler,
                prediction_type=recipe.model.prediction_type,
                model_name=recipe.model.path,
            )
    accelerator.wait_for_everyone()
    paths = list_class_images(folder)[: db.num_class_images]
    dataset.set_class_records([Record(p, db.class_prompt) for p in paths])


def load_sample_prompts(recipe: Recipe) -> list[Any]:
    """The `[sample]` prompts as parsed lines (empty when sampling is off); file problems surface here."""
    from loratk.prompts import load_prompts_file, parse_prompt_line

    if recipe.sample.prompts_file:
        return load_prompts_file(recipe.sample.prompts_file, allow_lora_tags=False)
    return [parse_prompt_line(line) for line in recipe.sample.prompts]


def build_sampler(recipe: Recipe, model: Any, prompts: list[Any], num_epochs: int, stop: Any = None) -> Any:
    """The epoch hook that renders `[sample]` prompts, or None when the recipe has no prompts."""
    if not prompts:
        return None
    from loratk.sampling import SampleHook, expand_prompts

    cfg = recipe.sample
    width, height = recipe.sample_size
    specs = expand_prompts(
        prompts,
        seeds=cfg.seeds,
        width=width,
        height=height,
        steps=cfg.steps,
        guidance=cfg.guidance,
        negative_prompt=cfg.negative_prompt,
    )
    return SampleHook(
        model=model,
        specs=specs,
        samples_dir=recipe.run_dir / "samples",
        scheduler=cfg.scheduler,
        every_n_epochs=cfg.every_n_epochs,
        num_epochs=num_epochs,
        at_start=cfg.at_start,
        model_name=recipe.model.path,
        prediction_type=recipe.model.prediction_type,
        should_stop=(lambda: stop.requested) if stop is not None else None,
    )


def run_on_main_process(accelerator: Any, work: Any, errors: tuple[type[Exception], ...]) -> Any:
    """Run `work()` on the main process alone and hand its result, or one of its `errors`, to the other
    processes, so every rank goes on, or fails, the same way (the data preflight decodes every image once)."""
    if accelerator.num_processes == 1:
        return work()
    from accelerate.utils import broadcast_object_list

    outcome: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            outcome = [work()]
        except errors as err:
            outcome = [err]
    broadcast_object_list(outcome, from_process=0)
    if isinstance(outcome[0], errors):
        raise outcome[0]
    return outcome[0]


def check_data_once(recipe: Recipe, accelerator: Any) -> Any:
    """The preflight on the main process alone (it decodes every image); the others receive its report."""
    from loratk.data.dataset import DataError

    return run_on_main_process(accelerator, lambda: check_data(recipe, progress=True), (DataError,))


def check_data(recipe: Recipe, *, progress: bool = False) -> Any:
    """Run the data preflight (no model); raise `DataError` with every problem unless they may be skipped."""
    from loratk.data.check import run_preflight
    from loratk.data.dataset import DataError

    report = run_preflight(build_data_spec(recipe), progress=progress)
    fatal = report.problems + (
        [] if recipe.data.on_bad_image == "skip" else report.error_lines[len(report.problems) :]
    )
    if fatal:
        hint = "run `loratk check` on the recipe for the full report"
        if not report.problems:
            hint += ', or set data.on_bad_image = "skip" to train on the good images only'
        raise DataError(fatal, hint=hint)
    if not report.good:
        raise DataError(
            [f"no usable image: all {len(report.images)} have problems"], hint="run `loratk check`"
        )
    return report


def build_dreambooth_dataset(recipe: Recipe) -> Any:
    """Instance images (sidecar caption, else the instance prompt); class images are attached later, by
    `prepare_class_images`."""
    from loratk.data.dreambooth import DreamBoothDataset, scan_instance_folder

    data, db = recipe.data, recipe.dreambooth
    records = scan_instance_folder(db.instance_dir, db.instance_prompt, data.caption_ext)
    return DreamBoothDataset(
        [r for r in records for _ in range(data.repeats)],
        data.size,
        center_crop=data.center_crop,
        random_flip=data.random_flip,
        caption_dropout=data.caption_dropout,
        seed=recipe.seed,
    )


def build_dataset(recipe: Recipe, report: Any = None) -> Any:
    """The training dataset from the good images of a preflight report (run here if not given)."""
    from loratk.data.dataset import ImageCaptionDataset, Record

    report = report if report is not None else check_data(recipe)
    subsets = report.spec.subsets
    records = [
        Record(
            path=image.path,
            caption=image.caption,
            size=image.size,
            bucket=image.bucket,
            sha256=image.sha256,
            subset=image.subset,
            trigger=subsets[image.subset_index].trigger,
        )
        for image in report.good
        for _ in range(subsets[image.subset_index].repeats)
    ]
    data = recipe.data
    return ImageCaptionDataset(
        records,
        data.size,
        center_crop=data.center_crop,
        random_flip=data.random_flip,
        caption_dropout=data.caption_dropout,
        seed=recipe.seed,
        shuffle_tags=data.shuffle_tags,
        keep_tokens=data.keep_tokens,
        tag_shuffle_variants=data.tag_shuffle_variants,
        max_pixels=data.max_pixels,
    )


def text_cache_off_reason(recipe: Recipe) -> str | None:
    """Why text embeddings cannot be cached for this recipe, or None if they can."""
    data = recipe.data
    if not data.cache_text_embeddings:
        return "data.cache_text_embeddings = false"
    if recipe.lora.train_text_encoders:
        return "lora.train_text_encoders = true, so their outputs change every step"
    if data.shuffle_tags and not data.tag_shuffle_variants:
        return (
            "data.shuffle_tags = true gives every step a new tag order; set data.tag_shuffle_variants = N "
            "to cache N fixed shuffles per caption instead"
        )
    return None


def build_data_caches(
    recipe: Recipe, dataset: Any, denoiser: Any, model: Any, accelerator: Any, epochs: int, stop: Any = None
) -> list[str]:
    """Fill the latent and text-embedding caches for every epoch to run, then point the dataset at them.

    Returns the model parts that training no longer needs (`vae`, `text_encoder`, `text_encoder_2`)."""
    from accelerate.logging import get_logger

    from loratk.data.cache import (
        LatentCache,
        TextEmbeddingCache,
        build_latent_cache,
        build_text_cache,
        compute_module_fingerprint,
    )
    from loratk.files import default_data_cache_dir

    logger = get_logger("loratk.train")
    data = recipe.data
    root = Path(data.cache_dir) if data.cache_dir else default_data_cache_dir()
    main = accelerator.is_main_process
    shard = dict(
        process_index=accelerator.process_index,
        num_processes=accelerator.num_processes,
        progress=main,
        should_stop=(lambda: stop.requested) if stop is not None else None,
    )
    epoch_range = range(1, epochs + 1)
    latents = text = None
    if data.cache_latents:
        vae = model.vae
        latents = LatentCache(
            root,
            compute_module_fingerprint([vae], extra=f"vae|{vae.dtype}"),
            recipe.model.vae or recipe.model.path,
            channels=vae.config.latent_channels,
            downscale=2 ** (len(vae.config.block_out_channels) - 1),
        )
        if not data.center_crop:
            logger.info(
                f"latent cache with random crops: every crop drawn for epochs 1..{epochs} is encoded once; "
                "data.center_crop = true needs at most two entries per image (flipped or not)",
                main_process_only=True,
            )
        stats = build_latent_cache(
            latents,
            dataset.latent_requests(epoch_range),
            denoiser.encode_latent_dist,
            max_pixels=data.max_pixels,
            **shard,
        )
        report = logger.warning if stats.rebuilt else logger.info  # a damaged entry is worth a warning
        report(f"latent cache {latents.folder}: {stats.describe()}", main_process_only=True)
    else:
        logger.info(
            "latent cache off (data.cache_latents = false): the VAE encodes every batch",
            main_process_only=True,
        )
    reason = text_cache_off_reason(recipe)
    if reason is None:
        tokenizers = "|".join(
            f"{type(t).__name__}:{len(t)}:{t.model_max_length}:{_vocab_digest(t)}" for t in model.tokenizers
        )
        text = TextEmbeddingCache(
            root,
            compute_module_fingerprint(list(model.text_encoders), extra=f"text|{tokenizers}"),
            recipe.model.path,
        )
        stats = build_text_cache(text, dataset.caption_texts(epoch_range), denoiser.encode_captions, **shard)
        report = logger.warning if stats.rebuilt else logger.info
        report(f"text-embedding cache {text.folder}: {stats.describe()}", main_process_only=True)
    else:
        logger.info(f"text-embedding cache off: {reason}", main_process_only=True)
    accelerator.wait_for_everyone()
    dataset.use_caches(latents=latents, text=text)
    return (["vae"] if latents else []) + (["text_encoder", "text_encoder_2"] if text else [])


def _vocab_digest(tokenizer: Any) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[:16]


def describe_buckets(dataset: Any) -> str:
    from loratk.data.buckets import count_buckets

    unique = {r.path: r for r in dataset.records}
    histogram = count_buckets(dataset.bucket_of(i) for i in range(len(dataset)))
    parts = ", ".join(f"{w}x{h}: {n}" for (w, h), n in histogram)
    return f"{len(unique)} images, {len(dataset)} items per epoch in {len(histogram)} bucket(s) ({parts})"


def _export_metadata(recipe: Recipe, dataset: Any, plan: Any) -> Any:
    import loratk
    from loratk.export.formats import build_kohya_metadata, compute_tag_frequency

    unique = {r.path: r for r in dataset.records}
    by_subset: dict[str, list[str]] = {}
    for record in unique.values():
        folder = record.subset or str(record.path.parent)
        by_subset.setdefault(Path(folder).name, []).append(record.caption)
    tags = compute_tag_frequency(by_subset)
    recipe_toml = dump_recipe(recipe)

    def metadata(epoch: int, global_step: int) -> dict[str, str]:
        return build_kohya_metadata(
            name=recipe.name if epoch >= plan.num_epochs else f"{recipe.name}-epoch{epoch}",
            rank=recipe.lora.rank,
            alpha=recipe.lora.scale_alpha,
            resolution=recipe.data.size,
            base_model=recipe.model.path,
            learning_rate=recipe.train.learning_rate,
            optimizer=recipe.optim.name,
            epoch=epoch,
            steps=global_step,
            num_train_images=len(unique),
            tag_frequency=tags,
            seed=recipe.seed,
            recipe_toml=recipe_toml,
            loratk_version=loratk.__version__,
            method=recipe.method,
        )

    return metadata


# ---------------------------------------------------------------- the run


class TrainingRun:
    """One training run with a visible shape: `setup()` -> `train()` -> `cleanup()`."""

    def __init__(self, recipe: Recipe, *, overwrite: bool = False, stop: Any = None):
        self.recipe = recipe
        self.run_dir = recipe.run_dir
        self.overwrite = overwrite
        self.stop = stop
        self.lock: Any = None
        self.resume_from: Path | None = None
        self.finished: Any = None  # (state folder, counters) of a run that has nothing left to train

    def setup(self) -> None:
        from accelerate import Accelerator, PartialState
        from accelerate.logging import get_logger
        from accelerate.utils import DataLoaderConfiguration, set_seed

        from loratk.core.checkpoint import StateError, StateManager
        from loratk.core.optim import build_lr_scheduler, build_optimizer
        from loratk.export.epochs import EpochExporter
        from loratk.models.sdxl import (
            DTYPES,
            apply_performance_options,
            enable_text_encoder_checkpointing,
            freeze_and_cast,
            load_sdxl,
            offload_frozen_encoders,
            require_attention_backend,
        )
        from loratk.plan import compute_plan

        recipe = self.recipe
        cpu = use_cpu_for_multiprocess_launch()
        self.logger = get_logger("loratk.train")
        self.accelerator = accelerator = Accelerator(
            cpu=cpu,
            mixed_precision=recipe.train.mixed_precision,
            gradient_accumulation_steps=resolve_accumulation(recipe, PartialState(cpu=cpu).num_processes),
            log_with=recipe.train.report_to or None,
            project_dir=str(self.run_dir),
            step_scheduler_with_optimizer=False,
            # Batches (pinned by the DataLoader) are copied to the device without blocking the host.
            dataloader_config=DataLoaderConfiguration(non_blocking=True),
        )
        set_seed(recipe.seed)
        require_attention_backend(recipe.performance.attention)  # a missing xformers fails before any loading

        # Launch, prompt-file and data problems surface before any model is loaded: every image is decoded,
        # every caption read.
        sample_prompts = load_sample_prompts(recipe)
        check_launch(recipe, accelerator, samples_during_training=bool(sample_prompts))
        # The run folder is claimed (locked, checked writable, cleaned of stale temporaries) and a finished
        # run is recognised before any image is decoded or any model loaded.
        run_on_main_process(accelerator, self._claim_run_dir, (RunDirError, StateError))
        self.candidates = self._resume_candidates()
        self.finished = self._finished_state()
        if self.finished is not None:
            return
        dreambooth = _objective_kind(recipe) == "dreambooth"
        if dreambooth:
            report, self.dataset = None, build_dreambooth_dataset(recipe)
        else:
            report = check_data_once(recipe, accelerator)
            self.dataset = build_dataset(recipe, report)
        if accelerator.is_main_process and report is not None:
            self._write_skipped(report)
            self.logger.info(f"data: {describe_buckets(self.dataset)}", main_process_only=True)

        self.weight_dtype = DTYPES[recipe.train.mixed_precision]
        # The local main process loads first: it alone writes `builtin:` models and hub downloads into the
        # cache (under torch.distributed, `save_pretrained` on other ranks writes no weights).
        with accelerator.local_main_process_first():
            self.model = load_sdxl(
                recipe.model.path,
                vae=recipe.model.vae,
                revision=recipe.model.revision,
                variant=recipe.model.variant,
                single_file_config=recipe.model.single_file_config,
            )
        self.adapter = build_adapter(recipe)
        set_seed(recipe.seed)  # adapter initialisation draws from a known RNG state, whatever loading did
        freeze_and_cast(self.model, accelerator.device, self.weight_dtype, keep_fp32=self.adapter.fp32_parts)
        # Class images come from the base model, before the adapter changes it.
        prepare_class_images(recipe, self.model, self.dataset, accelerator, self.weight_dtype)
        self.adapter.apply(self.model)
        trainables = self.adapter.trainable_modules(self.model)
        if recipe.train.gradient_checkpointing:
            self.model.unet.enable_gradient_checkpointing()
            for name, module in trainables.items():
                if name != "unet":
                    enable_text_encoder_checkpointing(module)
        perf = recipe.performance
        apply_performance_options(
            self.model.unet,
            attention=perf.attention,
            tf32=perf.tf32,
            channels_last=perf.channels_last,
            compile_unet=perf.compile_unet,
        )

        dataloader = build_train_dataloader(recipe, self.dataset)
        optimizer = build_optimizer(
            self.adapter.param_groups(self.model, recipe.train.learning_rate),
            recipe.optim.name,
            lr=recipe.train.learning_rate,
            weight_decay=recipe.optim.weight_decay,
            betas=recipe.optim.betas,
            eps=recipe.optim.eps,
            fused_backward=recipe.optim.fused_backward,
            max_grad_norm=recipe.train.max_grad_norm,
        )
        *self.modules, self.optimizer, self.dataloader = accelerator.prepare(
            *trainables.values(), optimizer, dataloader
        )
        self.trainable_names = list(trainables)
        self.plan = compute_plan(
            num_examples=len(self.dataset),
            batches_per_epoch=len(self.dataloader),
            per_device_batch=recipe.train.batch_size,
            gradient_accumulation_steps=accelerator.gradient_accumulation_steps,
            num_processes=accelerator.num_processes,
            epochs=recipe.train.epochs,
            max_steps=recipe.train.max_steps,
        )
        self.lr_scheduler = accelerator.prepare(
            build_lr_scheduler(
                self.optimizer,
                recipe.optim.scheduler,
                warmup_steps=recipe.optim.warmup_steps,
                total_steps=self.plan.total_steps,
            )
        )
        self.logger.info(f"plan: {self.plan.describe()}", main_process_only=True)
        # The objective runs the prepared (possibly DDP-wrapped) modules; export reads the plain ones.
        self.objective = build_objective(
            recipe,
            self.model.replace(**dict(zip(trainables, self.modules, strict=True))),
            device=accelerator.device,
            weight_dtype=self.weight_dtype,
        )
        # Caches need the VAE and text encoders, and the plan's epoch count (crops and flips are per epoch).
        # DreamBooth's few instance images are encoded per batch (no caches).
        cached = (
            []
            if dreambooth
            else build_data_caches(
                recipe,
                self.dataset,
                self.objective.denoiser,
                self.model,
                accelerator,
                self.plan.num_epochs,
                self.stop,
            )
        )
        if accelerator.device.type != "cpu":
            # Cached parts are not needed on the GPU while training; sampling borrows them back.
            moved = offload_frozen_encoders(self.model, "cpu", names=cached)
            if moved:
                self.logger.info(
                    f"moved {', '.join(moved)} to the CPU (caches cover them)", main_process_only=True
                )
        self.exporter = EpochExporter(
            adapter=self.adapter,
            model=self.model,
            run_dir=self.run_dir,
            name=recipe.name,
            # Full weights are big: by default only the final epoch is written.
            every_n_epochs=recipe.export.every_n_epochs
            or (self.plan.num_epochs if _adapter_kind(recipe) == "full" else 1),
            num_epochs=self.plan.num_epochs,
            metadata=_export_metadata(recipe, self.dataset, self.plan),
            # Only sharded engines need a gather; elsewhere every process holds the whole live weights.
            gather=self._gather_weights if describe_engine(accelerator)[1] else None,
            is_main=accelerator.is_main_process,
        )
        # Samples come after the export, from the live model (no reload).
        self.sampler = build_sampler(recipe, self.model, sample_prompts, self.plan.num_epochs, self.stop)
        if recipe.train.report_to:
            accelerator.init_trackers(recipe.name, config={"plan": str(self.plan.as_dict())})
        self.states = StateManager(
            accelerator, self.run_dir / "state", dump_recipe(recipe), keep=recipe.train.keep_states
        )
        self.state = self._load_resume_state()

    def _gather_weights(self) -> dict[str, dict[str, Any]]:
        return gather_full_weights(
            self.accelerator, dict(zip(self.trainable_names, self.modules, strict=True))
        )

    def _claim_run_dir(self) -> None:
        """Main process: lock the run folder, remove what killed writes left behind, check the recipe
        against the one there, and write `recipe.resolved.toml`."""
        from loratk.core.checkpoint import RunLock, atomic_write_text, remove_stale_temporaries

        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            lock = RunLock(self.run_dir)
            lock.acquire()
        except OSError as err:
            raise RunDirError(
                f"{self.run_dir}: cannot write there ({err.strerror or err}); set output_dir (now "
                f"{self.recipe.output_dir!r}) to a folder you can write to"
            ) from None
        try:
            removed = remove_stale_temporaries(self.run_dir)
            if removed:
                self.logger.info(
                    f"removed {len(removed)} temporary file(s) an interrupted write left in {self.run_dir}",
                    main_process_only=True,
                )
            self._prepare_run_dir()
            atomic_write_text(self.run_dir / "recipe.resolved.toml", dump_recipe(self.recipe))
        except BaseException:
            lock.release()
            raise
        self.lock = lock

    def _prepare_run_dir(self) -> None:
        """Refuse a run directory that holds a different recipe, unless resuming it or overwriting; a run
        that never completed a step there (no state, no epoch file) has nothing to protect: start over."""
        from loratk.core.checkpoint import list_complete_states
        from loratk.recipe import recipe_diff

        if self.overwrite:
            _clear_run_outputs(self.run_dir, self.recipe.name)
            return
        previous = self.run_dir / "recipe.resolved.toml"
        if not previous.is_file():
            return
        diff = recipe_diff(previous.read_text(), self.recipe)
        if not diff:
            return
        if not list_complete_states(self.run_dir / "state") and not any(
            self.run_dir.glob("epoch*.safetensors")
        ):
            self.logger.info(
                f"{self.run_dir}: the run there never completed a step (no state, no epoch file); "
                "starting over with this recipe",
                main_process_only=True,
            )
            _clear_run_outputs(self.run_dir, self.recipe.name)
            return
        lines = "\n".join(f"    {d}" for d in diff)
        raise RunDirError(
            f"{self.run_dir} holds a run with a different recipe:\n{lines}\n"
            "  Pass --overwrite to start again there, or give this run another `name`."
        )

    def _finished_state(self) -> Any:
        """(state folder, counters) when the state to resume from already finished this recipe's training,
        else None. Needs no data and no model: epochs and max_steps are the recipe's."""
        from loratk.core.checkpoint import read_state

        if not self.candidates:
            return None
        path = self.candidates[0]
        state, _ = read_state(path)
        train = self.recipe.train
        if train.max_steps is not None:
            done = state.global_step >= train.max_steps and state.batches_done == 0
        else:
            done = state.epoch > train.epochs
        return (path, state) if done else None

    def _resume_candidates(self) -> list[Path]:
        from loratk.core.checkpoint import StateError, choose_state, read_state
        from loratk.recipe import recipe_diff

        if self.overwrite:
            return []
        usable = []
        for path in choose_state(self.run_dir / "state", self.recipe.train.resume):
            try:
                _, saved_recipe = read_state(path)
            except StateError as err:
                self.logger.warning(f"{err}; trying an older state", main_process_only=True)
                continue
            diff = recipe_diff(saved_recipe, self.recipe)
            if diff:
                lines = "\n".join(f"    {d}" for d in diff)
                raise RunDirError(
                    f"cannot resume from {path}: the recipe changed in ways that change the math:\n{lines}\n"
                    "  Only epochs, max_steps, logging, saving, export and sample settings may change. "
                    "Pass --overwrite to start again."
                )
            usable.append(path)
        return usable

    def _load_resume_state(self) -> Any:
        from loratk.core.checkpoint import StateError, TrainState

        for path in self.candidates:
            try:
                state = self.states.load(path, self.modules)
            except StateError as err:
                self.logger.warning(f"{err}; falling back to an older state", main_process_only=True)
                continue
            self.resume_from = path
            where = (
                f"epoch {state.epoch}, {state.batches_done} batch(es) into it"
                if state.batches_done
                else f"the start of epoch {state.epoch}"
            )
            self.logger.info(
                f"resuming from {path}: step {state.global_step}, at {where}", main_process_only=True
            )
            return state
        if self.candidates:
            # A failed load may have changed some weights or optimizer state: never train on from there.
            raise StateError(
                f"none of the {len(self.candidates)} saved state(s) in {self.run_dir / 'state'} could be loaded "
                "(see the warnings above); pass --overwrite to start again"
            )
        return TrainState()

    def train(self, step_hooks: Sequence[Any] = ()) -> Any:
        from loratk.core.loop import LoopResult, MetricsWriter, on_main_process, run_training

        if self.finished is not None:
            path, state = self.finished
            epochs = (
                f"max_steps = {self.recipe.train.max_steps}"
                if self.recipe.train.max_steps is not None
                else f"all {state.epoch - 1} epoch(s)"
            )
            self.logger.info(
                f"nothing to train: {path} finished {epochs} at step {state.global_step} (raise "
                "train.epochs to continue, or pass --overwrite to start again)",
                main_process_only=True,
            )
            return LoopResult(state=state)
        main = self.accelerator.is_main_process
        hooks = [self.exporter]
        if self.sampler is not None:
            hooks.append(on_main_process(self.accelerator, self.sampler))
            if main and self.resume_from is None:
                self.sampler.start()  # the base model's row of the grid, once per run
            self.accelerator.wait_for_everyone()
        resume_step = self.state.global_step if self.resume_from else None
        metrics = MetricsWriter(self.run_dir / "metrics.jsonl" if main else None, resume_step=resume_step)
        try:
            result = run_training(
                self.accelerator,
                objective=self.objective,
                modules=self.modules,
                optimizer=self.optimizer,
                lr_scheduler=self.lr_scheduler,
                dataloader=self.dataloader,
                plan=self.plan,
                seed=self.recipe.seed,
                max_grad_norm=self.recipe.train.max_grad_norm,
                log_every_n_steps=self.recipe.train.log_every_n_steps,
                metrics=metrics,
                epoch_hooks=hooks,
                step_hooks=step_hooks,
                state=self.state,
                save_state=self.states.save,
                save_every_n_steps=self.recipe.train.save_state_every_n_steps,
                max_nonfinite_steps=self.recipe.train.max_nonfinite_steps,
                stop=self.stop,
            )
        finally:
            metrics.close()
        self.logger.info(
            f"done: {result.global_step} steps; outputs in {self.run_dir}", main_process_only=True
        )
        return result

    def _write_skipped(self, report: Any) -> None:
        from loratk.data.check import SKIPPED_COLUMNS, write_report_csv

        path = self.run_dir / "skipped.csv"
        if self.recipe.data.on_bad_image != "skip":
            path.unlink(missing_ok=True)
            return
        write_report_csv(report.bad, path, SKIPPED_COLUMNS)
        if report.bad:
            self.logger.warning(
                f"skipped {len(report.bad)} image(s) with problems (data.on_bad_image = 'skip'); list: {path}",
                main_process_only=True,
            )

    def cleanup(self) -> None:
        if hasattr(self, "accelerator"):
            self.accelerator.end_training()
        if self.lock is not None:
            self.lock.release()


def train(recipe: Recipe, *, overwrite: bool = False, stop: Any = None) -> Path:
    """Run a recipe from start (or its newest state) to end; return the run directory."""
    run = TrainingRun(recipe, overwrite=overwrite, stop=stop)
    try:
        run.setup()
        run.train()
    finally:
        run.cleanup()
    return run.run_dir


def main(argv: Sequence[str] | None = None, prog: str = "python -m loratk.train") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv, prog)
    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"train.resume={json.dumps(args.resume)}")
    try:
        recipe = load_recipe(args.recipe, overrides)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from loratk.logs import configure_logging

    configure_logging()
    from loratk.core.checkpoint import OutputWriteError, StateError
    from loratk.core.interrupts import StopRequest, TrainingInterrupted, stop_when_parent_exits
    from loratk.core.loop import NonFiniteLossError
    from loratk.data.cache import CacheError
    from loratk.data.dataset import DataError
    from loratk.models.sdxl import ModelLoadError
    from loratk.prompts import PromptError

    if launcher_command() is not None:
        # A launcher killed on its own (`docker stop`, `kill PID`) must not leave the trainer running on.
        stop_when_parent_exits()
    resume_cmd = rerun_command(prog, argv)
    try:
        with StopRequest() as stop:
            train(recipe, overwrite=args.overwrite, stop=stop)
    except (
        DataError,
        CacheError,
        ModelLoadError,
        PromptError,
        RunDirError,
        LaunchError,
        StateError,
        ImportError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingInterrupted as err:
        print(f"{err.signal_name}: {err}. Resume with:\n  {resume_cmd}", file=sys.stderr)
        return err.exit_code
    except (NonFiniteLossError, OutputWriteError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"aborted (second Ctrl-C); the newest complete state can be resumed with:\n  {resume_cmd}",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
