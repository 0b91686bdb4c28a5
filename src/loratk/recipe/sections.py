"""The recipe's sections: one frozen pydantic model per TOML table, `extra="forbid"`, with the checks that
need more than one key of a section."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from loratk.prompts import DEFAULT_GUIDANCE, DEFAULT_SEEDS, DEFAULT_STEPS

BUILTIN_TINY = "builtin:tiny-sdxl"
MODEL_FAMILIES = ("sdxl", "sd1", "sd2")  # `models.family.families()`, by name


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_image_size(value: int | tuple[int, int]) -> int | tuple[int, int]:
    sides = (value,) if isinstance(value, int) else value
    for side in sides:
        if side < 8 or side % 8:
            raise ValueError(f"each side must be a multiple of 8 and >= 8, got {side}")
    return value


def as_size(value: int | tuple[int, int]) -> tuple[int, int]:
    """(width, height) from one side (square) or [width, height]."""
    return (value, value) if isinstance(value, int) else value


class ModelConfig(Section):
    path: str = Field(
        "stabilityai/stable-diffusion-xl-base-1.0",
        description="hub id, local diffusers folder, single .safetensors checkpoint, or builtin:tiny-sdxl "
        "(builtin:tiny-sd15, builtin:tiny-sd2, builtin:tiny-sd2-v)",
    )
    family: Literal["auto", "sdxl", "sd1", "sd2"] = Field(
        "auto",
        description="auto = read from the model's files; an explicit family is checked against them",
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


def check_training_prompts(value: list[str]) -> list[str]:
    """Prompt lines rendered during training: each must parse, and none may name a LoRA (the trained one is
    the only LoRA applied)."""
    from loratk.prompts import TRAINING_LORA_TAGS, parse_prompt_line

    for number, line in enumerate(value, start=1):
        try:
            spec = parse_prompt_line(line)
        except ValueError as err:
            raise ValueError(f"prompt {number}: {err}") from None
        if spec.loras:
            raise ValueError(f"prompt {number}: {TRAINING_LORA_TAGS}")
    return value


CaptionSource = Literal["auto", "sidecar", "manifest", "metadata"]


def _check_caption_ext(value: str | None) -> str | None:
    if value is not None and not value.startswith("."):
        raise ValueError(f"must start with '.', got {value!r} (did you mean '.{value}'?)")
    return value


class SubsetConfig(Section):
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


class DataConfig(Section):
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
    resolution: int | tuple[int, int] | None = Field(
        None,
        description="square side, or [width, height]: the training size and the bucket area; default: the "
        "model's own (SDXL 1024, SD 1.x and SD 2.x 512, SD 2.x 768-v 768)",
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
    def _check_resolution(cls, value: int | tuple[int, int] | None) -> int | tuple[int, int] | None:
        return value if value is None else _check_image_size(value)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of training images (loading fills an unset resolution from the model)."""
        if self.resolution is None:
            raise ValueError("data.resolution is not resolved yet; load recipes with validate_recipe")
        return as_size(self.resolution)

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


class LoraConfig(Section):
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


class FullConfig(Section):
    """The full adapter (method 'dreambooth'): every UNet weight trains."""

    train_text_encoders: bool = Field(False, description="also train both text encoders (more memory)")
    text_encoder_lr: float | None = Field(None, gt=0, description="default: train.learning_rate")


class DreamBoothConfig(Section):
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
    class_steps: int = Field(DEFAULT_STEPS, gt=0, description="denoising steps per class image")
    class_guidance: float = Field(DEFAULT_GUIDANCE, ge=0, description="CFG scale of class images")
    class_batch_size: int = Field(4, gt=0, description="class images generated per batch")
    class_seed: int = Field(0, description="class image k uses seed class_seed + k")
    class_negative_prompt: str = ""
    class_scheduler: Literal["euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras"] = "euler"


class TrainConfig(Section):
    epochs: int = Field(10, gt=0)
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps")
    batch_size: Annotated[int, Field(gt=0)] | Literal["auto"] = Field(
        1,
        description="images per device per step; 'auto' = the largest that fits performance.memory_budget "
        "(`loratk plan` predicts it)",
    )
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


class OptimConfig(Section):
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
class PerformanceConfig(Section):
    attention: Literal["sdpa", "xformers"] = Field(
        "sdpa", description="UNet attention: PyTorch SDPA, or xformers (needs loratk[xformers] and a GPU)"
    )
    tf32: bool = Field(True, description="TF32 matmuls and convolutions on Ampere and newer GPUs")
    channels_last: bool = Field(False, description="UNet weights in channels_last memory format")
    compile_unet: bool = Field(False, description="torch.compile the UNet (slow first step)")
    memory_budget: str | None = Field(
        None,
        description="the memory train.batch_size = 'auto' fills, e.g. '24GiB' (default: the GPU's memory); "
        "also `loratk plan`'s default",
    )

    @field_validator("memory_budget")
    @classmethod
    def _check_memory_budget(cls, value: str | None) -> str | None:
        from loratk.memory.sizes import parse_size

        if value is not None:
            parse_size(value)
        return value


class ExportConfig(Section):
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


class SampleConfig(Section):
    prompts: list[str] = Field(
        default_factory=list,
        description="prompts in kohya syntax ('a cat --n blurry --d 3'); no prompts = no sampling",
    )
    prompts_file: str | None = Field(None, description="kohya sample-prompt file, one prompt a line")
    negative_prompt: str = Field("", description="default negative prompt (a line's --n replaces it)")
    seeds: list[int] = Field(
        list(DEFAULT_SEEDS), min_length=1, description="every prompt is rendered once per seed"
    )
    every_n_epochs: int = Field(1, gt=0, description="sample every N epochs (the last epoch always)")
    at_start: bool = Field(True, description="render the base model once before training, to samples/base/")
    steps: int = Field(DEFAULT_STEPS, gt=0)
    guidance: float = Field(DEFAULT_GUIDANCE, ge=0, description="classifier-free guidance (CFG) scale")
    scheduler: Literal["euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras"] = "euler"
    size: int | tuple[int, int] | None = Field(None, description="default: data.resolution")

    _check_prompts = field_validator("prompts")(classmethod(lambda cls, v: check_training_prompts(v)))

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
