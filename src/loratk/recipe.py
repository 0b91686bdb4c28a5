"""The recipe: one TOML file that says what to train, on what, and how.

Validated once, up front: every problem is reported together, each with its TOML path and a suggestion.
Nothing changes a recipe after loading; derived numbers live in `plan.py`.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import sys
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

Method = Literal["lora", "dreambooth", "dreambooth-lora"]
BUILTIN_TINY = "builtin:tiny-sdxl"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_image_size(value: int | tuple[int, int]) -> int | tuple[int, int]:
    sides = (value,) if isinstance(value, int) else value
    for side in sides:
        if side < 8 or side % 8:
            raise ValueError(f"each side must be a multiple of 8 and >= 8, got {side}")
    return value


def _as_size(value: int | tuple[int, int]) -> tuple[int, int]:
    """(width, height) from one side (square) or [width, height]."""
    return (value, value) if isinstance(value, int) else value


class ModelConfig(_Section):
    path: str = Field(
        "stabilityai/stable-diffusion-xl-base-1.0",
        description="hub id, local diffusers folder, single .safetensors checkpoint, or builtin:tiny-sdxl",
    )
    vae: str | None = Field(
        None, description="optional separate VAE (hub id or folder), e.g. an fp16-fix VAE"
    )
    revision: str | None = None
    variant: str | None = Field(None, description="weight variant to load, e.g. 'fp16'")
    single_file_config: str | None = Field(
        None, description="diffusers folder or hub id whose configs describe a single-file checkpoint"
    )
    prediction_type: Literal["epsilon", "v_prediction"] | None = Field(
        None, description="training target; default: what the model's scheduler says"
    )


CaptionSource = Literal["auto", "sidecar", "manifest", "metadata"]


def _check_caption_ext(value: str | None) -> str | None:
    if value is not None and not value.startswith("."):
        raise ValueError(f"must start with '.', got {value!r} (did you mean '.{value}'?)")
    return value


class SubsetConfig(_Section):
    """One image folder in `[[data.subsets]]`; unset keys take their value from `[data]`."""

    dir: str = Field(..., description="folder of training images")
    caption_source: CaptionSource | None = Field(None, description="default: data.caption_source")
    manifest: str | None = Field(None, description="captions/<set>.jsonl manifest for this folder")
    caption_ext: str | None = Field(None, description="default: data.caption_ext")
    repeats: int | None = Field(None, ge=1, description="default: data.repeats")
    trigger: str | None = Field(None, description="default: data.trigger")

    @field_validator("caption_ext")
    @classmethod
    def _check_ext(cls, value: str | None) -> str | None:
        return _check_caption_ext(value)


class DataConfig(_Section):
    dir: str | None = Field(
        None,
        description="folder of training images (the one-subset shorthand; DreamBooth: dreambooth.instance_dir)",
    )
    subsets: list[SubsetConfig] = Field(
        default_factory=list, description="several folders, each its own keys"
    )
    caption_source: CaptionSource = Field("auto", description="auto = manifest > metadata.jsonl > sidecar")
    manifest: str | None = Field(None, description="captions/<set>.jsonl with file_name/text lines")
    caption_ext: str = ".txt"
    trigger: str | None = Field(None, description="word put once at the front of every caption")
    repeats: int = Field(1, ge=1)
    resolution: int | tuple[int, int] = Field(
        1024, description="square side, or [width, height]: the training size and the bucket area"
    )
    buckets: bool = Field(True, description="aspect-ratio buckets; false = every image cropped to resolution")
    bucket_step: int = Field(64, description="bucket sides are multiples of this (>= 8, a multiple of 8)")
    bucket_min_side: int | None = Field(None, ge=8, description="default: half the square side of the area")
    bucket_max_side: int | None = Field(None, ge=8, description="default: twice the square side of the area")
    bucket_no_upscale: bool = Field(
        False, description="small images get their own bucket instead of upscaling"
    )
    center_crop: bool = True
    random_flip: bool = False
    caption_dropout: float = Field(0.0, ge=0.0, le=1.0)
    shuffle_tags: bool = Field(False, description="shuffle comma-separated tags per step")
    keep_tokens: int = Field(0, ge=0, description="leading tags that shuffle_tags keeps in place")
    tag_shuffle_variants: int = Field(
        0, ge=0, description="N fixed shuffles per caption (cacheable); 0 = free"
    )
    min_side: int | None = Field(None, ge=1, description="smaller images are errors; default resolution / 4")
    max_pixels: int = Field(64_000_000, ge=1, description="larger images are refused from their header")
    on_bad_image: Literal["error", "skip"] = Field("error", description="skip = train on the good images")
    cache_latents: bool = Field(True, description="encode each (image, bucket, crop, flip) once with the VAE")
    cache_text_embeddings: bool = Field(True, description="encode each caption once (frozen text encoders)")
    cache_dir: str | None = Field(None, description="default: $LORATK_CACHE/data (~/.cache/loratk/data)")
    num_workers: int = Field(0, ge=0)
    shuffle: bool = Field(
        True, description="reshuffle batches each epoch from (seed, epoch); false = file order"
    )

    @field_validator("resolution")
    @classmethod
    def _check_resolution(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        return _check_image_size(value)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of training images."""
        return _as_size(self.resolution)

    @field_validator("bucket_step")
    @classmethod
    def _check_step(cls, value: int) -> int:
        if value < 8 or value % 8:
            raise ValueError(f"must be a multiple of 8 and >= 8, got {value}")
        return value

    @field_validator("caption_ext")
    @classmethod
    def _check_ext(cls, value: str) -> str:
        return _check_caption_ext(value) or value

    @model_validator(mode="after")
    def _check_combinations(self) -> DataConfig:
        # Messages name keys relative to [data]; the error line starts with "data: ".
        problems = []
        if self.dir is not None and self.subsets:
            problems.append("dir and [[data.subsets]] are both set; move dir into a subset")
        if self.subsets and self.manifest is not None:
            problems.append("manifest is set next to [[data.subsets]]; set manifest inside each subset")
        for i, subset in enumerate(self.subsets or [self]):
            where = f"subsets[{i}]." if self.subsets else ""
            source = subset.caption_source or self.caption_source
            if source == "manifest" and subset.manifest is None:
                problems.append(
                    f"{where}caption_source = 'manifest' needs {where}manifest = 'captions/<set>.jsonl'"
                )
            if subset.manifest is not None and source in ("sidecar", "metadata"):
                problems.append(f"{where}manifest is set but caption_source = {source!r} never reads it")
        # Compared with the defaults, not with the keys given, so a resolved recipe (every key written) loads.
        if not self.buckets:
            defaults = {
                "bucket_step": 64,
                "bucket_min_side": None,
                "bucket_max_side": None,
                "bucket_no_upscale": False,
            }
            unused = [k for k, v in defaults.items() if getattr(self, k) != v]
            if unused:
                problems.append(f"{', '.join(unused)}: no effect with buckets = false")
        low, high = self.bucket_min_side, self.bucket_max_side
        if low is not None and high is not None and low > high:
            problems.append(f"bucket_min_side ({low}) is larger than bucket_max_side ({high})")
        if not self.shuffle_tags:
            unused = [k for k in ("keep_tokens", "tag_shuffle_variants") if getattr(self, k)]
            if unused:
                problems.append(f"{', '.join(unused)}: only used with shuffle_tags = true")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class LoraConfig(_Section):
    rank: int = Field(128, gt=0, description="higher = more capacity, bigger file, more memory")
    alpha: float | None = Field(None, gt=0, description="scale = alpha / rank; default: alpha = rank")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    targets: Literal["all-linear", "attention"] | list[str] = Field(
        "all-linear", description="'all-linear', 'attention' or a list of UNet module-name suffixes"
    )
    init: Literal["kaiming", "gaussian"] = Field(
        "kaiming",
        description="down-projection init: 'kaiming' (kohya's and PEFT's, so kohya learning rates carry over) "
        "or 'gaussian' (std 1/rank, the diffusers examples')",
    )
    train_text_encoders: bool = False
    text_encoder_lr: float | None = Field(
        None, gt=0, description="default: train.learning_rate / 10 (text encoders overfit fast)"
    )

    @field_validator("targets")
    @classmethod
    def _check_targets(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("must name at least one module, or use 'all-linear' / 'attention'")
        return value

    @property
    def scale_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


class FullConfig(_Section):
    """The full adapter (method 'dreambooth'): every UNet weight trains."""

    train_text_encoders: bool = Field(False, description="also train both text encoders (more memory)")
    text_encoder_lr: float | None = Field(None, gt=0, description="default: train.learning_rate")


class DreamBoothConfig(_Section):
    instance_dir: str = Field(..., description="folder of the subject's images (sidecar captions optional)")
    instance_prompt: str = Field(..., min_length=1, description="e.g. 'a picture of UnicornGirl'")
    class_prompt: str | None = Field(
        None, description="e.g. 'a picture of a girl'; needed for prior preservation"
    )
    class_dir: str | None = Field(None, description="class images; default: runs/<name>/class_images")
    num_class_images: int = Field(100, gt=0, description="generated with the base model up to this count")
    prior_preservation: bool = Field(
        True, description="train on class images too, so the class is not forgotten"
    )
    prior_loss_weight: float = Field(1.0, ge=0.0, description="loss = instance + weight x class")
    class_steps: int = Field(30, gt=0, description="denoising steps per class image")
    class_guidance: float = Field(7.0, ge=0, description="CFG scale of class images")
    class_batch_size: int = Field(4, gt=0, description="class images generated per batch")
    class_seed: int = Field(0, description="class image k uses seed class_seed + k")
    class_negative_prompt: str = ""
    class_scheduler: Literal["euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras"] = "euler"


class TrainConfig(_Section):
    epochs: int = Field(10, gt=0)
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps")
    batch_size: int = Field(1, gt=0, description="images per device per step")
    gradient_accumulation_steps: int = Field(1, gt=0)
    global_batch_size: int | None = Field(
        None, gt=0, description="images per optimizer step over all processes; sets the accumulation steps"
    )
    learning_rate: float = Field(1e-4, gt=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "bf16"
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip gradients to this norm; unset = no clip")
    noise_offset: float = Field(0.0, ge=0.0)
    min_snr_gamma: float | None = Field(None, gt=0, description="min-SNR-gamma loss weighting (5 is common)")
    gradient_checkpointing: bool = False
    log_every_n_steps: int = Field(1, gt=0)
    report_to: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list)
    resume: str = Field(
        "auto", description="'auto' = newest complete state in runs/<name>/state/, 'never', or a state folder"
    )
    save_state_every_n_steps: int | None = Field(
        None, gt=0, description="also save a resumable state every N steps (always at each epoch end)"
    )
    keep_states: int | None = Field(2, gt=0, description="keep the N newest states; unset = keep all")
    max_nonfinite_steps: int = Field(
        5, gt=0, description="stop after N optimizer steps in a row with NaN/inf loss"
    )

    @model_validator(mode="after")
    def _check_batch_settings(self) -> TrainConfig:
        if self.global_batch_size is not None and self.gradient_accumulation_steps != 1:
            raise ValueError(
                "global_batch_size and gradient_accumulation_steps are both set; set only one "
                "(global_batch_size derives the accumulation from the number of processes)"
            )
        return self


class OptimConfig(_Section):
    name: Literal["adafactor", "adamw", "adamw8bit"] = "adamw"
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    scheduler: Literal["constant", "constant_with_warmup", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    fused_backward: bool = Field(
        False,
        description="step each weight as soon as its gradient is ready (full gradients never held); "
        "train.max_grad_norm then clips each weight's gradient on its own",
    )

    @model_validator(mode="after")
    def _check_warmup(self) -> OptimConfig:
        if self.warmup_steps and self.scheduler == "constant":
            raise ValueError(
                f"warmup_steps = {self.warmup_steps} has no effect with scheduler = 'constant' (the learning "
                "rate is full from step 0); use scheduler = 'constant_with_warmup' (or warmup_steps = 0)"
            )
        return self


# ---- [performance]: memory and speed. None of these changes what is trained, only how fast and in how much
# memory; each is applied in one place, `models/sdxl.py::apply_performance_options`.
class PerformanceConfig(_Section):
    attention: Literal["sdpa", "xformers"] = Field(
        "sdpa", description="UNet attention: PyTorch SDPA, or xformers (needs loratk[xformers] and a GPU)"
    )
    tf32: bool = Field(True, description="TF32 matmuls and convolutions on Ampere and newer GPUs")
    channels_last: bool = Field(False, description="UNet weights in channels_last memory format")
    compile_unet: bool = Field(False, description="torch.compile the UNet (slow first step)")


class ExportConfig(_Section):
    dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    every_n_epochs: int | None = Field(
        None, gt=0, description="default: 1 for LoRA adapters, final only for full (DreamBooth) weights"
    )
    diffusers: bool = Field(
        False, description="LoRA: also write the PEFT/diffusers layout to <name>_diffusers/ (full: always)"
    )
    extract_lora_rank: int | None = Field(
        None, gt=0, description="full runs: also write <name>.lora.safetensors, SVD of (tuned - base)"
    )


class SampleConfig(_Section):
    prompts: list[str] = Field(
        default_factory=list,
        description="prompts in kohya syntax ('a cat --n blurry --d 3'); no prompts = no sampling",
    )
    prompts_file: str | None = Field(None, description="kohya sample-prompt file, one prompt a line")
    negative_prompt: str = Field("", description="default negative prompt (a line's --n replaces it)")
    seeds: list[int] = Field([0], min_length=1, description="every prompt is rendered once per seed")
    every_n_epochs: int = Field(1, gt=0, description="sample every N epochs (the last epoch always)")
    at_start: bool = Field(True, description="render the base model once before training, to samples/base/")
    steps: int = Field(30, gt=0)
    guidance: float = Field(7.0, ge=0, description="classifier-free guidance (CFG) scale")
    scheduler: Literal["euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras"] = "euler"
    size: int | tuple[int, int] | None = Field(None, description="default: data.resolution")

    @field_validator("prompts")
    @classmethod
    def _check_prompts(cls, value: list[str]) -> list[str]:
        from loratk.prompts import TRAINING_LORA_TAGS, parse_prompt_line

        for number, line in enumerate(value, start=1):
            try:
                spec = parse_prompt_line(line)
            except ValueError as err:
                raise ValueError(f"prompt {number}: {err}") from None
            if spec.loras:
                raise ValueError(f"prompt {number}: {TRAINING_LORA_TAGS}")
        return value

    @field_validator("size")
    @classmethod
    def _check_size(cls, value: int | tuple[int, int] | None) -> int | tuple[int, int] | None:
        return None if value is None else _check_image_size(value)

    @model_validator(mode="after")
    def _check_source(self) -> SampleConfig:
        if self.prompts and self.prompts_file:
            raise ValueError("give either prompts or prompts_file, not both")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.prompts or self.prompts_file)


class Recipe(_Section):
    name: str = Field(
        ..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="run name = folder under output_dir"
    )
    method: Method = "lora"
    output_dir: str = "runs"
    seed: int = 42
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    dreambooth: DreamBoothConfig | None = None
    lora: LoraConfig = LoraConfig()
    full: FullConfig = FullConfig()
    train: TrainConfig = TrainConfig()
    optim: OptimConfig = OptimConfig()
    performance: PerformanceConfig = PerformanceConfig()
    export: ExportConfig = ExportConfig()
    sample: SampleConfig = SampleConfig()

    @model_validator(mode="after")
    def _check_method(self) -> Recipe:
        problems = []
        if self.method == "lora":
            if self.data.dir is None and not self.data.subsets:
                problems.append(
                    "data.dir: required for method 'lora': set it to a folder of captioned images "
                    "(or add [[data.subsets]] for several folders)"
                )
            if self.dreambooth is not None:
                problems.append("dreambooth: only for methods 'dreambooth' / 'dreambooth-lora'")
        else:
            db = self.dreambooth
            if db is None:
                problems.append(
                    f"dreambooth: method {self.method!r} needs a [dreambooth] section "
                    "(instance_dir, instance_prompt, class_prompt)"
                )
            elif db.prior_preservation and not db.class_prompt:
                problems.append(
                    "dreambooth.class_prompt: required with prior_preservation = true (e.g. 'a picture of a girl')"
                )
            if self.data.dir is not None or self.data.subsets:
                problems.append(
                    "data.dir: not used by DreamBooth (nor [[data.subsets]]); set dreambooth.instance_dir instead"
                )
        if self.optim.fused_backward:
            if self.train.gradient_accumulation_steps > 1:
                problems.append(
                    "optim.fused_backward: steps each weight during backward, so it cannot accumulate; "
                    "set train.gradient_accumulation_steps = 1 (or fused_backward = false)"
                )
            if self.train.mixed_precision == "fp16":
                problems.append(
                    "optim.fused_backward: fp16 needs a gradient scaler, which steps all weights at once; "
                    "use train.mixed_precision = 'bf16' (or fused_backward = false)"
                )
        if self.export.extract_lora_rank is not None and self.method != "dreambooth":
            problems.append("export.extract_lora_rank: only for full weights (method 'dreambooth')")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @property
    def text_encoder_lr(self) -> float:
        """The text encoders' learning rate: as given, else a tenth of the UNet's for LoRA (kohya users set
        it about 10x lower; CLIP overfits fast) and the UNet's for full fine-tuning (diffusers' DreamBooth)."""
        given = self.full.text_encoder_lr if self.method == "dreambooth" else self.lora.text_encoder_lr
        if given is not None:
            return given
        return self.train.learning_rate if self.method == "dreambooth" else self.train.learning_rate / 10

    @property
    def sample_size(self) -> tuple[int, int]:
        """(width, height) of samples: `sample.size`, else the training resolution."""
        return _as_size(self.sample.size if self.sample.size is not None else self.data.resolution)


class RecipeError(ValueError):
    """Every problem found in a recipe, one line each."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s) in the recipe:\n{lines}")


# ---------------------------------------------------------------- loading


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a TOML recipe, apply `a.b=value` overrides, validate, and return it."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(str(path), ["file not found; check the path (recipes live in recipes/)"]) from None
    except UnicodeDecodeError as err:
        raise RecipeError(
            str(path), [f"not UTF-8 text (byte {err.start}); save the recipe as UTF-8"]
        ) from None
    except tomllib.TOMLDecodeError as err:
        raise RecipeError(str(path), [f"invalid TOML: {err}"]) from None
    problems: list[str] = []
    for item in overrides:
        try:
            apply_override(raw, item)
        except ValueError as err:
            problems.append(str(err))
    if problems:
        raise RecipeError(str(path), problems)
    return validate_recipe(raw, source=str(path))


def validate_recipe(raw: dict[str, Any], source: str = "<recipe>") -> Recipe:
    """Validate strictly: a value of the wrong type (`"1e-3"`, `8.0` for a rank) is an error, not converted.

    Through JSON, so TOML arrays are accepted where the schema has a tuple (`betas = [0.9, 0.999]`).
    """
    try:
        return Recipe.model_validate_json(json.dumps(raw, default=str), strict=True)
    except ValidationError as err:
        problems: dict[str, str] = {}
        errors = err.errors()
        # A union field (`resolution`: a number or [w, h]) fails once per member: say what each accepts.
        expected: dict[str, list[str]] = {}
        for e in errors:
            if e["type"] in _EXPECTED_TYPES:
                expected.setdefault(_path(e), []).append(_EXPECTED_TYPES[e["type"]])
        for e in errors:
            if e["type"] in _EXPECTED_TYPES:
                path = _path(e)
                problems.setdefault(path, _describe_type(path, expected[path], e.get("input")))
                continue
            # The cross-section checks report several lines at once, each with its own path.
            for line in _describe(e).split("\n"):
                # A union field (e.g. `targets`) fails once per member; one line per key is enough.
                problems.setdefault(line.split(":", 1)[0], line)
        raise RecipeError(source, list(problems.values())) from None


def parse_override_value(text: str) -> Any:
    """TOML value syntax (`3`, `1e-4`, `true`, `[1, 2]`, `"x"`); anything else is a plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one `section.key=value` override to a raw recipe dict, in place."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ValueError(f"{item!r}: overrides look like section.key=value, e.g. train.epochs=3")
    *parents, leaf = key.split(".")
    node = raw
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"{'.'.join(parents[: i + 1])}: is a value, not a section; cannot set {key}")
        node = child
    node[leaf] = parse_override_value(value.strip())


