"""Training-step speed and memory: the real loratk step on an SDXL or SD 1.5 UNet with random weights.

    python benchmarks/train_step.py                                   # CPU: tiny smoke of every configuration
    python benchmarks/train_step.py --full-size --memory-cap-gib 24   # GPU: full-size UNet, a 24 GiB card
    python benchmarks/train_step.py --full-size --configs b --no-memory-cap   # (b) on the whole GPU
    python benchmarks/train_step.py --full-size --configs c --profile prof    # then profile (c) into prof/

Each configuration builds the UNet from its config (no download), injects the adapter, builds the optimizer
from `core/optim.py`, and runs `core/loop.run_training` (accumulate, backward, clip, step: the same loop as
`loratk.train`) over synthetic cached latents and text embeddings, so no VAE or text encoder is on the device.

Reported per configuration: s/step (median after warm-up), images/s, peak memory of the training steps
(`torch.cuda.max_memory_reserved`), FLOPs per step (`torch.utils.flop_counter.FlopCounterMode`, counted once
per configuration on one image without gradient checkpointing, i.e. model FLOPs, not recomputation) and the
share of the GPU's dense bf16 peak those FLOPs reach.

(c) and (d) train as `loratk.train` trains methods "dreambooth" and "dreambooth-lora": `DreamBoothObjective`
on batches shaped as `collate_dreambooth` makes them ((d): 2 instance + 2 class examples), and (c) with the
fused backward step (`optim.fused_backward`: each weight steps from its gradient hook, so the full set of
gradients is never held). Unlike a real DreamBooth run, which encodes its few images every batch, the batches
here come cached: the benchmark times the UNet step, not the VAE or the text encoders.

(e) and (f) are the same steps on SD 1.5 (its UNet from its config; CLIP-L embeddings, no pooled embedding or
time ids): LoRA rank 32 at 512², batch 8, and full DreamBooth at 512², batch 4 (goal: 10 GiB or less).

Profiling: after the timed steps, `--profile DIR` runs one more step to warm the profiler up, then traces
`--profile-steps` (3) steps with `torch.profiler` (CPU and, on a GPU, CUDA activity; shapes recorded, no
stacks) and writes, per configuration, `DIR/<config>.trace.json`, a chrome trace with one `ProfilerStep#`
range per step (open it in https://ui.perfetto.dev or chrome://tracing), and `DIR/<config>.top.txt`, the 30
ops with the most self time (device time on a GPU, CPU time otherwise). Profiled steps are not timed: the
profiler slows them.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from loratk.models import base_configs

# The full-size SDXL 1.0 base UNet, built from its config (random weights, nothing downloaded).
SDXL_UNET_CONFIG = base_configs.SDXL_BASE_UNET_CONFIG
SDXL_UNET_PARAMETERS = base_configs.SDXL_BASE_UNET_PARAMETERS
# The full-size SD 1.5 UNet, the same way (configurations e and f).
SD15_UNET_CONFIG = base_configs.SD15_UNET_CONFIG
SD15_UNET_PARAMETERS = base_configs.SD15_UNET_PARAMETERS

# The recipe's defaults (`train.max_grad_norm`, `dreambooth.prior_loss_weight`).
MAX_GRAD_NORM = 1.0
PRIOR_LOSS_WEIGHT = 1.0

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), matched in order against torch.cuda.get_device_name().
BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("GH200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("RTX 4090", 165.2),
    ("RTX A6000", 154.8),
    ("RTX A5000", 111.1),
    ("A10G", 70.0),
)


@dataclass(frozen=True)
class BenchConfig:
    key: str
    label: str  # what it is; "{rank}" is filled in from `rank`, so the tiny version says r8, not r128
    method: str  # "lora" | "dreambooth" | "dreambooth-lora"
    width: int
    height: int
    batch_size: int  # images per step; with prior preservation, instance + class
    optimizer: str = "adafactor"
    rank: int | None = 128  # None = full fine-tuning
    targets: str = "all-linear"
    gradient_checkpointing: bool = True
    prior_preservation: bool = False
    fused_backward: bool = False  # optim.fused_backward: each weight steps inside backward
    family: str = "sdxl"  # the model family whose UNet trains: "sdxl" | "sd1"

    @property
    def what(self) -> str:
        return self.label.format(rank=self.rank)


CONFIGS = (
    BenchConfig("a", "seed recipe: LoRA r{rank} all-linear, Adafactor", "lora", 600, 400, 20),
    BenchConfig("b", "LoRA r{rank} all-linear, Adafactor", "lora", 1024, 1024, 8),
    BenchConfig(
        "c",
        "full DreamBooth, Adafactor",
        "dreambooth",
        1024,
        1024,
        4,
        rank=None,
        fused_backward=True,
    ),
    BenchConfig(
        "d",
        "DreamBooth-LoRA r{rank}, prior preservation 2+2",
        "dreambooth-lora",
        1024,
        1024,
        4,
        prior_preservation=True,
    ),
    BenchConfig("e", "SD 1.5 LoRA r{rank} all-linear, Adafactor", "lora", 512, 512, 8, rank=32, family="sd1"),
    BenchConfig(
        "f",
        "SD 1.5 full DreamBooth, Adafactor",
        "dreambooth",
        512,
        512,
        4,
        rank=None,
        fused_backward=True,
        family="sd1",
    ),
)


def unet_config_of(config: BenchConfig, *, tiny: bool) -> dict[str, Any]:
    """The UNet `config` trains: its family's full-size base model, or the family's tiny model."""
    from loratk.models.tiny import TINY_UNET_CONFIG
    from loratk.models.tiny_sd import TINY_SD15_UNET_CONFIG

    table = {
        "sdxl": (SDXL_UNET_CONFIG, TINY_UNET_CONFIG),
        "sd1": (SD15_UNET_CONFIG, TINY_SD15_UNET_CONFIG),
    }
    return table[config.family][1 if tiny else 0]


def tiny_version(config: BenchConfig) -> BenchConfig:
    """The same configuration at 1/16 of the size and 2 images a step (1 + 1 with prior preservation) for
    the tiny UNet: a smoke test of every code path, fast on a CPU. Odd latent sizes are kept on purpose."""

    def shrink(side: int) -> int:
        return max(16, side // 16 // 8 * 8)

    return replace(
        config, width=shrink(config.width), height=shrink(config.height), batch_size=2, rank=config.rank and 8
    )


def find_bf16_peak_tflops(device_name: str) -> float | None:
    for pattern, tflops in BF16_PEAK_TFLOPS:
        if pattern in device_name:
            return tflops
    return None


# ---------------------------------------------------------------- building


def build_unet(config: dict[str, Any], device: torch.device, *, seed: int = 0) -> torch.nn.Module:
    """A UNet with random weights, initialised directly on `device` (fast on a GPU, free on `meta`)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    with torch.device(device):
        return UNet2DConditionModel(**config)


