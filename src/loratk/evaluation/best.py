"""The best-epoch rule: which epoch of a run to use, and a sentence saying why. It only chooses; nothing is
deleted.

"auto": the epoch most like the subject or style (DINO if computed, else CLIP-I) among the epochs that still
follow prompts (CLIP-T at most `tolerance` below the base model's); failing that, the most similar epoch
overall, saying so; without image metrics, the lowest validation loss; without that (a GAN baseline, which has
no prompts), the lowest KID, else FID; without any, None: a run that measured nothing has no best epoch (the report and `loratk compare` say so rather than guess the last one).
Ties go to the earlier epoch. Epoch 0 (the base model) is never chosen.
"""

from __future__ import annotations

from dataclasses import dataclass

from loratk.evaluation.metric_names import Metric, describe_metric, format_value, require_metric
from loratk.evaluation.runs import RunSummary

SIMILARITY = ("dino", "clip_i")  # identity/style similarity, preferred first
DISTRIBUTION = ("kid", "fid")  # distance to the real images, for runs with no prompts (the GAN baselines)
PROMPT_FOLLOWING = "clip_t"


@dataclass(frozen=True)
class BestEpoch:
    epoch: int
    metric: str  # the key the epoch was chosen on
    value: float
    reason: str  # a sentence for the user


def _values(summary: RunSummary, key: str) -> dict[int, float]:
    """The trained epochs' finite values of `key`, in epoch order."""
    return {e: row[key] for e, row in sorted(summary.per_epoch.items()) if e > 0 and row.get(key) is not None}


def _pick(values: dict[int, float], metric: Metric) -> int:
    """The best epoch of `values` (ordered by epoch); a tie keeps the earlier."""
    best = None
    for epoch, value in values.items():
        if best is None or metric.better(value, values[best]):
            best = epoch
    assert best is not None
    return best


def _best_on(summary: RunSummary, metric: Metric) -> BestEpoch | None:
    values = _values(summary, metric.key)
    if not values:
        return None
    epoch = _pick(values, metric)
    word = "highest" if metric.higher_is_better else "lowest"
    return BestEpoch(
        epoch,
        metric.key,
        values[epoch],
        f"epoch {epoch} has the {word} {metric.label} ({format_value(values[epoch])}) of "
        f"{len(values)} evaluated epoch(s).",
    )


def _auto(summary: RunSummary, tolerance: float) -> BestEpoch | None:
    key = next((k for k in SIMILARITY if _values(summary, k)), None)
    if key is None:
        best = _best_on(summary, describe_metric("val/loss"))
        if best is not None:
            return BestEpoch(best.epoch, best.metric, best.value, f"no image metrics; {best.reason}")
        for key in DISTRIBUTION:
            best = _best_on(summary, describe_metric(key))
            if best is not None:
                return BestEpoch(
                    best.epoch, key, best.value, f"no similarity metric or val loss; {best.reason}"
                )
        return None
    metric = describe_metric(key)
    similarity = _values(summary, key)
    label, clip_label = metric.label, describe_metric(PROMPT_FOLLOWING).label
    base = summary.per_epoch.get(0, {}).get(PROMPT_FOLLOWING)
    prompt = _values(summary, PROMPT_FOLLOWING)
    if base is None or not prompt:
        epoch = _pick(similarity, metric)
        why = "the base model's CLIP-T was not measured" if prompt else "CLIP-T was not measured"
        reason = (
            f"epoch {epoch} has the highest {label} ({format_value(similarity[epoch])}); prompt following "
            f"was not checked ({why})."
        )
        return BestEpoch(epoch, key, similarity[epoch], reason)
    floor = base - tolerance
    kept = {e: v for e, v in similarity.items() if e in prompt and prompt[e] >= floor}
    if kept:
        epoch = _pick(kept, metric)
        dropped = sum(1 for e in similarity if e in prompt and prompt[e] < floor)
        reason = (
            f"epoch {epoch} has the highest {label} ({format_value(kept[epoch])}) among the epochs whose "
            f"{clip_label} stays within {tolerance:g} of the base model's ({format_value(base)}; epoch "
            f"{epoch}: {format_value(prompt[epoch])})"
        )
        if dropped:
            reason += f"; {dropped} epoch(s) fell further and were passed over"
        return BestEpoch(epoch, key, kept[epoch], reason + ".")
    epoch = _pick(similarity, metric)
    reason = (
        f"no epoch kept {clip_label} within {tolerance:g} of the base model's ({format_value(base)}), so "
        f"epoch {epoch} is the one with the highest {label} overall ({format_value(similarity[epoch])}, "
        f"{clip_label} {format_value(prompt.get(epoch))}): it may follow prompts worse than the base model."
    )
    return BestEpoch(epoch, key, similarity[epoch], reason)


def choose_best_epoch(summary: RunSummary, metric: str = "auto", tolerance: float = 0.02) -> BestEpoch | None:
    """The best trained epoch of `summary` by `metric` ("auto": the rule above; a metric name from
    `metric_names.METRICS`: its best value, in its direction), or None where nothing was measured.

    `tolerance`: how far (absolute cosine) an epoch's CLIP-T may fall below the base model's under "auto".
    """
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0 (an absolute CLIP-T cosine), got {tolerance}")
    if metric == "auto":
        return _auto(summary, tolerance)
    return _best_on(summary, require_metric(metric))
