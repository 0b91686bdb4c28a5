"""The epoch hooks of a run from its recipe: the exporter (and the metadata it writes), the sampler."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loratk.recipe import Recipe


def load_sample_prompts(recipe: Recipe) -> list[Any]:
    """The `[sample]` prompts as parsed lines (empty when sampling is off); file problems surface here."""
    from loratk.prompts import load_prompts_file, parse_prompt_line

    if recipe.sample.prompts_file:
        return load_prompts_file(recipe.sample.prompts_file, allow_lora_tags=False)
    return [parse_prompt_line(line) for line in recipe.sample.prompts]


def build_sampler(
    recipe: Recipe,
    model: Any,
    prompts: list[Any],
    num_epochs: int,
    stop: Any = None,
    run_dir: Path | None = None,
) -> Any:
    """The epoch hook that renders `[sample]` prompts into `run_dir/samples` (default: the recipe's run
    folder), or None when the recipe has no prompts."""
    if not prompts:
        return None
    cfg = recipe.sample
    return build_render_hook(
        recipe,
        model,
        prompts,
        (run_dir or recipe.run_dir) / "samples",
        seeds=cfg.seeds,
        every_n_epochs=cfg.every_n_epochs,
        num_epochs=num_epochs,
        at_start=cfg.at_start,
        stop=stop,
    )


def build_render_hook(
    recipe: Recipe,
    model: Any,
    prompts: list[Any],
    samples_dir: Path,
    *,
    seeds: list[int],
    every_n_epochs: int,
    num_epochs: int,
    at_start: bool,
    stop: Any = None,
) -> Any:
    """A hook that renders `prompts` x `seeds` with the `[sample]` settings into `samples_dir`."""
    from loratk.sampling.hook import SampleHook
    from loratk.sampling.specs import expand_prompts

    cfg = recipe.sample
    width, height = recipe.sample_size
    specs = expand_prompts(
        prompts,
        seeds=seeds,
        width=width,
        height=height,
        steps=cfg.steps,
        guidance=cfg.guidance,
        negative_prompt=cfg.negative_prompt,
    )
    return SampleHook(
        model=model,
        specs=specs,
        samples_dir=samples_dir,
        scheduler=cfg.scheduler,
        every_n_epochs=every_n_epochs,
        num_epochs=num_epochs,
        at_start=at_start,
        model_name=recipe.model.path,
        prediction_type=recipe.model.prediction_type,
        should_stop=(lambda: stop.requested) if stop is not None else None,
    )


def build_export_metadata(recipe: Recipe, dataset: Any, plan: Any) -> Any:
    """(epoch, step) -> the training facts every written file records; the adapter adds what the file is."""
    import loratk
    from loratk.export.formats import build_training_metadata, compute_tag_frequency
    from loratk.recipe import dump_recipe

    unique = {r.path: r for r in dataset.records}
    by_subset: dict[str, list[str]] = {}
    for record in unique.values():
        folder = record.subset or str(record.path.parent)
        by_subset.setdefault(Path(folder).name, []).append(record.caption)
    tags = compute_tag_frequency(by_subset)
    recipe_toml = dump_recipe(recipe)

    def metadata(epoch: int, global_step: int) -> dict[str, str]:
        return build_training_metadata(
            name=recipe.name if epoch >= plan.num_epochs else f"{recipe.name}-epoch{epoch}",
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


def build_exporter(
    recipe: Recipe, adapter: Any, model: Any, dataset: Any, plan: Any, accelerator: Any, gather: Any
) -> Any:
    """The epoch hook that writes `epochN.safetensors` (and `<name>.safetensors` after the last epoch)."""
    from loratk.components.methods import method_of
    from loratk.core.engine import describe_engine
    from loratk.export.epochs import EpochExporter

    final_only = method_of(recipe).final_export_only
    return EpochExporter(
        adapter=adapter,
        model=model,
        run_dir=recipe.run_dir,
        name=recipe.name,
        every_n_epochs=recipe.export.every_n_epochs or (plan.num_epochs if final_only else 1),
        num_epochs=plan.num_epochs,
        metadata=build_export_metadata(recipe, dataset, plan),
        # Only sharded engines need a gather; elsewhere every process holds the whole live weights.
        gather=gather if describe_engine(accelerator)[1] else None,
        is_main=accelerator.is_main_process,
    )
