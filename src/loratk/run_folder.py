"""A run's folder: claimed (locked, checked writable, cleaned of what killed writes left) with the recipe
checked against the one there, and the choice of the state to resume from."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from accelerate.logging import get_logger

from loratk.recipe import Recipe, dump_recipe, recipe_diff

logger = get_logger(__name__)


class RunDirError(RuntimeError):
    pass


def clear_run_outputs(run_dir: Path, name: str) -> None:
    """Delete a run's states, samples, metrics and adapter files (`--overwrite`)."""
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


def claim_run_folder(recipe: Recipe, *, overwrite: bool) -> Any:
    """Main process: lock the run folder, remove what killed writes left behind, check the recipe against
    the one there, and write `recipe.resolved.toml`. Returns the held lock."""
    from loratk.core.checkpoint import RunLock
    from loratk.files import atomic_write_text, remove_stale_temporaries

    run_dir = recipe.run_dir
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(run_dir)
        lock.acquire()
    except OSError as err:
        raise RunDirError(
            f"{run_dir}: cannot write there ({err.strerror or err}); set output_dir (now "
            f"{recipe.output_dir!r}) to a folder you can write to"
        ) from None
    try:
        removed = remove_stale_temporaries(run_dir)
        if removed:
            logger.info(
                f"removed {len(removed)} temporary file(s) an interrupted write left in {run_dir}",
                main_process_only=True,
            )
        _check_recipe_there(recipe, overwrite=overwrite)
        atomic_write_text(run_dir / "recipe.resolved.toml", dump_recipe(recipe))
    except BaseException:
        lock.release()
        raise
    return lock


def _check_recipe_there(recipe: Recipe, *, overwrite: bool) -> None:
    """Refuse a run folder that holds a different recipe, unless resuming it or overwriting; a run that
    never completed a step there (no state, no epoch file) has nothing to protect: start over."""
    from loratk.core.checkpoint import list_complete_states

    run_dir = recipe.run_dir
    if overwrite:
        clear_run_outputs(run_dir, recipe.name)
        return
    previous = run_dir / "recipe.resolved.toml"
    if not previous.is_file():
        return
    diff = recipe_diff(previous.read_text(), recipe)
    if not diff:
        return
    if not list_complete_states(run_dir / "state") and not any(run_dir.glob("epoch*.safetensors")):
        logger.info(
            f"{run_dir}: the run there never completed a step (no state, no epoch file); "
            "starting over with this recipe",
            main_process_only=True,
        )
        clear_run_outputs(run_dir, recipe.name)
        return
    lines = "\n".join(f"    {d}" for d in diff)
    raise RunDirError(
        f"{run_dir} holds a run with a different recipe:\n{lines}\n"
        "  Pass --overwrite to start again there, or give this run another `name`."
    )


def resume_candidates(recipe: Recipe, *, overwrite: bool) -> list[Path]:
    """The states to resume from, best first (none with `overwrite`); a changed recipe is refused."""
    from loratk.core.checkpoint import StateError, choose_state, read_state

    if overwrite:
        return []
    usable = []
    for path in choose_state(recipe.run_dir / "state", recipe.train.resume):
        try:
            _, saved_recipe = read_state(path)
        except StateError as err:
            logger.warning(f"{err}; trying an older state", main_process_only=True)
            continue
        diff = recipe_diff(saved_recipe, recipe)
        if diff:
            lines = "\n".join(f"    {d}" for d in diff)
            raise RunDirError(
                f"cannot resume from {path}: the recipe changed in ways that change the math:\n{lines}\n"
                "  Only epochs, max_steps, logging, saving, export and sample settings may change. "
                "Pass --overwrite to start again."
            )
        usable.append(path)
    return usable


def finished_state(recipe: Recipe, candidates: list[Path]) -> Any:
    """(state folder, counters) when the state to resume from already finished this recipe's training,
    else None. Needs no data and no model: epochs and max_steps are the recipe's."""
    from loratk.core.checkpoint import read_state

    if not candidates:
        return None
    state, _ = read_state(candidates[0])
    train = recipe.train
    if train.max_steps is not None:
        done = state.global_step >= train.max_steps and state.batches_done == 0
    else:
        done = state.epoch > train.epochs
    return (candidates[0], state) if done else None


def write_skipped(recipe: Recipe, report: Any) -> None:
    """`skipped.csv`: the images a `data.on_bad_image = "skip"` run leaves out (removed otherwise)."""
    from loratk.data.check_report import SKIPPED_COLUMNS, write_report_csv

    path = recipe.run_dir / "skipped.csv"
    if recipe.data.on_bad_image != "skip":
        path.unlink(missing_ok=True)
        return
    write_report_csv(report.bad, path, SKIPPED_COLUMNS)
    if report.bad:
        logger.warning(
            f"skipped {len(report.bad)} image(s) with problems (data.on_bad_image = 'skip'); list: {path}",
            main_process_only=True,
        )
