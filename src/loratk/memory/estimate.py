"""Peak training memory of a recipe, predicted without a GPU and without weights.

The recipe's models are built from their configs on the meta device, go through the run's own setup calls
(`freeze_and_cast`, the adapter, checkpointing, the performance options), and get fake tensors (shapes and
dtypes, no storage) for the parts that live on the accelerator. The run's optimizer, denoiser and objective
then run one training step on a fake batch, as `core/loop.py` does it (forward under autocast, backward,
clipping, step, `zero_grad`), with `MemoryTracker` counting the live bytes. A second batch size gives the cost
per image, so the largest batch that fits a budget follows from the line.

Not modelled: cuDNN / cuBLAS workspaces, attention kernels' buffers, the CUDA context, the caching allocator's
rounding and fragmentation; `with_margin` adds `SAFETY_MARGIN_*` for them. Renders: `memory.render`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from loratk.memory.optimizer import mark_gradients, optimizer_params, warm_up_optimizer
from loratk.memory.tracker import MemoryTracker, PeakBreakdown

if TYPE_CHECKING:
    from loratk.memory.evaluators import EvaluatorEstimate
    from loratk.memory.render import RenderEstimate
    from loratk.recipe import Recipe

GIB = 2**30
# Added to every prediction before it is compared with a budget: the CUDA context and kernels' workspaces
# (~0.5 GiB) and the caching allocator's rounding and fragmentation (~8%). To be calibrated on the GPU suite.
SAFETY_MARGIN_FIXED = int(0.75 * GIB)
SAFETY_MARGIN_FRACTION = 0.08


class EstimateError(RuntimeError):
    """The recipe cannot be estimated (configs not found, an option the estimate cannot model)."""


def with_margin(peak_bytes: int | float) -> int:
    """The memory to plan for a predicted peak: the peak, its fractional margin, and the fixed margin."""
    return int(peak_bytes * (1 + SAFETY_MARGIN_FRACTION) + SAFETY_MARGIN_FIXED)


# ---------------------------------------------------------------- one step


@dataclass(frozen=True)
class StepEstimate:
    batch_size: int  # images per device (DreamBooth with prior preservation runs twice as many)
    peak: PeakBreakdown
    seconds: float


@dataclass
class _FakeRun:
    """A recipe's models, adapter, optimizer and objective on fake tensors, ready to step."""

    recipe: Any
    model: Any
    trainables: dict[str, torch.nn.Module]
    optimizer: Any
    objective: Any
    tracker: MemoryTracker
    mode: Any
    device_type: str
    weight_dtype: torch.dtype
    cached_latents: bool
    cached_text: bool
    extras: dict[str, Any] = field(default_factory=dict)


_GAN = "the estimate covers lora, dreambooth and dreambooth-lora; a GAN baseline holds a few million weights"


def _memory_view(recipe: Recipe) -> Recipe:
    """The recipe as the estimate builds it: what only CPU memory or speed depends on is left out (the
    extracted LoRA's CPU copy of the base weights; torch.compile; xformers, which needs a GPU)."""
    export = recipe.export.model_copy(update={"extract_lora_rank": None})
    perf = recipe.performance.model_copy(update={"compile_unet": False, "attention": "sdpa"})
    return recipe.model_copy(update={"export": export, "performance": perf})


