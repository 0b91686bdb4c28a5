"""The evaluation numbers, as pure math on feature tensors and image batches (no model is loaded here).

FID, KID and IS come from torchmetrics, fed features that an evaluator computed before; the similarity
scores of the DreamBooth paper (CLIP-I, CLIP-T, DINO) are cosine means; PSNR and SSIM compare paired images.
Every function checks its input first and raises `MetricError`, naming the metric and what is wrong.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

# The fewest images each metric takes (per side, for the two-set metrics). FID and KID need two to form a
# covariance / an unbiased kernel mean; the rest are defined from one image (or one pair).
MIN_IMAGES = {
    "fid": 2,
    "kid": 2,
    "is": 1,
    "clip_i": 1,
    "clip_t": 1,
    "dino": 1,
    "psnr": 1,
    "ssim": 1,
}
SSIM_MIN_SIDE = 11  # torchmetrics' default Gaussian window is 11 x 11
# Below this many images (per side), FID is biased upward by an amount that depends on the model scored
# (Chong & Forsyth 2019, "Effectively Unbiased FID and Inception Score and where to find them"), so it
# does not compare across sample sizes; KID is an unbiased estimate (Binkowski et al. 2018, "Demystifying
# MMD GANs") and the better headline for small sets.
FID_RELIABLE_IMAGES = 2000


class MetricError(ValueError):
    """Bad input to a metric; the message starts with the metric's name (`kid: needs at least 2 ...`)."""


def check_finite(
    metric: str, tensor: Tensor, labels: Sequence[str] | None = None, *, noun: str = "image"
) -> None:
    """Raise `MetricError` naming the first row (counted from 0) of `tensor` that holds a NaN or an inf.

    `labels[i]` names row i in the message (a file name, a prompt), so the user can find the bad image.
    """
    if not tensor.is_floating_point() or tensor.dim() == 0:
        return
    bad = ~torch.isfinite(tensor.reshape(tensor.shape[0], -1)).all(dim=1)  # [N]
    if not bad.any():
        return
    row = int(bad.nonzero()[0])
    where = f" ({labels[row]})" if labels is not None and row < len(labels) else ""
    raise MetricError(f"{metric}: {noun} {row}{where} has non-finite values")


def _require(metric: str, count: int, what: str) -> None:
    """`what` is the counted thing, singular: "generated image", "prompt"."""
    least = MIN_IMAGES[metric]
    if count < least:
        raise MetricError(f"{metric}: needs at least {least} {what}{'' if least == 1 else 's'}, got {count}")


def _features(metric: str, features: Tensor, what: str) -> Tensor:
    """`features` as float64 [N, D] on the CPU, after the shape, count and finiteness checks."""
    if not isinstance(features, Tensor) or features.dim() != 2:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise MetricError(f"{metric}: {what} features must be a 2-d tensor [N, D], got {shape}")
    _require(metric, features.shape[0], what)
    check_finite(metric, features, noun=what)
    return features.detach().to("cpu", torch.float64)


def _same_width(metric: str, a: Tensor, b: Tensor) -> None:
    if a.shape[1] != b.shape[1]:
        raise MetricError(
            f"{metric}: feature widths differ ({a.shape[1]} vs {b.shape[1]}); use one evaluator"
        )


def mean_pairwise_cosine(a: Tensor, b: Tensor, *, metric: str = "clip_i") -> float:
    """Mean cosine similarity over all pairs (a_i, b_j): DreamBooth's CLIP-I and DINO (generated vs real)."""
    a, b = _features(metric, a, "generated image"), _features(metric, b, "real image")
    _same_width(metric, a, b)
    a, b = nn.functional.normalize(a, dim=1), nn.functional.normalize(b, dim=1)
    return float((a @ b.T).mean())  # [N, M] -> mean


def mean_paired_cosine(a: Tensor, b: Tensor, *, metric: str = "clip_t") -> float:
    """Mean cosine similarity of row i of `a` with row i of `b`: CLIP-T (image i with its prompt i)."""
    a, b = _features(metric, a, "generated image"), _features(metric, b, "prompt")
    _same_width(metric, a, b)
    if a.shape[0] != b.shape[0]:
        raise MetricError(f"{metric}: {a.shape[0]} images but {b.shape[0]} prompts; they pair row by row")
    return float(nn.functional.cosine_similarity(a, b, dim=1).mean())


class _PassThrough(nn.Module):
    """Hands torchmetrics the features we already computed.

    torchmetrics' FID, KID and IS run their `feature=` module on whatever `update` receives and keep its
    output. Giving them this identity module with the feature width as `num_features` (so FID does not
    probe it with a dummy image) lets us `update` with precomputed [N, D] features: the images were turned
    into features once, by our own evaluator (torchvision-free), and can be reused from the feature cache.
    """

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


def frechet_distance(real: Tensor, fake: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID on Inception pool features)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = _features("fid", real, "real image"), _features("fid", fake, "generated image")
    _same_width("fid", real, fake)
    fid = FrechetInceptionDistance(feature=_PassThrough(real.shape[1]))  # its sums are float64
    fid.update(real, real=True)
    fid.update(fake, real=False)
    return float(fid.compute())


