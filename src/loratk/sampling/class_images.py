"""DreamBooth class images: top up `class_dir` to `num_images` with the base model.

Resumable: what is already in the folder counts, and image k always uses seed `seed + k`, so an interrupted
run continues with exactly the images an uninterrupted one would have made. Each PNG carries its prompt and
seed in the text metadata (A1111 `parameters`, plus `loratk.class_prompt` / `loratk.seed`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loratk.data.images import list_image_files


def list_class_images(folder: str | Path) -> list[Path]:
    return list_image_files(folder)


def class_image_name(k: int, seed: int) -> str:
    return f"class-{k:05d}-seed{seed}.png"


def generate_class_images(
    model: Any,
    *,
    class_dir: str | Path,
    prompt: str,
    num_images: int,
    size: tuple[int, int],
    steps: int = 30,
    guidance: float = 7.0,
    batch_size: int = 4,
    seed: int = 0,
    negative_prompt: str = "",
    scheduler: str = "euler",
    prediction_type: str | None = None,
    model_name: str | None = None,
    progress: bool = True,
) -> list[Path]:
    """Generate the class images `class_dir` lacks (none if it holds `num_images` already); return them."""
    from tqdm.auto import tqdm

    from loratk.sampling.images import image_parameters, save_png
    from loratk.sampling.pipeline import build_pipeline, generate_images, model_modules, sampling_mode
    from loratk.sampling.specs import ImageSpec

    folder = Path(class_dir)
    existing = list_class_images(folder)
    missing = num_images - len(existing)
    if missing <= 0:
        return []
    taken = {p.name for p in existing}
    slots: list[int] = []
    k = 0
    while len(slots) < missing:
        if class_image_name(k, seed + k) not in taken:
            slots.append(k)
        k += 1
    # A batch's images differ in their last bits from the same images rendered in another batch (CPU and GPU
    # kernels depend on the batch shape). So batch j always holds the slots jB..jB+B-1 that the folder has
    # when done, and a batch with a lost image is rendered whole again: a resumed generation then writes
    # exactly the bytes an uninterrupted one would have.
    done = set(slots) | {k for k in range(max(slots) + 1) if class_image_name(k, seed + k) in taken}
    batches = [
        [j for j in sorted(done) if j // batch_size == b] for b in sorted({k // batch_size for k in slots})
    ]
    width, height = size
    folder.mkdir(parents=True, exist_ok=True)
    pipe = build_pipeline(model, scheduler=scheduler, prediction_type=prediction_type)
    wanted = set(slots)
    written: list[Path] = []
    bar = tqdm(total=missing, desc="class images", unit="img", disable=not progress)
    try:
        with sampling_mode(model_modules(model)):
            for batch in batches:
                # Same index for all: `generate_images` batches specs that differ only in their seed.
                specs = [
                    ImageSpec(prompt, negative_prompt, width, height, seed + k, steps, guidance, index=1)
                    for k in batch
                ]
                images = generate_images(pipe, specs, batch_size=len(specs))
                for k, (spec, image) in zip(batch, images, strict=True):
                    if k not in wanted:
                        continue
                    path = folder / class_image_name(k, spec.seed)
                    text = image_parameters(spec, scheduler=scheduler, model=model_name)
                    extra = {"loratk.class_prompt": prompt, "loratk.seed": str(spec.seed)}
                    save_png(image, path, text, **extra)
                    written.append(path)
                    bar.update(1)
    finally:
        bar.close()
    return written
