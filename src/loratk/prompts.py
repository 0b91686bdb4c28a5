"""Prompt text that users already know: kohya prompt-file lines, A1111 `<lora:name:w>` tags, and the A1111
`parameters` PNG text. Pure string handling (no torch), so the recipe can validate prompts up front.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# kohya sample-prompt options (shared/REFERENCE.md §2): ` --n` negative, `--w`/`--h` size, `--d` seed,
# `--s` steps, `--l` CFG scale.
_OPTIONS = {"n": "negative prompt", "w": "width", "h": "height", "d": "seed", "s": "steps", "l": "CFG scale"}
_KOHYA_ONLY = {
    "ss": "--ss is kohya's per-prompt sampler; loratk uses one scheduler for all prompts "
    "([sample].scheduler or `loratk sample --scheduler`), so remove it",
}
_LORA_TAG = re.compile(r"<lora:([^>]*)>", re.IGNORECASE)

# Rendering defaults, one source for the [sample] section, class images and `loratk sample` without a run.
DEFAULT_SEEDS: tuple[int, ...] = (0,)
DEFAULT_STEPS = 30
DEFAULT_GUIDANCE = 7.0


class PromptError(ValueError):
    """A prompt that cannot be read; the message names where it came from (file and line, or recipe key)."""


@dataclass(frozen=True)
class PromptSpec:
    """One prompt line: the text plus the options given on that line (None = use the run's default)."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    loras: tuple[tuple[str, float], ...] = field(default=())  # from <lora:name:w> tags, in order


def _positive_int(option: str, value: str, multiple_of: int = 1) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"--{option} needs a whole number, got {value!r}") from None
    if number <= 0 or number % multiple_of:
        rule = f"a positive multiple of {multiple_of}" if multiple_of > 1 else "positive"
        raise ValueError(f"--{option} must be {rule}, got {number}")
    return number


def extract_lora_tags(text: str) -> tuple[str, tuple[tuple[str, float], ...]]:
    """`"a cat <lora:epoch7:0.8>"` -> (`"a cat"`, `(("epoch7", 0.8),)`). The weight defaults to 1."""
    tags: list[tuple[str, float]] = []
    for match in _LORA_TAG.finditer(text):
        fields = match[1].split(":")
        name = fields[0].strip()
        if not name or len(fields) > 2:
            raise ValueError(f"{match[0]!r} is not a LoRA tag; write <lora:NAME> or <lora:NAME:WEIGHT>")
        weight = 1.0
        if len(fields) == 2:
            try:
                weight = float(fields[1])
            except ValueError:
                raise ValueError(
                    f"{match[0]!r}: the weight {fields[1]!r} is not a number (e.g. <lora:{name}:0.8>)"
                ) from None
        tags.append((name, weight))
    rest = _LORA_TAG.sub(" ", text)
    if re.search(r"<lora:", rest, re.IGNORECASE):
        raise ValueError("a '<lora:' tag is not closed with '>'")
    return " ".join(rest.split()), tuple(tags)


def parse_prompt_line(line: str) -> PromptSpec:
    """Parse one kohya prompt line: `a cat, detailed --n blurry --w 1024 --h 768 --d 1 --s 30 --l 7`.

    Raises ValueError with a message that says what is wrong (the caller adds where).
    """
    text, *options = line.strip().split(" --")
    if text.startswith("--"):
        raise ValueError("the line starts with an option; the prompt text comes first")
    prompt, loras = extract_lora_tags(text)
    if not prompt:
        raise ValueError("the prompt is empty")
    values: dict[str, Any] = {}
    seen: set[str] = set()
    for option in options:
        key, _, value = option.strip().partition(" ")
        key, value = key.lower(), value.strip()
        if key in _KOHYA_ONLY:
            raise ValueError(_KOHYA_ONLY[key])
        if key not in _OPTIONS:
            known = " ".join(f"--{k}" for k in _OPTIONS)
            raise ValueError(f"unknown option --{key} (known: {known})")
        if key in seen:
            raise ValueError(f"--{key} is given twice")
        seen.add(key)
        if not value and key != "n":
            raise ValueError(f"--{key} ({_OPTIONS[key]}) needs a value")
        if key == "n":
            values["negative_prompt"] = value
        elif key in ("w", "h"):
            values["width" if key == "w" else "height"] = _positive_int(key, value, multiple_of=8)
        elif key == "s":
            values["steps"] = _positive_int(key, value)
        elif key == "d":
            try:
                values["seed"] = int(value)
            except ValueError:
                raise ValueError(f"--d needs a whole-number seed, got {value!r}") from None
        else:  # "l"
            try:
                values["guidance"] = float(value)
            except ValueError:
                raise ValueError(f"--l needs a number (CFG scale), got {value!r}") from None
            if values["guidance"] < 0:
                raise ValueError(f"--l must be >= 0, got {value}")
    return PromptSpec(prompt=prompt, loras=loras, **values)