def build_noise_scheduler() -> Any:
    from diffusers import DDPMScheduler

    # SDXL base's training schedule (SD 1.5's is the same).
    return DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type="epsilon",
    )


def build_model(unet: torch.nn.Module, family: str = "sdxl") -> Any:
    """A `family` model holding only the UNet: cached latents and embeddings need no VAE or text encoder."""
    from loratk.models.family import DiffusionModel, family_of

    return DiffusionModel(
        family=family_of(family),
        unet=unet,
        vae=None,
        text_encoders={},
        tokenizers={},
        noise_scheduler=build_noise_scheduler(),
        source="benchmark:random-weights",
    )


def _pooled_dim(unet_config: dict[str, Any]) -> int | None:
    """SDXL's pooled embedding width; None for a UNet without added conditioning (SD 1.x/2.x)."""
    if "projection_class_embeddings_input_dim" not in unet_config:
        return None
    return unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"]


def make_cached_batch(
    unet_config: dict[str, Any], width: int, height: int, batch_size: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """A batch as the latent and text-embedding caches deliver it (SDXL's: also pooled embeddings and sizes)."""
    pooled_dim = _pooled_dim(unet_config)
    generator = torch.Generator().manual_seed(0)
    sizes = torch.tensor([[height, width]] * batch_size)
    batch = {
        "latents": torch.randn(
            batch_size, 4, height // 8, width // 8, generator=generator
        ),  # [B, 4, H/8, W/8]
        "prompt_embeds": torch.randn(batch_size, 77, unet_config["cross_attention_dim"], generator=generator),
        "original_sizes": sizes,
        "crop_top_lefts": torch.zeros_like(sizes),
        "target_sizes": sizes,
    }
    if pooled_dim is not None:
        batch["pooled_prompt_embeds"] = torch.randn(batch_size, pooled_dim, generator=generator)
    return {k: v.to(device) for k, v in batch.items()}


def make_dreambooth_batch(
    unet_config: dict[str, Any],
    width: int,
    height: int,
    batch_size: int,
    device: torch.device,
    *,
    prior_preservation: bool,
) -> dict[str, Any]:
    """A batch as `collate_dreambooth` builds it from cached examples: the instance examples first, then (with
    prior preservation) one class example each, so `batch_size` = instance + class; plus `num_instance`."""
    from loratk.data.dreambooth import collate_dreambooth

    if prior_preservation and batch_size % 2:
        raise ValueError(f"prior preservation needs an even batch (instance + class), got {batch_size}")
    generator = torch.Generator().manual_seed(0)

    def example(kind: str, index: int) -> dict[str, Any]:
        # One item as `ImageCaptionDataset.__getitem__` returns it from the latent and text caches.
        item = {
            "caption": f"a {kind} prompt",
            "original_size": (height, width),
            "crop_top_left": (0, 0),
            "target_size": (height, width),
            "path": f"synthetic/{kind}{index}.png",
            "noise_seed": int(torch.randint(0, 2**62, (1,), generator=generator)),
            "latents": torch.randn(4, height // 8, width // 8, generator=generator),  # [4, H/8, W/8]
            "prompt_embeds": torch.randn(77, unet_config["cross_attention_dim"], generator=generator),
        }
        if _pooled_dim(unet_config) is not None:
            item["pooled_prompt_embeds"] = torch.randn(_pooled_dim(unet_config), generator=generator)
        return item

    num_instance = batch_size // 2 if prior_preservation else batch_size
    items = [
        {"instance": example("instance", i), **({"class": example("class", i)} if prior_preservation else {})}
        for i in range(num_instance)
    ]
    batch = collate_dreambooth(items)  # latents [num_instance + num_class, 4, H/8, W/8]
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def objective_kind(config: BenchConfig) -> str:
    """The objective kind ("caption" or "dreambooth") that the method registry pairs with `config.method`."""
    from loratk.components.methods import methods

    return methods()[config.method].objective


def build_objective(
    config: BenchConfig, model: Any, *, device: torch.device, weight_dtype: torch.dtype
) -> Any:
    """The objective the method registry builds for `config.method`, with the recipe's defaults."""
    from loratk.objectives.denoising import Denoiser

    denoiser = Denoiser(model, device=device, weight_dtype=weight_dtype)
    if objective_kind(config) == "dreambooth":
        from loratk.objectives.dreambooth import DreamBoothObjective

        return DreamBoothObjective(denoiser, prior_loss_weight=PRIOR_LOSS_WEIGHT)
    from loratk.objectives.caption import CaptionObjective

    return CaptionObjective(denoiser)


def make_step_batch(config: BenchConfig, unet_config: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch `config`'s objective trains on: DreamBooth's instance (+ class) batch, or a caption batch."""
    if objective_kind(config) == "dreambooth":
        return make_dreambooth_batch(
            unet_config,
            config.width,
            config.height,
            config.batch_size,
            device,
            prior_preservation=config.prior_preservation,
        )
    if config.prior_preservation:
        raise ValueError(f"prior preservation is for the DreamBooth methods, not {config.method!r}")
    return make_cached_batch(unet_config, config.width, config.height, config.batch_size, device)


def check_fused_backward(accelerator: Any) -> None:
    """Refuse what the recipe and `loratk.train` refuse with `optim.fused_backward`."""
    problems = []
    if accelerator.num_processes > 1:
        problems.append("it steps weights before gradients are averaged across processes: run one process")
    if accelerator.gradient_accumulation_steps > 1:
        problems.append("it steps each weight during backward, so it cannot accumulate gradients")
    if accelerator.mixed_precision == "fp16":
        problems.append("fp16 needs a gradient scaler, which steps all weights at once: use bf16")
    if problems:
        raise ValueError("fused backward: " + "; ".join(problems))


@dataclass
class Step:
    """Everything one configuration trains with."""

    unet: torch.nn.Module
    objective: Any
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    batch: dict[str, Any]
    num_trainable: int


def build_step(
    accelerator: Any,
    config: BenchConfig,
    unet_config: dict[str, Any],
    *,
    weight_dtype: torch.dtype,
    full_dtype: torch.dtype,
    attention: str = "sdpa",
    channels_last: bool = False,
    compile_unet: bool = False,
) -> Step:
    """The UNet, adapter, objective and optimizer of one configuration, built as `loratk.train` does."""
    from loratk.adapters.lora import LoraAdapter
    from loratk.core.optim import build_lr_scheduler, build_optimizer
    from loratk.models.performance import apply_performance_options

    if config.fused_backward:
        check_fused_backward(accelerator)
    device = accelerator.device
    unet = build_unet(unet_config, device)
    unet.requires_grad_(False)
    if config.rank is None:
        # Full fine-tuning: every UNet weight trains, kept in `full_dtype` (bf16 = kohya's full_bf16).
        unet.to(dtype=full_dtype)
        unet.requires_grad_(True)
        params = [p for p in unet.parameters() if p.requires_grad]
        groups = [{"name": "unet", "params": params, "lr": 1e-6}]
    else:
        unet.to(dtype=weight_dtype)
        adapter = LoraAdapter(rank=config.rank, alpha=float(config.rank), targets=config.targets)
        model = build_model(unet, config.family)
        adapter.apply(model)  # LoRA weights in fp32, the frozen base in `weight_dtype`
        groups = adapter.param_groups(model, 1e-4)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    apply_performance_options(
        unet, attention=attention, channels_last=channels_last, compile_unet=compile_unet
    )
    # With fused backward, each weight steps from its gradient hook, its gradient clipped on its own.
    optimizer = build_optimizer(
        groups,
        config.optimizer,
        lr=groups[0]["lr"],
        fused_backward=config.fused_backward,
        max_grad_norm=MAX_GRAD_NORM,
    )
    prepared_unet, optimizer = accelerator.prepare(unet, optimizer)
    lr_scheduler = accelerator.prepare(
        build_lr_scheduler(optimizer, "constant", warmup_steps=0, total_steps=1)
    )
    unet_dtype = full_dtype if config.rank is None else weight_dtype
    objective = build_objective(
        config, build_model(prepared_unet, config.family), device=device, weight_dtype=unet_dtype
    )
    batch = make_step_batch(config, unet_config, device)
    num_trainable = sum(p.numel() for g in groups for p in g["params"])
    return Step(prepared_unet, objective, optimizer, lr_scheduler, batch, num_trainable)


# ---------------------------------------------------------------- measuring


def count_step_flops(step: Step, config: BenchConfig) -> int:
    """FLOPs of one training step (forward + backward; the optimizer is negligible), counted on one image
    without gradient checkpointing and scaled to the batch: model FLOPs, not what recomputation adds.

    With a fused backward the optimizer steps inside this backward: one more untimed step before warm-up.
    """
    from torch.utils.flop_counter import FlopCounterMode

    unet = step.unet
    checkpointing = unet.is_gradient_checkpointing
    if checkpointing:
        unet.disable_gradient_checkpointing()
    # The first example; lists (captions, paths, noise seeds) too. `num_instance` is the objective's only.
    one = {k: v[:1] for k, v in step.batch.items() if isinstance(v, torch.Tensor | list)}
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            inputs = step.objective.denoiser.encode_batch(one)
            loss = step.objective.denoiser.per_sample_loss(inputs).mean()
            loss.backward()
    finally:
        step.optimizer.zero_grad(set_to_none=True)
        if checkpointing:
            unet.enable_gradient_checkpointing()
    return counter.get_total_flops() * config.batch_size


def count_flops_per_image_on_meta(unet_config: dict[str, Any], config: BenchConfig) -> int:
    """Training FLOPs per image of `config`, counted on the `meta` device: no memory, no GPU, any size."""
    from torch.utils.flop_counter import FlopCounterMode

    from loratk.adapters.lora import LoraAdapter
    from loratk.objectives.denoising import Denoiser

    meta = torch.device("meta")
    unet = build_unet(unet_config, meta)
    unet.requires_grad_(False)
    unet.to(dtype=torch.bfloat16)
    model = build_model(unet, config.family)
    if config.rank is None:
        unet.requires_grad_(True)
    else:
        LoraAdapter(rank=config.rank, alpha=float(config.rank), targets=config.targets).apply(model)
    denoiser = Denoiser(model, device=meta, weight_dtype=torch.bfloat16)
    batch = make_cached_batch(unet_config, config.width, config.height, 1, meta)
    counter = FlopCounterMode(display=False)
    with counter:
        denoiser.per_sample_loss(denoiser.encode_batch(batch)).mean().backward()
    return counter.get_total_flops()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_steps(
    accelerator: Any, step: Step, config: BenchConfig, num_steps: int, step_hooks: Sequence[Any] = ()
) -> Any:
    """`num_steps` optimizer steps of `core/loop.run_training` on the step's batch, as `loratk.train` runs
    them: one process, no accumulation (which fused backward cannot do), clipping at `MAX_GRAD_NORM`."""
    from loratk.core.loop import run_training
    from loratk.plan import compute_plan

    plan = compute_plan(
        num_examples=num_steps * config.batch_size,
        batches_per_epoch=num_steps,
        per_device_batch=config.batch_size,
        gradient_accumulation_steps=1,
        num_processes=1,
        epochs=1,
        max_steps=None,
    )
    return run_training(
        accelerator,
        objective=step.objective,
        modules=[step.unet],
        optimizer=step.optimizer,
        lr_scheduler=step.lr_scheduler,
        dataloader=[step.batch] * num_steps,
        plan=plan,
        seed=0,
        max_grad_norm=MAX_GRAD_NORM,
        log_every_n_steps=num_steps,  # one host sync for logging, at the end
        step_hooks=step_hooks,
        max_nonfinite_steps=num_steps + 1,
    )


def profile_steps(
    accelerator: Any,
    step: Step,
    config: BenchConfig,
    num_steps: int,
    out_dir: Path,
    *,
    write_top: bool = True,
    record_shapes: bool = True,
) -> dict[str, str]:
    """Profile `num_steps` more steps (after one untraced step that warms the profiler up); write
    `<key>.trace.json` (a chrome trace, one `ProfilerStep#` range per step: open it in https://ui.perfetto.dev)
    and `<key>.top.txt` (the 30 ops with the most self time: device time on CUDA, CPU time otherwise).

    `write_top=False` skips the table: torch builds it from Python objects for every event, which takes far
    longer than the steps themselves on a full-size model (`benchmarks/gpu_suite.py` ranks ops from the trace).
    `record_shapes=False` leaves the input shapes out of the trace: a smaller file, a cheaper profile.
    """
    from torch.profiler import ProfilerActivity, profile, schedule

    cuda = accelerator.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    out_dir.mkdir(parents=True, exist_ok=True)
    with profile(
        activities=activities,
        record_shapes=record_shapes,
        with_stack=False,
        schedule=schedule(wait=0, warmup=1, active=num_steps, repeat=1),
    ) as prof:
        train_steps(accelerator, step, config, 1 + num_steps, step_hooks=[lambda _state: prof.step()])
    trace, top = out_dir / f"{config.key}.trace.json", out_dir / f"{config.key}.top.txt"
    prof.export_chrome_trace(str(trace))
    if not write_top:
        return {"profile_trace": str(trace)}
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    top.write_text(prof.key_averages().table(sort_by=sort_by, row_limit=30) + "\n")
    return {"profile_trace": str(trace), "profile_top": str(top)}


def run_config(
    accelerator: Any,
    config: BenchConfig,
    unet_config: dict[str, Any],
    *,
    steps: int,
    warmup: int,
    weight_dtype: torch.dtype,
    full_dtype: torch.dtype,
    peak_tflops: float | None,
    profile_dir: Path | None = None,
    profile_steps_count: int = 3,
    count_flops: bool = True,
    **performance: Any,
) -> dict[str, Any]:
    """Train `warmup + steps` optimizer steps through `run_training`; time the last `steps`. With
    `profile_dir`, then profile `profile_steps_count` more steps (see `profile_steps`). `count_flops=False`
    leaves the FLOP figures out (None): counting dispatches every op through Python, seconds on a CPU."""
    device = accelerator.device
    row: dict[str, Any] = {"config": config.key, "what": config.what, **asdict(config)}
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step = None
    try:
        step = build_step(
            accelerator, config, unet_config, weight_dtype=weight_dtype, full_dtype=full_dtype, **performance
        )
        row["trainable_parameters"] = step.num_trainable
        flops = count_step_flops(step, config) if count_flops else None
        if device.type == "cuda":
            # Peak memory is the training steps': counting FLOPs runs one image without checkpointing.
            _synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        stamps: list[float] = []

        def stamp(_state: Any) -> None:
            _synchronize(device)
            stamps.append(time.perf_counter())

        _synchronize(device)
        stamps.append(time.perf_counter())
        result = train_steps(accelerator, step, config, warmup + steps, step_hooks=[stamp])
        durations = [b - a for a, b in zip(stamps, stamps[1:], strict=False)][warmup:]
        s_per_step = statistics.median(durations)
        row.update(
            status="ok",
            s_per_step=s_per_step,
            images_per_s=config.batch_size / s_per_step,
            tflop_per_step=flops / 1e12 if flops else None,
            tflop_per_image=flops / config.batch_size / 1e12 if flops else None,
            achieved_tflops=flops / s_per_step / 1e12 if flops else None,
            bf16_peak_share=(flops / s_per_step / 1e12 / peak_tflops) if flops and peak_tflops else None,
            nonfinite_steps=result.state.nonfinite_steps,
            final_loss=result.losses[-1] if result.losses else None,
        )
        if device.type == "cuda":
            row["peak_memory_gib"] = torch.cuda.max_memory_reserved(device) / 2**30  # before profiling
        if profile_dir is not None:
            row.update(profile_steps(accelerator, step, config, profile_steps_count, profile_dir))
    except torch.OutOfMemoryError as err:
        row.update(status="OOM", error=str(err).splitlines()[0])
    finally:
        if device.type == "cuda" and "peak_memory_gib" not in row:
            _synchronize(device)
            row["peak_memory_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
        del step
        accelerator.free_memory()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def format_table(rows: list[dict[str, Any]]) -> str:
    def num(value: Any, spec: str) -> str:
        return (
            "n/a"
            if value is None or (isinstance(value, float) and not math.isfinite(value))
            else format(value, spec)
        )

    lines = [
        "| config | what | size | batch | fused backward | s/step | images/s | peak GiB | TFLOP/step "
        "| % bf16 peak | status |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        share = r.get("bf16_peak_share")
        lines.append(
            f"| ({r['config']}) | {r['what']} | {r['width']}x{r['height']} | {r['batch_size']} | "
            f"{'yes' if r['fused_backward'] else 'no'} | "
            f"{num(r.get('s_per_step'), '.3f')} | {num(r.get('images_per_s'), '.2f')} | "
            f"{num(r.get('peak_memory_gib'), '.1f')} | {num(r.get('tflop_per_step'), '.3g')} | "
            f"{num(share * 100 if share is not None else None, '.1f')} | {r['status']} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="tiny UNet, 1/8 sizes (the default without CUDA)")
    size.add_argument(
        "--full-size", action="store_true", help="full-size SDXL / SD 1.5 UNets (the default with CUDA)"
    )
    parser.add_argument("--configs", default="a,b,c,d,e,f", help="comma-separated subset of a,b,c,d,e,f")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 10 GPU, 3 CPU)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed steps first (default: 3 GPU, 1 CPU)"
    )
    parser.add_argument("--memory-cap-gib", type=float, default=24.0, help="emulate a card this size (GPU)")
    parser.add_argument("--no-memory-cap", action="store_true", help="use the whole GPU")
    parser.add_argument(
        "--mixed-precision",
        choices=("no", "fp16", "bf16"),
        default=None,
        help="frozen-weight dtype (default: bf16 on a GPU, no on a CPU)",
    )
    parser.add_argument(
        "--full-dtype",
        choices=("bf16", "fp32"),
        default=None,
        help="weight dtype of full fine-tuning (c) (default: bf16 under bf16, else fp32)",
    )
    parser.add_argument("--no-checkpointing", action="store_true", help="turn gradient checkpointing off")
    parser.add_argument("--attention", choices=("sdpa", "xformers"), default="sdpa")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="dense bf16 peak, if not in the table"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared CPU)")
    parser.add_argument(
        "--meta-flops",
        action="store_true",
        help="only count full-size FLOPs per image of each configuration on the meta device",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="after the timed steps, profile more: DIR/<config>.trace.json (chrome trace) and .top.txt",
    )
    parser.add_argument(
        "--profile-steps", type=int, default=3, help="steps to profile with --profile (default 3)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _meta_flops(configs: list[BenchConfig]) -> int:
    for config in configs:
        flops = count_flops_per_image_on_meta(unet_config_of(config, tiny=False), config)
        row = {"config": config.key, "what": config.what, "width": config.width, "height": config.height}
        row.update(tflop_per_image=flops / 1e12, tflop_per_step=flops * config.batch_size / 1e12)
        print(json.dumps(row), flush=True)
    return 0


def _run(args: argparse.Namespace) -> int:
    from accelerate import Accelerator

    from loratk.core.precision import DTYPES

    cuda = torch.cuda.is_available()
    tiny = args.tiny or not (args.full_size or cuda)
    steps = args.steps if args.steps is not None else (10 if cuda and not tiny else 3)
    warmup = args.warmup if args.warmup is not None else (3 if cuda and not tiny else 1)
    mixed_precision = args.mixed_precision or ("bf16" if cuda else "no")
    full_dtype = args.full_dtype or ("bf16" if mixed_precision == "bf16" else "fp32")
    accelerator = Accelerator(mixed_precision=mixed_precision)
    device = accelerator.device
    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    )
    peak_tflops = args.peak_tflops or (find_bf16_peak_tflops(device_name) if device.type == "cuda" else None)
    if device.type == "cuda" and not args.no_memory_cap:
        total = torch.cuda.get_device_properties(device).total_memory
        fraction = min(1.0, args.memory_cap_gib * 2**30 / total)
        torch.cuda.set_per_process_memory_fraction(fraction, device)
    wanted = [k.strip() for k in args.configs.split(",") if k.strip()]
    unknown = sorted(set(wanted) - {c.key for c in CONFIGS})
    if unknown:
        choices = ", ".join(c.key for c in CONFIGS)
        print(f"error: unknown configuration(s) {unknown}; choose from {choices}", file=sys.stderr)
        return 2
    configs = [c for c in CONFIGS if c.key in wanted]
    if args.meta_flops:
        return _meta_flops(configs)
    if args.profile is not None and args.profile_steps < 1:
        print(f"error: --profile-steps must be at least 1, got {args.profile_steps}", file=sys.stderr)
        return 2
    if any(c.fused_backward for c in configs):
        try:
            check_fused_backward(accelerator)
        except ValueError as err:
            fused = ",".join(c.key for c in configs if c.fused_backward)
            print(f"error: configuration(s) {fused}: {err}", file=sys.stderr)
            return 2
    if tiny:
        configs = [tiny_version(c) for c in configs]
    if args.no_checkpointing:
        configs = [replace(c, gradient_checkpointing=False) for c in configs]
    header = {
        "device": device_name,
        "unet": "tiny" if tiny else "full-size",
        "mixed_precision": mixed_precision,
        "full_dtype": full_dtype,
        "memory_cap_gib": None if (args.no_memory_cap or device.type != "cuda") else args.memory_cap_gib,
        "bf16_peak_tflops": peak_tflops,
        "steps": steps,
        "warmup": warmup,
        "torch": torch.__version__,
    }
    print(json.dumps(header))
    rows = []
    for config in configs:
        row = run_config(
            accelerator,
            config,
            unet_config_of(config, tiny=tiny),
            steps=steps,
            warmup=warmup,
            weight_dtype=DTYPES[mixed_precision],
            full_dtype=DTYPES[full_dtype],
            peak_tflops=peak_tflops,
            attention=args.attention,
            channels_last=args.channels_last,
            compile_unet=args.compile,
            profile_dir=args.profile,
            profile_steps_count=args.profile_steps,
        )
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(format_table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps({"header": header, "rows": rows}, indent=2))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
