"""`python -m loratk.train RECIPE.toml [section.key=value ...]`: load the recipe, build, run.

Usually started as `accelerate launch -m loratk.train recipes/quickstart.toml`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loratk.recipe import Recipe, RecipeError, dump_recipe, load_recipe


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loratk.train",
        description="Train an SDXL adapter from a TOML recipe.",
        epilog="example: accelerate launch -m loratk.train recipes/ukiyoe.toml train.epochs=3 lora.rank=64",
    )
    parser.add_argument("recipe", help="path to a TOML recipe (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="recipe overrides: section.key=value (TOML values)")
    return parser.parse_args(argv)


# ---------------------------------------------------------------- builders (recipe -> plain arguments)


def build_adapter(recipe: Recipe) -> Any:
    from loratk.adapters.lora import LoraAdapter

    return LoraAdapter(
        rank=recipe.lora.rank,
        alpha=recipe.lora.scale_alpha,
        dropout=recipe.lora.dropout,
        targets=recipe.lora.targets,
        train_text_encoders=recipe.lora.train_text_encoders,
        text_encoder_lr=recipe.lora.text_encoder_lr,
        export_dtype=recipe.export.dtype,
        export_diffusers=recipe.export.diffusers,
    )


def build_objective(recipe: Recipe, model: Any, *, device: Any, weight_dtype: Any) -> Any:
    from loratk.objectives.caption import CaptionObjective
    from loratk.objectives.denoising import SDXLDenoiser

    denoiser = SDXLDenoiser(
        model,
        device=device,
        weight_dtype=weight_dtype,
        prediction_type=recipe.model.prediction_type,
        noise_offset=recipe.train.noise_offset,
        min_snr_gamma=recipe.train.min_snr_gamma,
        train_text_encoders=recipe.lora.train_text_encoders,
    )
    return CaptionObjective(denoiser)


def build_dataset(recipe: Recipe) -> Any:
    from loratk.data.dataset import ImageCaptionDataset, Record, scan_image_folder

    records = scan_image_folder(recipe.data.dir, recipe.data.caption_ext)
    records = [r for r in records for _ in range(recipe.data.repeats)]
    return ImageCaptionDataset(
        [Record(r.path, r.caption) for r in records],
        recipe.data.size,
        center_crop=recipe.data.center_crop,
        random_flip=recipe.data.random_flip,
        caption_dropout=recipe.data.caption_dropout,
        seed=recipe.seed,
    )


def load_sample_prompts(recipe: Recipe) -> list[Any]:
    """The `[sample]` prompts as parsed lines (empty when sampling is off); file problems surface here."""
    from loratk.prompts import load_prompts_file, parse_prompt_line

    if recipe.sample.prompts_file:
        return load_prompts_file(recipe.sample.prompts_file, allow_lora_tags=False)
    return [parse_prompt_line(line) for line in recipe.sample.prompts]


def build_sampler(recipe: Recipe, model: Any, prompts: list[Any], num_epochs: int) -> Any:
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
    )


def _export_metadata(recipe: Recipe, dataset: Any, plan: Any) -> Any:
    import loratk
    from loratk.export.formats import build_kohya_metadata, compute_tag_frequency

    unique = {r.path: r.caption for r in dataset.records}
    tags = compute_tag_frequency({Path(recipe.data.dir).name: list(unique.values())})
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

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.run_dir = recipe.run_dir

    def setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.logging import get_logger
        from accelerate.utils import set_seed

        from loratk.core.checkpoint import atomic_write_text
        from loratk.core.optim import build_lr_scheduler, build_optimizer
        from loratk.data.dataset import build_dataloader
        from loratk.export.epochs import EpochExporter
        from loratk.models.sdxl import DTYPES, freeze_and_cast, load_sdxl
        from loratk.plan import compute_plan

        recipe = self.recipe
        self.logger = get_logger("loratk.train")
        self.accelerator = accelerator = Accelerator(
            mixed_precision=recipe.train.mixed_precision,
            gradient_accumulation_steps=recipe.train.gradient_accumulation_steps,
            log_with=recipe.train.report_to or None,
            project_dir=str(self.run_dir),
            step_scheduler_with_optimizer=False,
        )
        set_seed(recipe.seed)

        # Data and prompt-file problems surface before any model is loaded.
        self.dataset = build_dataset(recipe)
        sample_prompts = load_sample_prompts(recipe)
        if accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "recipe.resolved.toml", dump_recipe(recipe))
            (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)

        self.weight_dtype = DTYPES[recipe.train.mixed_precision]
        self.model = load_sdxl(
            recipe.model.path,
            vae=recipe.model.vae,
            revision=recipe.model.revision,
            variant=recipe.model.variant,
            single_file_config=recipe.model.single_file_config,
        )
        freeze_and_cast(self.model, accelerator.device, self.weight_dtype)
        self.adapter = build_adapter(recipe)
        self.adapter.apply(self.model)
        trainables = self.adapter.trainable_modules(self.model)
        if recipe.train.gradient_checkpointing:
            self.model.unet.enable_gradient_checkpointing()
            for name, module in trainables.items():
                if name != "unet":
                    module.gradient_checkpointing_enable()

        dataloader = build_dataloader(
            self.dataset,
            batch_size=recipe.train.batch_size,
            seed=recipe.seed,
            num_workers=recipe.data.num_workers,
        )
        optimizer = build_optimizer(
            self.adapter.param_groups(self.model, recipe.train.learning_rate),
            recipe.optim.name,
            lr=recipe.train.learning_rate,
            weight_decay=recipe.optim.weight_decay,
            betas=recipe.optim.betas,
            eps=recipe.optim.eps,
        )
        *self.modules, self.optimizer, self.dataloader = accelerator.prepare(
            *trainables.values(), optimizer, dataloader
        )
        self.plan = compute_plan(
            num_examples=len(self.dataset),
            batches_per_epoch=len(self.dataloader),
            per_device_batch=recipe.train.batch_size,
            gradient_accumulation_steps=recipe.train.gradient_accumulation_steps,
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
        self.exporter = EpochExporter(
            adapter=self.adapter,
            model=self.model,
            run_dir=self.run_dir,
            name=recipe.name,
            every_n_epochs=recipe.export.every_n_epochs,
            num_epochs=self.plan.num_epochs,
            metadata=_export_metadata(recipe, self.dataset, self.plan),
        )
        # Samples come after the export, from the live model (no reload).
        self.sampler = build_sampler(recipe, self.model, sample_prompts, self.plan.num_epochs)
        if recipe.train.report_to:
            accelerator.init_trackers(recipe.name, config={"plan": str(self.plan.as_dict())})

    def train(self) -> Any:
        from loratk.core.loop import MetricsWriter, run_training

        main = self.accelerator.is_main_process
        hooks = [self.exporter]
        if self.sampler is not None:
            hooks.append(self.sampler)
            if main:
                self.sampler.start()  # the base model's row of the grid
            self.accelerator.wait_for_everyone()
        metrics = MetricsWriter(self.run_dir / "metrics.jsonl" if main else None)
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
            )
        finally:
            metrics.close()
        self.logger.info(
            f"done: {result.global_step} steps; outputs in {self.run_dir}", main_process_only=True
        )
        return result

    def cleanup(self) -> None:
        self.accelerator.end_training()


def train(recipe: Recipe) -> Path:
    """Run a recipe from start to end; return the run directory."""
    run = TrainingRun(recipe)
    run.setup()
    try:
        run.train()
    finally:
        run.cleanup()
    return run.run_dir


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for noisy in ("httpx", "huggingface_hub", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from loratk.data.dataset import DataError
    from loratk.models.sdxl import ModelLoadError
    from loratk.prompts import PromptError

    try:
        train(recipe)
    except (DataError, ModelLoadError, PromptError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