TRAINING_LORA_TAGS = (
    "<lora:...> tags are for `loratk sample`; during training the run's own adapter is applied"
)


def parse_prompt_lines(
    lines: Sequence[str], source: str, *, allow_lora_tags: bool = True
) -> list[PromptSpec]:
    """Parse prompt-file lines: blank lines and `#` comments are skipped; errors name `source:line`."""
    specs = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            spec = parse_prompt_line(line)
        except ValueError as err:
            raise PromptError(f"{source}:{number}: {err}") from None
        if spec.loras and not allow_lora_tags:
            raise PromptError(f"{source}:{number}: {TRAINING_LORA_TAGS}")
        specs.append(spec)
    return specs


def load_prompts_file(path: str | os.PathLike, *, allow_lora_tags: bool = True) -> list[PromptSpec]:
    """Read a kohya sample-prompt file (UTF-8, one prompt a line)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PromptError(f"{path}: prompts file not found") from None
    except UnicodeDecodeError as err:
        raise PromptError(f"{path}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except OSError as err:
        raise PromptError(f"{path}: cannot read the prompts file: {err.strerror or err}") from None
    specs = parse_prompt_lines(text.splitlines(), str(path), allow_lora_tags=allow_lora_tags)
    if not specs:
        raise PromptError(f"{path}: no prompts (every line is blank or a # comment)")
    return specs


# ---------------------------------------------------------------- A1111 `parameters` text


def _quote(value: str) -> str:
    """A1111's quoting: values with ',', ':' or a newline are written as JSON strings."""
    return json.dumps(value, ensure_ascii=False) if any(c in value for c in ",:\n") else value


def _format_number(value: float) -> str:
    return f"{value:g}"


def format_lora_tags(loras: Sequence[tuple[str, float]]) -> str:
    return " ".join(f"<lora:{name}:{_format_number(weight)}>" for name, weight in loras)


def format_parameters(
    *,
    prompt: str,
    negative_prompt: str,
    steps: int,
    sampler: str,
    guidance: float,
    seed: int,
    width: int,
    height: int,
    model: str | None = None,
    loras: Sequence[tuple[str, float]] = (),
    epoch: int | None = None,
    extra: dict[str, str] | None = None,
) -> str:
    """The A1111 `parameters` text: prompt (with its `<lora:name:w>` tags, as A1111 writes them), then
    `Negative prompt: ...`, then `Steps: 30, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 1024x1024, ...`.

    A1111's "PNG Info -> Send to txt2img" reads it back, LoRAs included.
    """
    lines = [" ".join(filter(None, [prompt, format_lora_tags(loras)]))]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    fields: dict[str, str] = {
        "Steps": str(steps),
        "Sampler": sampler,
        "CFG scale": _format_number(guidance),
        "Seed": str(seed),
        "Size": f"{width}x{height}",
    }
    if model:
        fields["Model"] = model
    if loras:
        fields["Lora weights"] = ", ".join(f"{n}: {_format_number(w)}" for n, w in loras)
    if epoch is not None:
        fields["Epoch"] = str(epoch)
    fields.update(extra or {})
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in fields.items()))
    return "\n".join(lines)


# A1111's own pattern for `key: value` pairs (modules/infotext_utils.py).
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_parameters(text: str) -> dict[str, Any]:
    """Read an A1111 `parameters` text back into a dict.

    Keys: `prompt` (without LoRA tags), `loras` [(name, weight)], `negative_prompt`, plus every `Key: value`
    field as written; `steps`, `seed`, `cfg_scale`, `width`, `height` and `epoch` are also given as numbers.
    """
    lines = text.strip().split("\n")
    last = lines[-1]
    if len(_PARAM.findall(last)) < 3:  # no settings line
        last = ""
    else:
        lines = lines[:-1]
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    target = prompt_lines
    for line in lines:
        if line.startswith("Negative prompt:"):
            target = negative_lines
            line = line[len("Negative prompt:") :].strip()
        target.append(line)
    prompt, loras = extract_lora_tags("\n".join(prompt_lines))
    out: dict[str, Any] = {
        "prompt": prompt,
        "loras": list(loras),
        "negative_prompt": "\n".join(negative_lines),
    }
    for key, value in _PARAM.findall(last):
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            value = json.loads(value)
        out[key] = value
    for key, name, kind in (
        ("Steps", "steps", int),
        ("Seed", "seed", int),
        ("CFG scale", "cfg_scale", float),
        ("Epoch", "epoch", int),
    ):
        if key in out:
            out[name] = kind(out[key])
    if "Size" in out:
        width, _, height = out["Size"].partition("x")
        out["width"], out["height"] = int(width), int(height)
    return out
