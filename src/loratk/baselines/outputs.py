"""What a GAN run leaves for people: generator files (safetensors, the network's config in the metadata),
samples from fixed latent vectors per epoch with their grid, and a latent-interpolation strip."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from loratk.baselines.nets import Generator, GeneratorConfig, build_generator
from loratk.files import load_safetensors, save_safetensors_atomic
from loratk.prompts import format_parameters
from loratk.sampling.images import build_grid, open_image, save_grid, save_png

GENERATOR_KIND = "gan-generator"  # metadata `loratk.kind` of a generator file


class GeneratorFileError(ValueError):
    pass


def save_generator(generator: Generator, path: Path, metadata: dict[str, str]) -> None:
    """Every weight and BatchNorm statistic in fp32, with the config that rebuilds the network."""
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in generator.state_dict().items()}
    tensors = {k: v for k, v in tensors.items() if not k.endswith("num_batches_tracked")}
    header = {"loratk.kind": GENERATOR_KIND, "loratk.gan.config": json.dumps(generator.config.as_dict())}
    save_safetensors_atomic(tensors, path, {**metadata, **header})


def read_generator_metadata(path: str | Path) -> dict[str, str] | None:
    """The metadata of a generator file, or None for any other safetensors file (a LoRA)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
    except Exception:  # not readable here: the caller's own loader reports it
        return None
    return metadata if metadata.get("loratk.kind") == GENERATOR_KIND else None


def load_generator(path: str | Path) -> tuple[Generator, dict[str, str]]:
    """The generator of `path` in eval mode, and the file's metadata."""
    tensors, metadata = load_safetensors(path)
    if metadata.get("loratk.kind") != GENERATOR_KIND:
        raise GeneratorFileError(f"{path}: not a GAN generator file (no loratk.kind = {GENERATOR_KIND!r})")
    config = GeneratorConfig(**json.loads(metadata["loratk.gan.config"]))
    generator = build_generator(config)
    missing, unexpected = generator.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise GeneratorFileError(
            f"{path}: weights do not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return generator.eval(), metadata


def build_fixed_latents(seeds: Sequence[int], latent_dim: int) -> torch.Tensor:
    """[N, latent_dim]: row i drawn from `seeds[i]` alone, so the same seed gives the same vector anywhere."""
    return torch.stack([torch.randn(latent_dim, generator=torch.Generator().manual_seed(s)) for s in seeds])


def compute_slerp(a: torch.Tensor, b: torch.Tensor, steps: int) -> torch.Tensor:
    """[steps, D]: spherical interpolation from a to b (Gaussian latents keep their norm on the way)."""
    omega = torch.arccos(torch.clamp(torch.dot(a / a.norm(), b / b.norm()), -1.0, 1.0))
    weights = torch.linspace(0, 1, steps)
    if omega.abs() < 1e-6:
        return torch.stack([(1 - w) * a + w * b for w in weights])
    return torch.stack(
        [(torch.sin((1 - w) * omega) * a + torch.sin(w * omega) * b) / torch.sin(omega) for w in weights]
    )


@torch.no_grad()
def render_images(
    generator: torch.nn.Module, latents: torch.Tensor, batch_size: int = 64
) -> list[Image.Image]:
    """Images of `latents` in eval mode (BatchNorm statistics, not the batch's); the mode is restored."""
    was_training = generator.training
    generator.eval()
    device = next(generator.parameters()).device
    images = []
    try:
        for start in range(0, len(latents), batch_size):
            out = generator(latents[start : start + batch_size].to(device))  # [B, 3, R, R] in [-1, 1]
            array = ((out.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            images.extend(Image.fromarray(a) for a in array)
    finally:
        generator.train(was_training)
    return images


def sample_parameters(seed: int, resolution: int, model: str, epoch: int | None) -> str:
    return format_parameters(
        prompt="",
        negative_prompt="",
        steps=1,
        sampler="GAN generator",
        guidance=0,
        seed=seed,
        width=resolution,
        height=resolution,
        model=model,
        epoch=epoch,
        extra={"Latent": f"N(0, I) from seed {seed}"},
    )


def write_epoch_samples(
    generator: torch.nn.Module, folder: Path, seeds: Sequence[int], *, model: str, epoch: int | None
) -> list[Path]:
    """samples/epochNNN/NN-seedS.png, one per fixed latent vector."""
    config = generator.config
    images = render_images(generator, build_fixed_latents(seeds, config.latent_dim))
    paths = []
    for index, (seed, image) in enumerate(zip(seeds, images, strict=True), start=1):
        path = folder / f"{index:02d}-seed{seed}.png"
        save_png(image, path, sample_parameters(seed, config.resolution, model, epoch))
        paths.append(path)
    return paths


def write_interpolation_strip(
    generator: torch.nn.Module, path: Path, seeds: tuple[int, int], steps: int, label: str
) -> None:
    """One row of `steps` images along the slerp between the latents of two seeds."""
    a, b = build_fixed_latents(seeds, generator.config.latent_dim)
    images = render_images(generator, compute_slerp(a, b, steps))
    columns = [f"{i / (steps - 1):.2f}" if steps > 1 else "0" for i in range(steps)]
    save_grid(build_grid([images], [label], columns), path)


def write_samples_grid(samples: Path, epochs: Sequence[int], names: Sequence[str]) -> Path:
    """samples/grid.png: one row per sampled epoch, one column per fixed latent vector."""
    rows = [[open_image(samples / f"epoch{e:03d}" / n) for n in names] for e in epochs]
    path = samples / "grid.png"
    save_grid(build_grid(rows, [f"epoch {e}" for e in epochs], list(names)), path)
    return path
