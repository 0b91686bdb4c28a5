"""Peak memory of rendering, predicted on the training estimate's fake tensors: the epoch samples (and the
`[eval]` prompts, rendered the same way) and DreamBooth's class images.

Both render one image batch at a time: the prompts through the text encoders, the UNet at twice the batch
(classifier-free guidance runs the negative prompt beside the prompt), then the VAE decode at the image size
(`sampling.pipeline.vae_decode`, the function the sampler calls). Nothing keeps activations (no grad), so the
peak of one denoising step and one decode is the peak of the whole render. The run's state stays where it is:
samples are rendered between epochs, with the trainable weights and the optimizer state on the card and the
offloaded encoders brought back; class images before training, under autocast, from the base model.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from loratk.memory.tracker import PeakBreakdown

if TYPE_CHECKING:
    from loratk.memory.estimate import _FakeRun
    from loratk.recipe import Recipe


@dataclass(frozen=True)
class RenderJob:
    """One kind of render a run does: what, at which size, how many images a batch."""

    what: str  # "samples" | "class images"
    width: int
    height: int
    images: int  # images per batch
    guidance: float  # > 1: classifier-free guidance, the UNet runs 2 x images
    autocast: bool  # class images run under autocast; samples in the weights' dtypes
    override: str  # the recipe key that makes this render smaller

    @property
    def unet_batch(self) -> int:
        return 2 * self.images if self.guidance > 1 else self.images

    def describe(self) -> str:
        per = f"{self.images} image{'s' if self.images > 1 else ''} a batch"
        cfg = f", the UNet at batch {self.unet_batch} (guidance)" if self.unet_batch > self.images else ""
        return f"{self.what} at {self.width}x{self.height} ({per}{cfg})"


@dataclass(frozen=True)
class RenderEstimate:
    job: RenderJob
    peak: PeakBreakdown  # phase: "text encoders" | "denoising" | "decoding"
    seconds: float


def render_jobs(recipe: Recipe) -> list[RenderJob]:
    """What the run renders: class images before training (DreamBooth with prior preservation) and samples
    each sampled epoch (`[sample]` and `[eval]` prompts: the largest image any of them asks for)."""
    jobs = []
    db = recipe.dreambooth
    if db is not None and db.prior_preservation:
        width, height = recipe.data.size
        jobs.append(
            RenderJob(
                "class images", width, height, db.class_batch_size, db.class_guidance, True,
                "dreambooth.class_batch_size",
            )
        )  # fmt: skip
    sizes = _sample_sizes(recipe)
    if sizes:
        width, height, guidance = max(sizes, key=lambda s: (s[0] * s[1], s[2]))
        jobs.append(RenderJob("samples", width, height, 1, guidance, False, "sample.size"))
    return jobs


def _sample_sizes(recipe: Recipe) -> list[tuple[int, int, float]]:
    """(width, height, guidance) of every prompt line the run renders between epochs."""
    from loratk.components.hooks import load_sample_prompts
    from loratk.prompts import parse_prompt_line

    width, height = recipe.sample_size
    lines: list[Any] = []
    if recipe.sample.enabled:
        try:
            lines = load_sample_prompts(recipe)
        except Exception:  # noqa: BLE001 - a prompts file absent on this machine: the default size stands
            lines = [parse_prompt_line("a picture")]
    if recipe.eval.scores_while_training:
        lines += [parse_prompt_line(line) for line in recipe.eval.prompts]
    return [
        (
            p.width or width,
            p.height or height,
            p.guidance if p.guidance is not None else recipe.sample.guidance,
        )
        for p in lines
    ]


def parts_on_device(run: _FakeRun) -> Any:
    """The parts offloaded after caching (VAE, text encoders) on the card for the duration, as the sampler
    brings them back; afterwards they are off it again (their fake storage is freed)."""
    from loratk.memory.bases import materialised

    modules = [run.model.parts[name] for name in run.extras["offloaded"]]
    return materialised(modules, run.tracker, real=run.extras.get("real", False))


def run_render(run: _FakeRun, job: RenderJob) -> RenderEstimate:
    """The peak of one render batch of `job` on top of what the run holds now."""
    from loratk.memory.autocast import CudaAutocastRules
    from loratk.sampling.pipeline import vae_decode

    start = time.perf_counter()
    model, tracker, device = run.model, run.tracker, run.extras["device"]
    family = model.family
    flags = {m: m.training for part in model.parts.values() for m in part.modules()}
    mixed = job.autocast and run.weight_dtype != torch.float32
    rules = (
        CudaAutocastRules(run.weight_dtype, cache=False)
        if mixed and run.device_type == "cuda"
        else torch.autocast("cpu", dtype=run.weight_dtype)
        if mixed
        else contextlib.nullcontext()
    )
    vae = run.extras["configs"]["vae"]
    scale = 2 ** (len(vae["block_out_channels"]) - 1)
    try:
        with parts_on_device(run), torch.no_grad(), rules:
            for part in model.parts.values():
                part.eval()
            tracker.reset_peak()
            tracker.phase = "text encoders"
            conditioning = _prompt_conditioning(family, model, job, device)
            tracker.phase = "denoising"
            latents = torch.randn(job.images, vae["latent_channels"], job.height // scale, job.width // scale)
            rows = latents.repeat(job.unet_batch // job.images, 1, 1, 1)
            timesteps = torch.full((job.unet_batch,), 999, dtype=torch.long)
            size = torch.tensor([[job.height, job.width]] * job.unet_batch)
            conditioning.update(
                family.batch_conditioning(
                    {"original_sizes": size, "crop_top_lefts": torch.zeros_like(size), "target_sizes": size}
                )
            )
            prediction = family.predict(model.unet, rows, timesteps, conditioning, model.unet.dtype)
            del rows, conditioning
            if job.unet_batch > job.images:
                uncond, cond = prediction.chunk(2)
                prediction = uncond + job.guidance * (cond - uncond)
                del uncond, cond
            latents = latents - prediction.to(latents.dtype)  # the scheduler's step: a latent-size update
            del prediction
            tracker.phase = "decoding"
            pixels = vae_decode(model.vae, latents)
            del pixels, latents
    finally:
        for module, flag in flags.items():
            module.training = flag
    return RenderEstimate(job, tracker.breakdown(), time.perf_counter() - start)


def _prompt_conditioning(family: Any, model: Any, job: RenderJob, device: Any) -> dict[str, torch.Tensor]:
    """The prompt's (and, with guidance, the negative prompt's) embeddings, stacked as the pipeline does."""
    prompts = ["a picture"] * job.images
    conditioning = family.encode_prompts(model, prompts, device)
    if job.unet_batch == job.images:
        return conditioning
    negative = family.encode_prompts(model, prompts, device)
    return {key: torch.cat([negative[key], value]) for key, value in conditioning.items()}