def resolved_values(recipe: Recipe) -> dict[str, Any]:
    """What the recipe leaves unset and loratk derives from other keys, by dotted key.

    Values that depend on the model or the data (the prediction type, steps per epoch) are in `plan.py` and
    the run's log instead.
    """
    from loratk.data.buckets import default_bucket_sides
    from loratk.files import default_data_cache_dir

    data, width_height = recipe.data, recipe.data.size
    values: dict[str, Any] = {
        "data.min_side": max(1, min(width_height) // 4),
        "data.cache_dir": str(default_data_cache_dir()),
        "sample.size": list(recipe.sample_size),
        "lora.alpha": recipe.lora.scale_alpha,
        ("full" if recipe.method == "dreambooth" else "lora") + ".text_encoder_lr": recipe.text_encoder_lr,
    }
    if data.buckets:
        low, high = default_bucket_sides(width_height[0] * width_height[1], data.bucket_step)
        values.update({"data.bucket_min_side": low, "data.bucket_max_side": high})
    if recipe.dreambooth is not None:
        values["dreambooth.class_dir"] = str(recipe.run_dir / "class_images")
    return values


def dump_recipe(recipe: Recipe) -> str:
    """The recipe with every default and derived value filled in, as TOML (`recipe.resolved.toml`).

    Loading it gives a recipe that trains exactly the same; dumping that again gives the same text.
    """
    import tomli_w

    raw = recipe.model_dump(mode="json")  # every key, in the schema's order; unset ones are None
    for key, value in resolved_values(recipe).items():
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node[part]
        if node.get(leaf) is None:  # a value the recipe gives is kept
            node[leaf] = value
    return tomli_w.dumps(_without_none(raw))


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value]
    return value


