"""The data of a run from its recipe: the preflight spec (and `loratk check`'s for a folder), the datasets and
data loaders of each method, DreamBooth's class images, and a line about the buckets."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratk.components.launch import run_on_main_process

if TYPE_CHECKING:
    from loratk.recipe import Recipe


def build_data_spec(recipe: Recipe) -> Any:
    """The recipe's [data] section as the plain values the preflight and the dataset take."""
    from loratk.data.captions import Subset
    from loratk.data.check import DataSpec

    data = recipe.data

    def path(value: str | None) -> Path | None:
        return Path(value) if value is not None else None

    if data.dir is not None:
        subsets = [
            Subset(
                Path(data.dir),
                data.caption_source,
                path(data.manifest),
                data.caption_ext,
                data.repeats,
                data.trigger,
            )
        ]
    else:
        subsets = [
            Subset(
                dir=Path(s.dir),
                caption_source=s.caption_source or data.caption_source,
                manifest=path(s.manifest),
                caption_ext=s.caption_ext or data.caption_ext,
                repeats=s.repeats or data.repeats,
                trigger=s.trigger if s.trigger is not None else data.trigger,
            )
            for s in data.subsets
        ]
    return DataSpec(
        subsets=tuple(subsets),
        resolution=data.size,
        buckets=data.buckets,
        bucket_step=data.bucket_step,
        bucket_min_side=data.bucket_min_side,
        bucket_max_side=data.bucket_max_side,
        bucket_no_upscale=data.bucket_no_upscale,
        min_side=data.min_side,
        max_pixels=data.max_pixels,
    )


def check_data(
    recipe: Recipe, *, progress: bool = False, spec: Any = None, reads_captions: bool = True
) -> Any:
    """Run the data preflight (no model) of `spec` (default: the recipe's [data]); raise `DataError` with
    every problem unless they may be skipped. `reads_captions=False`: caption problems do not count."""
    from loratk.data.check import run_preflight
    from loratk.data.check_report import drop_caption_problems
    from loratk.data.dataset import DataError

    report = run_preflight(spec if spec is not None else build_data_spec(recipe), progress=progress)
    if not reads_captions:
        drop_caption_problems(report)
    fatal = report.problems + (
        [] if recipe.data.on_bad_image == "skip" else report.error_lines[len(report.problems) :]
    )
    if fatal:
        hint = "run `loratk check` on the recipe for the full report"
        if not report.problems:
            hint += ', or set data.on_bad_image = "skip" to train on the good images only'
        raise DataError(fatal, hint=hint)
    if not report.good:
        raise DataError(
            [f"no usable image: all {len(report.images)} have problems"], hint="run `loratk check`"
        )
    return report


def check_data_once(recipe: Recipe, accelerator: Any) -> Any:
    """The preflight on the main process alone (it decodes every image); the others receive its report."""
    from loratk.data.dataset import DataError

    return run_on_main_process(accelerator, lambda: check_data(recipe, progress=True), (DataError,))


def build_dataset(recipe: Recipe, report: Any = None) -> Any:
    """The training dataset from the good images of a preflight report (run here if not given)."""
    from loratk.data.dataset import ImageCaptionDataset, Record
    from loratk.data.holdout import split_holdout

    report = report if report is not None else check_data(recipe)
    subsets = report.spec.subsets
    good, held = split_holdout(
        report.good, [image.path for image in report.good], recipe.eval.holdout, recipe.seed
    )

    def record(image: Any) -> Record:
        return Record(
            path=image.path,
            caption=image.caption,
            size=image.size,
            bucket=image.bucket,
            sha256=image.sha256,
            subset=image.subset,
            trigger=subsets[image.subset_index].trigger,
        )

    records = [record(image) for image in good for _ in range(subsets[image.subset_index].repeats)]
    data = recipe.data
    dataset = ImageCaptionDataset(
        records,
        data.size,
        center_crop=data.center_crop,
        random_flip=data.random_flip,
        caption_dropout=data.caption_dropout,
        seed=recipe.seed,
        shuffle_tags=data.shuffle_tags,
        keep_tokens=data.keep_tokens,
        tag_shuffle_variants=data.tag_shuffle_variants,
        max_pixels=data.max_pixels,
    )
    dataset.held_out = [record(image) for image in held]  # the validation loss's images
    return dataset


