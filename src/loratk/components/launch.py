"""The launch of a run: the Accelerator for a recipe, what its engine can run, and the few collectives the
run itself needs (one process does the work and shares it; sharded weights gathered for export)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from loratk.core.engine import describe_engine

if TYPE_CHECKING:
    from loratk.recipe import Recipe


class LaunchError(RuntimeError):
    """The recipe asks for something the `accelerate launch` configuration cannot run."""


def use_cpu_for_multiprocess_launch() -> bool:
    """True for a multi-process launch (torchrun / accelerate's multi-GPU launcher) on a machine with no GPU:
    its processes then run on the CPU with gloo, where Accelerate would start each as a lone process.
    """
    import torch

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def resolve_accumulation(recipe: Recipe, num_processes: int) -> int:
    """Gradient accumulation steps: given directly, or derived from `train.global_batch_size`."""
    from loratk.recipe import RecipeError

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


def build_accelerator(recipe: Recipe) -> Any:
    """The one Accelerator of a run: mixed precision, the accumulation steps, trackers, non-blocking copies."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DataLoaderConfiguration

    cpu = use_cpu_for_multiprocess_launch()
    return Accelerator(
        cpu=cpu,
        mixed_precision=recipe.train.mixed_precision,
        gradient_accumulation_steps=resolve_accumulation(recipe, PartialState(cpu=cpu).num_processes),
        log_with=recipe.train.report_to or None,
        project_dir=str(recipe.run_dir),
        step_scheduler_with_optimizer=False,
        # Batches (pinned by the DataLoader) are copied to the device without blocking the host.
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
    )


def check_launch(recipe: Recipe, accelerator: Any, *, samples_during_training: bool) -> None:
    """Refuse, before any model loads, recipe options the launch's engine cannot run: every problem at
    once, each naming the key and a fix."""
    from loratk.components.methods import method_of

    engine, sharded = describe_engine(accelerator)
    method = method_of(recipe)
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
    if engine.startswith("DeepSpeed") and method.trains_text_encoders(recipe):
        problems.append(
            f"{engine} trains one model per run, and {method.adapter}.train_text_encoders = true adds the text "
            "encoders: set it to false, or launch with accelerate_configs/multi_gpu.yaml or fsdp.yaml"
        )
    if problems:
        lines = "\n".join(f"  {p}" for p in problems)
        raise LaunchError(f"this recipe cannot run on {engine}:\n{lines}")


def run_on_main_process(
    accelerator: Any, work: Any, errors: tuple[type[Exception], ...], *, share: bool = True
) -> Any:
    """Run `work()` on the main process alone and hand its result (with `share`; else the others get None),
    or one of its `errors`, to the other processes, so every rank goes on, or fails, the same way (the data
    preflight decodes every image once)."""
    if accelerator.num_processes == 1:
        return work()
    from accelerate.utils import broadcast_object_list

    outcome: list[Any] = [None]
    result = None
    if accelerator.is_main_process:
        try:
            result = work()
            outcome = [result if share else None]
        except errors as err:
            outcome = [err]
    broadcast_object_list(outcome, from_process=0)
    if isinstance(outcome[0], errors):
        raise outcome[0]
    return result if accelerator.is_main_process else outcome[0]


def gather_full_weights(accelerator: Any, modules: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Full state dicts of the (prepared) trained parts, by their plain names, through Accelerate's
    `get_state_dict`: a collective under FSDP and DeepSpeed ZeRO-3, which every rank calls and whose weights
    the main process receives."""
    return {name: accelerator.get_state_dict(module) for name, module in modules.items()}


class ProcessGroupHold:
    """Keeps the default process group alive until the run's DDP-wrapped models are gone, then lets it go.

    A DDP reducer that holds the last reference destroys the gloo process group while holding the GIL; a gloo
    worker that is still freeing its last collective's tensors needs the GIL, and the process hangs at exit
    (pytorch/pytorch#56297). Destroyed through its Python handle instead, the group releases the GIL first.
    """

    def __init__(self) -> None:
        self.group: Any = None

    def hold(self) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            self.group = dist.group.WORLD

    def release(self, error: BaseException | None = None) -> None:
        import gc
        import traceback

        if self.group is None:
            return
        if error is not None:
            traceback.clear_frames(error.__traceback__)  # the failed run's frames hold its models
        gc.collect()  # models and their reducers sit in reference cycles
        self.group = None
