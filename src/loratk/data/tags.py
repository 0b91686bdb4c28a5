"""Caption text as tags: the trigger word put in front once, and comma-separated tags shuffled per sample
(freely, or as one of N fixed shuffles that a text cache can hold)."""

from __future__ import annotations

import random
import re


def apply_trigger_word(caption: str, trigger: str | None) -> str:
    """Put the trigger word once at the front, unless the caption already has it.

    A trigger that is already one of the comma-separated tags moves to the front; one that already
    appears as a word in prose ("a photo of sks dog") is left where it is.
    """
    if not trigger:
        return caption
    if caption == trigger or caption.startswith((trigger + ",", trigger + " ")):
        return caption
    tags = [t.strip() for t in caption.split(",")]
    if trigger in tags:
        return ", ".join([trigger] + [t for t in tags if t and t != trigger])
    if re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", caption):
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def split_tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


def shuffle_tags(caption: str, keep_tokens: int, rng: random.Random, trigger: str | None = None) -> str:
    """Shuffle comma-separated tags; the first `keep_tokens` tags (and a leading trigger word) stay put."""
    tags = split_tags(caption)
    keep = keep_tokens + (1 if trigger and tags and tags[0] == trigger else 0)
    fixed, rest = tags[:keep], tags[keep:]
    rng.shuffle(rest)
    return ", ".join(fixed + rest)


def tag_shuffle_variant(caption: str, keep_tokens: int, variant: int, trigger: str | None = None) -> str:
    """Shuffled variant number `variant` of a caption: a pure function of (caption, variant)."""
    return shuffle_tags(caption, keep_tokens, random.Random(f"tags-{variant}-{caption}"), trigger)