def kernel_distance(
    real: Tensor, fake: Tensor, *, subset_size: int | None = None, subsets: int = 100, seed: int = 0
) -> tuple[float, float]:
    """KID: the unbiased MMD² with the cubic polynomial kernel, as (mean, std) over random subsets.

    `subset_size` defaults to min(n_real, n_fake) (torchmetrics' 1000 fails on small sets). The std is the
    spread over subsets (population std, as torchmetrics). The subsets are drawn from `seed` under a forked
    RNG, so a call is reproducible and never moves the caller's random state.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = _features("kid", real, "real image"), _features("kid", fake, "generated image")
    _same_width("kid", real, fake)
    most = min(real.shape[0], fake.shape[0])
    size = most if subset_size is None else subset_size
    if not 2 <= size <= most:
        raise MetricError(f"kid: subset_size must be between 2 and min(n_real, n_fake) = {most}, got {size}")
    if subsets < 1:
        raise MetricError(f"kid: subsets must be at least 1, got {subsets}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "will save all extracted features": we know
        kid = KernelInceptionDistance(feature=_PassThrough(real.shape[1]), subsets=subsets, subset_size=size)
    kid.update(real, real=True)
    kid.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = kid.compute()
    return float(mean), float(std)


def inception_score(logits: Tensor, *, splits: int | None = None, seed: int = 0) -> tuple[float, float]:
    """Inception Score exp(E_x KL(p(y|x) || p(y))) from class logits [N, K], as (mean, std) over splits.

    `splits` defaults to 10 from 100 images, else 1 (then std is 0). The images are shuffled into splits
    from `seed` under a forked RNG: reproducible, and the caller's random state is untouched.
    """
    from torchmetrics.image.inception import InceptionScore

    logits = _features("is", logits, "generated image")
    n = logits.shape[0]
    splits = (10 if n >= 100 else 1) if splits is None else splits
    if not 1 <= splits <= n:
        raise MetricError(f"is: splits must be between 1 and the number of images ({n}), got {splits}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        score = InceptionScore(feature=_PassThrough(logits.shape[1]), splits=splits)
    score.update(logits)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the std of one split, which we replace by 0
        torch.manual_seed(seed)
        mean, std = score.compute()
    return float(mean), 0.0 if splits == 1 else float(std)


def _paired_images(metric: str, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Both batches as float64 [N, 3, H, W] in [0, 1], after the checks."""
    for what, x in (("first", a), ("second", b)):
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise MetricError(f"{metric}: the {what} batch must be float images [N, 3, H, W], got {shape}")
    if a.shape != b.shape:
        raise MetricError(f"{metric}: paired batches differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    _require(metric, a.shape[0], "image pair")
    for what, x in (("first", a), ("second", b)):
        check_finite(metric, x, noun=f"{what}-batch image")
        low, high = float(x.min()), float(x.max())
        if low < 0.0 or high > 1.0:
            raise MetricError(
                f"{metric}: the {what} batch has values in [{low:.3g}, {high:.3g}]; expected [0, 1]"
            )
    return a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)


def psnr(a: Tensor, b: Tensor) -> float:
    """Peak signal-to-noise ratio in dB for paired images in [0, 1]: the mean over pairs of
    10·log10(1 / MSE_i). Identical pairs have infinite PSNR, so identical batches give `inf`."""
    from torchmetrics.image.psnr import PeakSignalNoiseRatio

    a, b = _paired_images("psnr", a, b)
    # dim=(1, 2, 3): one PSNR per pair, then the mean (not the PSNR of the pooled MSE).
    metric = PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3))
    metric.set_dtype(
        torch.float64
    )  # (a torchmetrics Metric ignores .double(); its forward() resets to float32)
    metric.update(a, b)
    value = float(metric.compute())
    return math.inf if math.isnan(value) else value


def ssim(a: Tensor, b: Tensor) -> float:
    """Structural similarity (11x11 Gaussian window, σ 1.5) for paired images in [0, 1], mean over pairs."""
    from torchmetrics.image.ssim import StructuralSimilarityIndexMeasure

    a, b = _paired_images("ssim", a, b)
    if min(a.shape[-2:]) < SSIM_MIN_SIDE:
        raise MetricError(
            f"ssim: images must be at least {SSIM_MIN_SIDE}x{SSIM_MIN_SIDE}, got {tuple(a.shape[-2:])}"
        )
    metric = StructuralSimilarityIndexMeasure(data_range=1.0)
    metric.set_dtype(torch.float64)
    metric.update(a, b)
    return float(metric.compute())


def fid_note(n_real: int, n_fake: int, *, dim: int | None = None) -> str | None:
    """A caveat to print beside FID when the sets are too small for it to mean much; None when they are not.

    `dim`, the feature width, adds the rank warning: with fewer images than dimensions a covariance is
    singular and FID is dominated by noise.
    """
    fewest = min(n_real, n_fake)
    if fewest < MIN_IMAGES["fid"]:
        return (
            f"FID needs at least {MIN_IMAGES['fid']} images per side, got {n_real} real / {n_fake} generated"
        )
    notes = []
    if fewest < FID_RELIABLE_IMAGES:
        notes.append(
            f"FID from {n_real} real / {n_fake} generated images is biased upward and does not compare across "
            f"sample sizes; below {FID_RELIABLE_IMAGES:,} images read KID (unbiased) as the headline"
        )
    if dim is not None and fewest <= dim:
        notes.append(f"with {fewest} images and {dim}-d features the covariances are singular")
    return "; ".join(notes) or None