# ---------------------------------------------------------------- comparing recipes

# Keys that may change between a run and its resumption: they do not change the math of steps already taken.
RESUMABLE_CHANGES = (
    "output_dir",
    "train.epochs",
    "train.max_steps",
    "train.resume",
    "train.save_state_every_n_steps",
    "train.keep_states",
    "train.max_nonfinite_steps",
    "train.log_every_n_steps",
    "train.report_to",
    "data.num_workers",
    "data.cache_dir",  # where the caches live, not what they hold (entries are keyed by content)
    "train.gradient_checkpointing",  # recomputes the same activations
    "performance.",  # speed and memory only (an OOM'd run can resume with other settings)
    "export.",
    "sample.",
)


def _flatten(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def recipe_diff(old_toml: str, new: Recipe, ignore: tuple[str, ...] = RESUMABLE_CHANGES) -> list[str]:
    """Lines `key: old -> new` for every setting that differs, except the `ignore`d prefixes."""
    raw = tomllib.loads(old_toml)
    with contextlib.suppress(RecipeError):  # by this or an older loratk: fill in what it left unset as now
        raw = tomllib.loads(dump_recipe(validate_recipe(raw)))
    old = _flatten(raw)
    cur = _flatten(tomllib.loads(dump_recipe(new)))
    lines = []
    for key in sorted(set(old) | set(cur)):
        if key.startswith(ignore) or old.get(key) == cur.get(key):
            continue
        lines.append(f"{key}: {old.get(key, '(unset)')!r} -> {cur.get(key, '(unset)')!r}")
    return lines


# ---------------------------------------------------------------- error messages


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """The field names the schema allows at `loc` (the location of the offending key's parent)."""
    model: type[BaseModel] = Recipe
    for part in loc:
        if isinstance(part, int):  # an index into a list of sections, e.g. data.subsets[0]
            continue
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if typing.get_origin(annotation) is list:
            annotation = typing.get_args(annotation)[0]
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else f"allowed: {', '.join(choices)}"


# What a value of each kind of field looks like in TOML (strict validation: no silent conversions).
_EXPECTED_TYPES = {
    "int_type": "a whole number",
    "float_type": "a number",
    "string_type": "a string in quotes",
    "bool_type": "true or false",
    "tuple_type": "a list such as [1, 2]",
    "list_type": "a list such as [1, 2]",
    "model_type": "a section",
    "dict_type": "a section",
}
_TOML_KIND = {str: "a string", bool: "a boolean", int: "a whole number", float: "a number", list: "a list"}


def _clean_loc(error: dict[str, Any]) -> tuple[Any, ...]:
    loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and p.startswith(("function-", "tagged"))))
    # pydantic adds union-member names (e.g. 'int', 'tuple[int,int]') to the location; drop them.
    return tuple(
        p
        for p in loc
        if not (isinstance(p, str) and ("[" in p or p in {"int", "float", "str", "list", "bool"}))
    )


