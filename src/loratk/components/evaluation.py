"""The evaluation of a run from its recipe: the validation loss hook, the image-metric hook, the report."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loratk.recipe import Recipe


def validation_records(recipe: Recipe, dataset: Any) -> list[Any]:
    """The held-out images of the dataset, then those of `eval.folder`."""
    from loratk.components.methods import method_of

    records = list(dataset.held_out)
    if recipe.eval.folder is not None:
        records += method_of(recipe).validation_records(recipe, Path(recipe.eval.folder))
    return records


def build_validation(
    recipe: Recipe,
    model: Any,
    dataset: Any,
    accelerator: Any,
    *,
    weight_dtype: Any,
    num_epochs: int,
) -> Any:
    """The validation-loss epoch hook over the plain (unprepared) model, or None without held-out images.

    Built before the frozen encoders may leave the GPU: latents and (frozen) text conditioning are encoded
    here, once."""
    from loratk.components.methods import method_of
    from loratk.components.strategies import build_denoiser
    from loratk.data.dataset import ImageCaptionDataset
    from loratk.evaluation.validation import ValidationLoss, build_validation_items

    records = validation_records(recipe, dataset)
    if not records:
        return None
    plain = ImageCaptionDataset(records, recipe.data.size, center_crop=True, seed=recipe.seed)
    denoiser = build_denoiser(recipe, model, device=accelerator.device, weight_dtype=weight_dtype)
    trains_text = method_of(recipe).trains_text_encoders(recipe)
    items = build_validation_items(
        denoiser,
        plain,
        seed=recipe.seed,
        timesteps_per_image=recipe.eval.val_timesteps,
        encode_text=not trains_text,
    )
    return ValidationLoss(
        denoiser,
        items,
        modules=list(model.parts.values()),
        batch_size=recipe.train.batch_size,
        every_n_epochs=recipe.eval.val_every_n_epochs,
        num_epochs=num_epochs,
        autocast=accelerator.autocast,
    )


def real_image_paths(dataset: Any) -> list[Path]:
    """The subject's (or style's) own images: every distinct training image and the held-out ones."""
    paths = [r.path for r in [*dataset.records, *dataset.held_out]]
    return list(dict.fromkeys(paths))


def build_eval_settings(recipe: Recipe, device: Any, weight_dtype: Any) -> Any:
    """Which evaluators score and how: on a GPU in the training's half precision, else in fp32."""
    import torch

    from loratk.evaluation.evaluators import evaluator_dtype
    from loratk.evaluation.scoring import EvalSettings

    cfg = recipe.eval
    return EvalSettings(
        metrics=list(cfg.metrics),
        evaluators={kind: cfg.evaluator(kind) for kind in ("clip", "dino", "dinov2", "inception")},
        device=str(device),
        dtype=evaluator_dtype(torch.device(device).type, weight_dtype),
        batch_size=cfg.batch_size,
        cache_dir=Path(recipe.data.cache_dir) / "eval-features" if recipe.data.cache_dir else None,
    )


def build_eval_renderers(
    recipe: Recipe, model: Any, num_epochs: int, stop: Any = None, run_dir: Path | None = None
) -> tuple[Any, Any]:
    """The sample hooks of the `[eval]` prompts (scored beside `[sample]`) and of the leak prompts (base vs
    epoch, for PSNR/SSIM) under `run_dir/eval/` (default: the recipe's run folder); each None when it has no
    prompts."""
    from loratk.components.hooks import build_render_hook
    from loratk.prompts import parse_prompt_line

    cfg = recipe.eval
    seeds = cfg.seeds or recipe.sample.seeds

    def hook(lines: list[str], folder: str) -> Any:
        if not lines:
            return None
        prompts = [parse_prompt_line(line) for line in lines]
        return build_render_hook(
            recipe,
            model,
            prompts,
            (run_dir or recipe.run_dir) / "eval" / folder,
            seeds=seeds,
            every_n_epochs=1,  # the evaluation hook decides which epochs
            num_epochs=num_epochs,
            at_start=True,
            stop=stop,
        )

    leaks = cfg.leak_prompts if {"psnr", "ssim"} & set(cfg.metrics) else []
    return hook(cfg.prompts, "prompts"), hook(leaks, "leak")


def build_image_eval(
    recipe: Recipe,
    model: Any,
    dataset: Any,
    sampler: Any,
    accelerator: Any,
    *,
    weight_dtype: Any,
    num_epochs: int,
    stop: Any = None,
) -> Any:
    """The image-metric epoch hook (main process), or None when the recipe computes none during training."""
    from loratk.evaluation.hook import ImageEvalHook

    cfg = recipe.eval
    if not cfg.scores_while_training:
        return None
    prompts, leak = build_eval_renderers(recipe, model, num_epochs, stop)
    if sampler is None and prompts is None:
        return None  # no [sample] or [eval] prompts: no image to score (the leak pairs alone say too little)
    return ImageEvalHook(
        run_dir=recipe.run_dir,
        settings=build_eval_settings(recipe, accelerator.device, weight_dtype),
        real=real_image_paths(dataset),
        samples=sampler,
        renderers=[h for h in (prompts, leak) if h is not None],
        leak=leak,
        every_n_epochs=cfg.every_n_epochs,
        num_epochs=num_epochs,
    )


class ReportHook:
    """The epoch hook (main process) that rebuilds `report.html`; a failure is logged, training goes on."""

    def __init__(self, run_dir: Path, *, metric: str, tolerance: float):
        from accelerate.logging import get_logger

        self.run_dir = Path(run_dir)
        self.metric = metric
        self.tolerance = tolerance
        self.logger = get_logger("loratk.report")

    def __call__(self, epoch: int, global_step: int) -> None:
        from loratk.evaluation.report import write_report

        try:
            write_report(self.run_dir, metric=self.metric, tolerance=self.tolerance)
        except Exception as err:  # noqa: BLE001 - the report must never end a training run
            self.logger.error(
                f"report.html not rebuilt ({type(err).__name__}: {err})", main_process_only=True
            )

    def finish(self) -> None:
        """The last rebuild, then the best epoch and why, for the user."""
        from loratk.evaluation.best import choose_best_epoch
        from loratk.evaluation.report import REPORT_NAME
        from loratk.evaluation.runs import load_run

        self(0, 0)
        try:
            best = choose_best_epoch(load_run(self.run_dir), self.metric, self.tolerance)
        except Exception as err:  # noqa: BLE001
            self.logger.error(f"best epoch not chosen ({type(err).__name__}: {err})", main_process_only=True)
            return
        if best is not None:
            self.logger.info(f"best epoch: {best.epoch} ({best.reason})", main_process_only=True)
        self.logger.info(f"report: {self.run_dir / REPORT_NAME}", main_process_only=True)


def build_report_hook(recipe: Recipe) -> ReportHook:
    return ReportHook(recipe.run_dir, metric=recipe.eval.best_metric, tolerance=recipe.eval.best_tolerance)
