"""`loratk eval RUN`: score every epoch of a run folder after (or during) training.

It reads the run's `recipe.resolved.toml`, renders the `[sample]`, `[eval]` and leak images that are missing
(a PNG already there is reused when its parameters text, which names the prompt, seed, size, steps, CFG,
sampler, model and epoch, is what this evaluation would render), scores the base model (epoch 0) and each
epoch like the training-time hook, appends the rows to `eval.jsonl` and rebuilds `report.html`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RECIPE_FILE = "recipe.resolved.toml"
_EPOCH_FILE = re.compile(r"epoch(\d+)\.safetensors")


class EvalRunError(ValueError):
    """A run folder that cannot be evaluated; the message names the file and what to do."""


@dataclass(frozen=True)
class EpochScore:
    epoch: int  # 0 = the base model
    result: Any  # evaluation.scoring.EvalResult
    rendered: int  # images rendered now (the others were reused)


def epoch_files(run_dir: Path) -> dict[int, Path]:
    """`epochN.safetensors` of the run by N (full DreamBooth's `.lora.` companions are not epoch files)."""
    found = {}
    for path in run_dir.glob("epoch*.safetensors"):
        match = _EPOCH_FILE.fullmatch(path.name)
        if match:
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def load_run_recipe(run_dir: Path) -> Any:
    from loratk.recipe import RecipeError, load_recipe

    path = run_dir / RECIPE_FILE
    if not path.is_file():
        raise EvalRunError(f"{path}: not found; is {run_dir} a loratk run folder?")
    try:
        return load_recipe(path)
    except RecipeError as err:
        raise EvalRunError(f"{path}: {err}") from None


def _wanted_text(hook: Any, spec: Any, epoch: int) -> str:
    from loratk.sampling.images import image_parameters

    loras = () if epoch == 0 else ((f"epoch{epoch}", 1.0),)
    return image_parameters(
        spec, scheduler=hook.scheduler, model=hook.model_name, loras=loras, epoch=epoch or None
    )


def missing_images(hook: Any, epoch: int) -> list[Any]:
    """The specs of `hook` whose PNG for `epoch` is absent or was rendered with other settings."""
    from PIL import Image

    from loratk.evaluation.hook import folder_of

    folder = folder_of(hook.samples_dir, epoch)
    missing = []
    for spec in hook.specs:
        path = folder / spec.filename
        try:
            with Image.open(path) as image:
                text = image.text.get("parameters")
        except (OSError, ValueError):
            text = None
        if text != _wanted_text(hook, spec, epoch):
            missing.append(spec)
    return missing


def _load_pipeline(recipe: Any, epoch: int, files: dict[int, Path], full: bool, device: str) -> Any:
    """The pipeline that renders `epoch`: the run's base model (its VAE, revision, variant), with the epoch's
    LoRA, or the epoch's full checkpoint read with the base model's configs. bf16 on a GPU, else fp32."""
    import torch

    from loratk.adapters.lora_files import apply_lora, load_lora_file
    from loratk.components.strategies import load_recipe_model
    from loratk.models.family import freeze_and_cast
    from loratk.sampling.pipeline import build_pipeline

    cfg = recipe.model
    parts = load_recipe_model(recipe, str(files[epoch]) if epoch and full else None)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    freeze_and_cast(parts, torch.device(device), dtype)
    pipe = build_pipeline(parts, scheduler=recipe.sample.scheduler, prediction_type=cfg.prediction_type)
    if epoch and not full:
        apply_lora(pipe, load_lora_file(files[epoch]), f"epoch{epoch}", cfg.path)
    return pipe


def _render(pipe: Any, hook: Any, specs: Sequence[Any], epoch: int, bar: Any) -> None:
    from loratk.evaluation.hook import folder_of
    from loratk.sampling.images import save_png
    from loratk.sampling.pipeline import generate_images

    folder = folder_of(hook.samples_dir, epoch)
    for spec, image in generate_images(pipe, specs, progress=bar.update):
        save_png(image, folder / spec.filename, _wanted_text(hook, spec, epoch))


def evaluate_run(
    run_dir: str | Path,
    *,
    epochs: Sequence[int] | None = None,
    device: str | None = None,
    log: Any = print,
) -> list[EpochScore]:
    """Score the base model and every epoch with a file (or only `epochs`) of `run_dir`; see the module."""
    import torch
    from accelerate import Accelerator
    from tqdm.auto import tqdm
    from transformers.utils import logging as transformers_logging

    from loratk.components.evaluation import build_eval_renderers, build_eval_settings, real_image_paths
    from loratk.components.hooks import build_sampler, load_sample_prompts
    from loratk.components.methods import method_of
    from loratk.evaluation.hook import append_eval_row, collect_images
    from loratk.evaluation.report import write_report
    from loratk.evaluation.scoring import score_images
    from loratk.sampling.pipeline import free_memory

    transformers_logging.disable_progress_bar()  # one bar per model load is noise; ours count the images
    run_dir = Path(run_dir)
    recipe = load_run_recipe(run_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    files = epoch_files(run_dir)
    method = method_of(recipe)
    if method.trainer != "adapter":
        raise EvalRunError(
            f"{run_dir}: a {method.name} run scores its epochs while it trains (eval.jsonl); "
            "`loratk eval` renders and scores diffusion runs"
        )
    full = method.adapter == "full"
    last = max(files, default=recipe.train.epochs)
    sampler = build_sampler(recipe, None, load_sample_prompts(recipe), last, run_dir=run_dir)
    prompts, leak = build_eval_renderers(recipe, None, last, run_dir=run_dir)
    hooks = [h for h in (sampler, prompts, leak) if h is not None]
    if not hooks:
        raise EvalRunError(
            f"{run_dir / RECIPE_FILE}: no [sample], [eval] or leak prompts to render and score"
        )
    scored = [h for h in (sampler, prompts) if h is not None]
    dataset, _ = method.build_data(recipe, Accelerator(cpu=device == "cpu"))
    real = real_image_paths(dataset)
    settings = build_eval_settings(recipe, device, torch.bfloat16)
    wanted = sorted({0, *files} if epochs is None else set(epochs))
    scores = []
    for epoch in wanted:
        what = "base model" if epoch == 0 else f"epoch {epoch}"
        todo = [(hook, missing_images(hook, epoch)) for hook in hooks]
        todo = [(hook, specs) for hook, specs in todo if specs]
        if todo and epoch and epoch not in files:
            log(
                f"{what}: skipped: {sum(len(s) for _, s in todo)} image(s) missing and no epoch{epoch}.safetensors"
            )
            continue
        rendered = sum(len(specs) for _, specs in todo)
        if todo:
            pipe = _load_pipeline(recipe, epoch, files, full, device)
            with tqdm(total=rendered, desc=f"render {what}", unit="img") as bar:
                for hook, specs in todo:
                    _render(pipe, hook, specs, epoch, bar)
            del pipe
            free_memory()
        result = score_images(collect_images(epoch, scored=scored, leak=leak), real, settings)
        append_eval_row(run_dir, result.row(epoch))
        shown = ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items() if not k.endswith("_std"))
        log(f"{what}: {shown or 'no image metric'} ({rendered} rendered, {result.time_s:.1f}s scoring)")
        for note in result.notes:
            log(f"  note: {note}")
        scores.append(EpochScore(epoch=epoch, result=result, rendered=rendered))
    for hook in hooks:
        hook.rebuild_grid(up_to=last)  # the grids show what was rendered now too
    write_report(run_dir, metric=recipe.eval.best_metric, tolerance=recipe.eval.best_tolerance)
    return scores