def build_caption_data(recipe: Recipe, accelerator: Any) -> tuple[Any, Any]:
    """Captioned folders: every image decoded and every caption read once (main process), then the dataset."""
    report = check_data_once(recipe, accelerator)
    return build_dataset(recipe, report), report


def build_caption_dataloader(recipe: Recipe, dataset: Any) -> Any:
    from loratk.data.dataset import build_dataloader

    return build_dataloader(
        dataset,
        batch_size=recipe.train.batch_size,
        seed=recipe.seed,
        num_workers=recipe.data.num_workers,
        shuffle=recipe.data.shuffle,
    )


def build_dreambooth_dataset(recipe: Recipe) -> Any:
    """Instance images (sidecar caption, else the instance prompt); class images are attached later, by
    `prepare_class_images`."""
    from loratk.data.dreambooth import DreamBoothDataset, scan_instance_folder
    from loratk.data.holdout import split_holdout

    data, db = recipe.data, recipe.dreambooth
    records = scan_instance_folder(db.instance_dir, db.instance_prompt, data.caption_ext)
    records, held = split_holdout(records, [r.path for r in records], recipe.eval.holdout, recipe.seed)
    dataset = DreamBoothDataset(
        [r for r in records for _ in range(data.repeats)],
        data.size,
        center_crop=data.center_crop,
        random_flip=data.random_flip,
        caption_dropout=data.caption_dropout,
        seed=recipe.seed,
    )
    dataset.held_out = held  # the validation loss's images
    return dataset


def build_instance_data(recipe: Recipe, accelerator: Any) -> tuple[Any, Any]:
    """DreamBooth's few instance images (no preflight report: they are read as they train)."""
    return build_dreambooth_dataset(recipe), None


def build_dreambooth_dataloader(recipe: Recipe, dataset: Any) -> Any:
    from loratk.data.dreambooth import build_dreambooth_dataloader as build

    return build(
        dataset, batch_size=recipe.train.batch_size, seed=recipe.seed, num_workers=recipe.data.num_workers
    )


def class_dir_of(recipe: Recipe) -> Path:
    db = recipe.dreambooth
    return Path(db.class_dir) if db.class_dir else recipe.run_dir / "class_images"


def prepare_class_images(
    recipe: Recipe, model: Any, dataset: Any, accelerator: Any, weight_dtype: Any
) -> None:
    """DreamBooth with prior preservation: top up the class images (main process), then pair them."""
    if not recipe.dreambooth.prior_preservation:
        return
    import contextlib

    import torch

    from loratk.data.dataset import Record
    from loratk.sampling.class_images import generate_class_images, list_class_images

    db, folder = recipe.dreambooth, class_dir_of(recipe)
    if accelerator.is_main_process:
        mixed = weight_dtype != torch.float32
        autocast = (
            torch.autocast(accelerator.device.type, dtype=weight_dtype) if mixed else contextlib.nullcontext()
        )
        with autocast:
            generate_class_images(
                model,
                class_dir=folder,
                prompt=db.class_prompt,
                num_images=db.num_class_images,
                size=recipe.data.size,
                steps=db.class_steps,
                guidance=db.class_guidance,
                batch_size=db.class_batch_size,
                seed=db.class_seed,
                negative_prompt=db.class_negative_prompt,
                scheduler=db.class_scheduler,
                prediction_type=recipe.model.prediction_type,
                model_name=recipe.model.path,
            )
    accelerator.wait_for_everyone()
    paths = list_class_images(folder)[: db.num_class_images]
    dataset.set_class_records([Record(p, db.class_prompt) for p in paths])