@contextlib.contextmanager
def fake_run(recipe: Recipe, *, device_type: str = "cuda", real: bool = False) -> Iterator[_FakeRun]:
    """Build the recipe's training objects on fake tensors; the tracker counts from here on.

    `real`: the same objects on real CPU tensors with random weights (what the estimate is checked against:
    the same step, measured)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from loratk.components.caches import text_cache_off_reason
    from loratk.components.methods import method_of
    from loratk.components.strategies import build_denoiser
    from loratk.core.optim import build_optimizer
    from loratk.core.precision import resolve_dtype
    from loratk.models.family import enable_text_encoder_checkpointing, family_for_model, freeze_and_cast
    from loratk.models.performance import apply_performance_options

    recipe = _memory_view(recipe)
    method = method_of(recipe)
    if method.build_adapter is None:  # the GAN baselines
        raise EstimateError(f"method = {method.name!r} trains from scratch, without a base model: {_GAN}")
    family = family_for_model(recipe.model.path, recipe.model.family)
    if recipe.optim.name == "adamw8bit":
        raise EstimateError(
            "optim.name = 'adamw8bit': bitsandbytes' 8-bit states cannot run on fake tensors; estimate with "
            "optim.name=adamw (the plan prints what the 8-bit optimizer saves)"
        )
    from loratk.memory.autocast import checkpoint_under_rules
    from loratk.memory.bases import build_meta_model, load_model_configs, materialise_fake

    configs = load_model_configs(recipe.model.path, family)
    model = build_meta_model(family, configs, recipe.model.path)
    weight_dtype = resolve_dtype(recipe.train.mixed_precision)
    meta = torch.device("meta")
    # The same calls, in the same order, as `TrainingRun._setup_model`.
    adapter = method.build_adapter(recipe)
    freeze_and_cast(model, meta, weight_dtype, keep_fp32=adapter.fp32_parts(model))
    with meta:  # adapter layers are made on the meta device too (not on the CPU, then moved: seconds)
        adapter.apply(model)
    trainables = adapter.trainable_modules(model)
    if recipe.train.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
        for name, module in trainables.items():
            if name != "unet":
                enable_text_encoder_checkpointing(module)
        if device_type == "cuda" and weight_dtype != torch.float32:
            # A recomputed block runs inside backward, where no function mode of the forward is active; torch
            # restores its own autocast there, so the CUDA rules are restored the same way.
            model.unet.enable_gradient_checkpointing(checkpoint_under_rules(weight_dtype))
    perf = recipe.performance
    apply_performance_options(
        model.unet, attention=perf.attention, tf32=perf.tf32, channels_last=perf.channels_last
    )
    # On a GPU, parts the caches cover go to the CPU before training (`run.py`); the rest is on the card.
    cached_latents = method.caches and recipe.data.cache_latents
    cached_text = method.caches and text_cache_off_reason(recipe) is None
    offloaded = (["vae"] if cached_latents else []) + (list(model.text_encoders) if cached_text else [])
    on_device = [m for name, m in model.parts.items() if name not in offloaded or name in trainables]
    conditioning = {}
    if cached_text:  # the cached embeddings' shapes, from the encoders on the meta device
        with torch.no_grad():
            encoded = family.encode_prompts(model, ["a picture"], meta)
        conditioning = {key: (tuple(v.shape[1:]), v.dtype) for key, v in encoded.items()}
    tracker = MemoryTracker()
    mode = contextlib.nullcontext() if real else FakeTensorMode(allow_non_fake_inputs=True)
    with mode, tracker:
        materialise_fake(on_device, tracker, real=real)
        optimizer = build_optimizer(
            adapter.param_groups(model, recipe.train.learning_rate),
            recipe.optim.name,
            lr=recipe.train.learning_rate,
            weight_decay=recipe.optim.weight_decay,
            betas=recipe.optim.betas,
            eps=recipe.optim.eps,
            fused_backward=recipe.optim.fused_backward,
            max_grad_norm=recipe.train.max_grad_norm,
        )
        denoiser = build_denoiser(recipe, model, device=torch.device("cpu"), weight_dtype=weight_dtype)
        objective = method.build_objective(recipe, denoiser)
        tracker.watch_modules(dict(model.parts))
        try:
            yield _FakeRun(
                recipe, model, trainables, optimizer, objective, tracker, mode, device_type, weight_dtype,
                cached_latents, cached_text, {"device": torch.device("cpu"), "offloaded": offloaded, "configs": configs, "conditioning": conditioning, "real": real},
            )  # fmt: skip
        finally:
            tracker.close()
            if hasattr(optimizer, "remove_hooks"):
                optimizer.remove_hooks()


def build_fake_batch(run: _FakeRun, batch_size: int) -> dict[str, Any]:
    """A batch as the run's dataloader gives it: cached latents and text embeddings where the caches
    apply, pixels and captions where they do not (DreamBooth with prior preservation: instance + class)."""
    recipe, device = run.recipe, run.extras["device"]
    width, height = recipe.data.size
    images = batch_size
    batch: dict[str, Any] = {}
    if recipe.dreambooth is not None:
        batch["num_instance"] = batch_size
        if recipe.dreambooth.prior_preservation:
            images = 2 * batch_size
    vae = run.extras["configs"]["vae"]
    scale = 2 ** (len(vae["block_out_channels"]) - 1)
    if run.cached_latents:
        batch["latents"] = torch.randn(
            images, vae["latent_channels"], height // scale, width // scale, device=device
        )
    else:
        batch["pixel_values"] = torch.randn(images, 3, height, width, device=device)
    captions = ["a picture"] * images
    batch["captions"] = captions
    for key, (shape, dtype) in run.extras["conditioning"].items():  # cached text embeddings
        batch[key] = torch.randn(images, *shape, dtype=dtype, device=device)
    size = torch.tensor([[height, width]] * images, device=device)
    batch.update(original_sizes=size, crop_top_lefts=torch.zeros_like(size), target_sizes=size.clone())
    return batch


def _autocast(run: _FakeRun) -> Any:
    from loratk.memory.autocast import CudaAutocastRules

    if run.weight_dtype == torch.float32:
        return contextlib.nullcontext()
    if run.device_type == "cuda":
        return CudaAutocastRules(run.weight_dtype)
    return torch.autocast("cpu", dtype=run.weight_dtype)


def run_step(run: _FakeRun, batch_size: int, *, optimizer: bool = True) -> StepEstimate:
    """One training step on a fake batch, as `core/loop.py` runs it; the peak of that step.

    `optimizer=False` leaves out clipping and the (unfused) optimizer step: for a second point of the line
    when the first step peaked before them (their memory does not depend on the batch)."""
    start = time.perf_counter()
    tracker = run.tracker
    if not tracker.categories or "optimizer" not in tracker.categories.values():
        tracker.phase = "optimizer"
        warm_up_optimizer(run)
    for module in run.trainables.values():
        module.train()
    fused = hasattr(run.optimizer, "step_gate")
    if fused:
        run.optimizer.step_gate = lambda: True  # the loop's finite-loss gate, read without a host sync
    grads: list[torch.Tensor] = optimizer_params(run.optimizer)
    handles = mark_gradients(grads, tracker)
    batch = build_fake_batch(run, batch_size)
    tracker.reset_peak()
    try:
        tracker.phase = "forward"
        with _autocast(run):
            out = run.objective.compute_loss(batch)
        del batch
        tracker.phase = "backward"
        out.loss.backward()
        del out
        tracker.phase = "optimizer"
        if optimizer or fused:
            if run.recipe.train.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(grads, run.recipe.train.max_grad_norm)
            run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    finally:
        for h in handles:
            h.remove()
    return StepEstimate(batch_size, tracker.breakdown(), time.perf_counter() - start)


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True)
class MemoryEstimate:
    """Two step estimates and the line through them: peak(batch) = fixed + per_image x batch."""

    points: tuple[StepEstimate, StepEstimate]
    fixed_bytes: float
    per_image_bytes: float
    seconds: float
    renders: tuple[RenderEstimate, ...] = ()  # class images and samples, when asked for
    evaluators: tuple[EvaluatorEstimate, ...] = ()  # the image metrics' models, when asked for

    def peak_bytes(self, batch_size: int) -> float:
        return self.fixed_bytes + self.per_image_bytes * batch_size

    def max_batch(self, budget_bytes: int) -> int:
        """The largest batch whose peak, with the safety margin, fits `budget_bytes` (0: none fits)."""
        room = (budget_bytes - SAFETY_MARGIN_FIXED) / (1 + SAFETY_MARGIN_FRACTION) - self.fixed_bytes
        if self.per_image_bytes <= 0:
            return 0 if room < self.per_image_bytes else 10**6
        return max(0, math.floor(room / self.per_image_bytes + 1e-9))


def estimate_step(
    recipe: Recipe, batch_size: int | None = None, *, device_type: str = "cuda"
) -> StepEstimate:
    """The peak of one training step of `recipe` at `batch_size` (default: the recipe's)."""
    batch_size = batch_size or _recipe_batch(recipe)
    with fake_run(recipe, device_type=device_type) as run:
        return run_step(run, batch_size)


class NothingFits(EstimateError):
    """The weights and the optimizer state alone, before any image, exceed the budget."""

    def __init__(self, resident_bytes: int, budget_bytes: int):
        self.resident_bytes, self.budget_bytes = resident_bytes, budget_bytes
        super().__init__(
            f"nothing fits: the weights and the optimizer state alone take {resident_bytes / GIB:.2f} GiB "
            f"({with_margin(resident_bytes) / GIB:.2f} GiB with the safety margin) of "
            f"{budget_bytes / GIB:.2f} GiB, before any image"
        )


def estimate_memory(
    recipe: Recipe,
    batch_sizes: tuple[int, int] | None = None,
    *,
    device_type: str = "cuda",
    budget_bytes: int | None = None,
    renders: bool = False,
    evaluators: bool = False,
    parallel: bool = False,
) -> MemoryEstimate:
    """Steps at two batch sizes (default: the recipe's and one more, or 1 and 2 for `auto`) and their line.

    `budget_bytes`: `NothingFits` before any step if the weights and the optimizer state alone exceed it.
    `renders`: class images (before the optimizer has state) and samples (after a step), `memory.render`;
    `evaluators`: each image-metric model beside the run's state, `memory.evaluators`. `parallel`: the second
    step and the samples in a forked process beside the rest, where it can (the same numbers, faster)."""
    from loratk.memory.evaluators import build_meta_evaluators, run_evaluator
    from loratk.memory.forked import Forked, can_fork, decode_point, encode_point
    from loratk.memory.render import render_jobs, run_render

    start = time.perf_counter()
    if batch_sizes is None:
        b = _recipe_batch(recipe, default=1)
        batch_sizes = (b, b + 1) if b > 1 else (1, 2)
    jobs = render_jobs(recipe) if renders else []
    meta_evaluators = build_meta_evaluators(recipe) if evaluators else []
    done: list[RenderEstimate] = []
    with fake_run(recipe, device_type=device_type) as run:
        done += [run_render(run, job) for job in jobs if job.what == "class images"]
        warm_up_optimizer(run)
        if budget_bytes is not None and with_margin(run.tracker.current) > budget_bytes:
            raise NothingFits(run.tracker.current, budget_bytes)

        def second_point() -> tuple[StepEstimate, list[RenderEstimate]]:
            # No optimizer phase: its memory does not depend on the batch (see below). The samples come
            # after a step, as in the run (the optimizer's state held, the gradients freed).
            step = run_step(run, batch_sizes[1], optimizer=False)
            return step, [run_render(run, job) for job in jobs if job.what != "class images"]

        if parallel and can_fork():
            child = Forked(lambda: encode_point(*second_point()))
            try:
                first = run_step(run, batch_sizes[0])
                scored = [run_evaluator(run, e, recipe.eval.batch_size) for e in meta_evaluators]
            except BaseException:
                child.kill()
                raise
            second, samples = decode_point(child.result())
        else:
            first = run_step(run, batch_sizes[0])
            second, samples = second_point()
            scored = [run_evaluator(run, e, recipe.eval.batch_size) for e in meta_evaluators]
        if first.peak.phase == "optimizer" and first.peak.total > second.peak.total:
            second = StepEstimate(second.batch_size, first.peak, second.seconds)  # the same phase, peaking
        done += samples
    per_image = (second.peak.total - first.peak.total) / (second.batch_size - first.batch_size)
    fixed = first.peak.total - per_image * first.batch_size
    return MemoryEstimate(
        (first, second), fixed, per_image, time.perf_counter() - start, tuple(done), tuple(scored)
    )


def _recipe_batch(recipe: Recipe, default: int = 1) -> int:
    batch = recipe.train.batch_size
    return batch if isinstance(batch, int) else default
