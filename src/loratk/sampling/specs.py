"""What to render: one `ImageSpec` per image (prompt, seed, size, steps, CFG), from prompt lines x seeds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from loratk.prompts import PromptSpec


class SampleError(ValueError):
    """Bad sampling input (a file, a prompt, a LoRA that does not fit); the message names the file."""


@dataclass(frozen=True)
class ImageSpec:
    """Everything that fixes one image."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    seed: int
    steps: int
    guidance: float
    index: int = 1  # 1-based prompt number: file names and grid labels
    loras: tuple[tuple[str, float], ...] = ()  # <lora:name:w> tags of the prompt

    @property
    def filename(self) -> str:
        return f"{self.index:02d}-seed{self.seed}.png"

    @property
    def label(self) -> str:
        return f"#{self.index} seed {self.seed}: {self.prompt}"


def expand_prompts(
    prompts: Sequence[PromptSpec],
    *,
    seeds: Sequence[int],
    width: int,
    height: int,
    steps: int,
    guidance: float,
    negative_prompt: str = "",
) -> list[ImageSpec]:
    """Prompt lines x seeds -> one ImageSpec per image; a line's own options (`--d`, `--w` ...) win."""
    specs = []
    for index, p in enumerate(prompts, start=1):
        for seed in [p.seed] if p.seed is not None else seeds:
            specs.append(
                ImageSpec(
                    prompt=p.prompt,
                    negative_prompt=p.negative_prompt if p.negative_prompt is not None else negative_prompt,
                    width=p.width or width,
                    height=p.height or height,
                    seed=seed,
                    steps=p.steps or steps,
                    guidance=p.guidance if p.guidance is not None else guidance,
                    index=index,
                    loras=p.loras,
                )
            )
    return specs