def describe_buckets(dataset: Any) -> str:
    from loratk.data.buckets import count_buckets

    unique = {r.path: r for r in dataset.records}
    histogram = count_buckets(dataset.bucket_of(i) for i in range(len(dataset)))
    parts = ", ".join(f"{w}x{h}: {n}" for (w, h), n in histogram)
    return f"{len(unique)} images, {len(dataset)} items per epoch in {len(histogram)} bucket(s) ({parts})"


DEFAULT_CHECK_SIDE = 1024  # `loratk check FOLDER` with no --resolution and no model: SDXL's side


def build_folder_spec(
    target: Path,
    *,
    resolution: tuple[int, int] | None = None,
    min_side: int | None = None,
    caption_ext: str | None = None,
    manifest: str | None = None,
    trigger: str | None = None,
    bucket_step: int | None = None,
    buckets: bool = True,
    manifests: Path = Path("captions"),
) -> tuple[Any, list[str]]:
    """The preflight spec of `loratk check FOLDER`, with the recipe's defaults for what is not given.

    A folder that holds only folders is checked one level down (each subfolder with images a subset), and a
    folder's caption manifest is found where `loratk caption` writes it (captions/<folder>.jsonl)."""
    from loratk.data.captions import Subset
    from loratk.data.check import DataSpec
    from loratk.data.images import list_image_files
    from loratk.recipe import DataConfig

    defaults = {name: field.default for name, field in DataConfig.model_fields.items()}
    notes = []
    folders = [target]
    if not list_image_files(target):
        below = [d for d in sorted(target.iterdir()) if d.is_dir() and not d.name.startswith(".")]
        below = [d for d in below if list_image_files(d)]
        if below:
            folders = below
            names = ", ".join(f"{d} ({len(list_image_files(d))})" for d in below)
            notes.append(f"{target} holds no images itself; checking the folders in it that do: {names}")
    subsets = []
    for folder in folders:
        path = Path(manifest) if manifest else manifests / f"{folder.resolve().name}.jsonl"
        found = manifest is not None or path.is_file()
        if found and not manifest:
            notes.append(f"{folder}: captions from {path} (found where `loratk caption` writes them)")
        subsets.append(
            Subset(
                dir=folder,
                caption_source="manifest" if manifest else defaults["caption_source"],
                manifest=path if found else None,
                caption_ext=caption_ext or defaults["caption_ext"],
                trigger=trigger,
            )
        )
    side = DEFAULT_CHECK_SIDE
    spec = DataSpec(
        subsets=tuple(subsets),
        resolution=resolution or (side, side),
        buckets=buckets,
        bucket_step=bucket_step or defaults["bucket_step"],
        min_side=min_side,
    )
    return spec, notes


def captioned_folder_records(recipe: Recipe, folder: Path) -> list[Any]:
    """The good images of a captioned folder (`eval.folder`), checked like `loratk check FOLDER` with the
    recipe's caption and bucket settings; an image with a problem is an error that names it."""
    from loratk.data.check import run_preflight
    from loratk.data.dataset import DataError, Record

    data = recipe.data
    spec, _ = build_folder_spec(
        folder,
        resolution=data.size,
        min_side=data.min_side,
        caption_ext=data.caption_ext,
        trigger=data.trigger,
        bucket_step=data.bucket_step,
        buckets=data.buckets,
    )
    report = run_preflight(spec)
    skip = recipe.data.on_bad_image == "skip"
    fatal = report.problems + ([] if skip else report.error_lines[len(report.problems) :])
    if fatal or not report.good:
        raise DataError(
            fatal or [f"{folder}: no usable image"],
            hint=f"run `loratk check {folder}`",
            what="the validation images (eval.folder)",
        )
    return [
        Record(path=i.path, caption=i.caption, size=i.size, bucket=i.bucket, sha256=i.sha256, subset=i.subset)
        for i in report.good
    ]


def instance_folder_records(recipe: Recipe, folder: Path) -> list[Any]:
    """Validation images of a DreamBooth run: sidecar captions, else the instance prompt."""
    from loratk.data.dreambooth import scan_instance_folder

    return scan_instance_folder(folder, recipe.dreambooth.instance_prompt, recipe.data.caption_ext)