def _path(error: dict[str, Any], loc: tuple[Any, ...] | None = None) -> str:
    loc = _clean_loc(error) if loc is None else loc
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "(top level)"


def _describe_type(path: str, expected: list[str], given: Any) -> str:
    """`train.learning_rate: expected a number, got '1e-3' (a string); write it without quotes: 1e-3`."""
    wanted = " or ".join(dict.fromkeys(expected))
    kind = next((name for t, name in _TOML_KIND.items() if type(given) is t), type(given).__name__)
    line = f"{path}: expected {wanted}, got {given!r} ({kind})"
    if isinstance(given, str):
        try:
            parsed = tomllib.loads(f"v = {given}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = None
        if parsed is not None and not isinstance(parsed, str):
            line += f"; write it without quotes: {given}"
    elif isinstance(given, float) and given.is_integer() and "a whole number" in expected:
        line += f"; write {int(given)}"
    return line


def _describe(error: dict[str, Any]) -> str:
    loc = _clean_loc(error)
    path = _path(error, loc)
    kind = error["type"]
    ctx = error.get("ctx", {})
    given = error.get("input")
    if kind == "extra_forbidden":
        allowed = _fields_at(loc[:-1])
        return f"{path}: unknown key ({_suggest(str(loc[-1]), allowed)})"
    if kind == "missing" and loc and isinstance(loc[-1], int):  # a list too short for a fixed-size field
        return (
            f"{_path(error, loc[:-1])}: expected at least {loc[-1] + 1} values, got {len(given)}: {given!r}"
        )
    if kind == "missing":
        return f"{path}: required key is missing; add it to the recipe"
    if kind == "too_long":
        return f"{path}: too many values: {error['msg'].lower()}"
    if kind in {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}:
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[
            kind
        ]
        bound = next(iter(ctx.values()))
        bound = int(bound) if isinstance(bound, float) and bound.is_integer() else bound
        return f"{path}: must be {op} {bound}, got {given!r}"
    if kind == "literal_error":
        expected = ctx.get("expected", "")
        choices = [c.strip().strip("'") for c in expected.replace(" or ", ", ").split(",") if c.strip()]
        hint = _suggest(str(given), choices)
        return f"{path}: must be one of {expected}, got {given!r} ({hint})"
    if kind == "string_pattern_mismatch":
        return (
            f"{path}: {given!r} is not allowed; use letters, digits, '_', '-' and '.' (no spaces or slashes)"
        )
    if kind == "value_error":
        message = str(ctx.get("error", error["msg"]))
        return message if not loc else f"{path}: {message}"
    return f"{path}: {error['msg'].lower()}, got {given!r}"
