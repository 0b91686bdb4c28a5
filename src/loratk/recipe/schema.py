"""The recipe's top level: its sections, and the checks across sections; what each method needs is checked
by the method registry."""

from __future__ import annotations

import difflib
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from loratk.recipe.evaluation import EvalConfig
from loratk.recipe.gan import GanConfig
from loratk.recipe.sections import (
    DataConfig,
    DreamBoothConfig,
    ExportConfig,
    FullConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    PerformanceConfig,
    SampleConfig,
    Section,
    TrainConfig,
    as_size,
)


class Recipe(Section):
    name: str = Field(
        ..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="run name = folder under output_dir"
    )
    method: str = Field("lora", description="what to train, and on what: see the method registry")
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
    eval: EvalConfig = EvalConfig()
    gan: GanConfig | None = None  # methods 'dcgan' and 'wgan-gp'

    @field_validator("method")
    @classmethod
    def _check_method_name(cls, value: str) -> str:
        from loratk.components.methods import methods

        known = list(methods())
        if value not in known:
            close = difflib.get_close_matches(value, known, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else f"allowed: {', '.join(known)}"
            raise ValueError(f"unknown method {value!r} ({hint})")
        return value

    @model_validator(mode="after")
    def _check_method(self) -> Recipe:
        """The method's own checks (from the registry), then those every method shares."""
        from loratk.components.methods import methods

        method = methods()[self.method]
        problems = method.check(self)
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
        if self.export.extract_lora_rank is not None and method.adapter != "full":
            full = [m.name for m in methods().values() if m.adapter == "full"]
            problems.append(
                f"export.extract_lora_rank: only for full weights (method {', '.join(map(repr, full))})"
            )
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
        from loratk.components.methods import methods

        full = methods()[self.method].adapter == "full"
        given = self.full.text_encoder_lr if full else self.lora.text_encoder_lr
        if given is not None:
            return given
        return self.train.learning_rate if full else self.train.learning_rate / 10

    @property
    def sample_size(self) -> tuple[int, int]:
        """(width, height) of samples: `sample.size`, else the training resolution."""
        return as_size(self.sample.size) if self.sample.size is not None else self.data.size
