"""The evaluation metrics against hand computations on small, seeded inputs (float64 throughout)."""

from __future__ import annotations

import math

import pytest
import torch

from loratk.evaluation.metrics import (
    FID_RELIABLE_IMAGES,
    MIN_IMAGES,
    MetricError,
    check_finite,
    fid_note,
    frechet_distance,
    inception_score,
    kernel_distance,
    mean_paired_cosine,
    mean_pairwise_cosine,
    psnr,
    ssim,
)


def _gaussian(n: int, d: int, seed: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=generator, dtype=torch.float64) * scale + shift


def _cos(u: torch.Tensor, v: torch.Tensor) -> float:
    return float(u @ v) / math.sqrt(float(u @ u) * float(v @ v))


def test_pairwise_cosine_is_the_mean_over_all_pairs():
    a, b = _gaussian(3, 5, 0), _gaussian(4, 5, 1)
    expected = sum(_cos(a[i], b[j]) for i in range(3) for j in range(4)) / 12
    assert mean_pairwise_cosine(a, b) == pytest.approx(expected, abs=1e-12)


def test_paired_cosine_pairs_row_i_with_row_i():
    a, b = _gaussian(4, 5, 2), _gaussian(4, 5, 3)
    expected = sum(_cos(a[i], b[i]) for i in range(4)) / 4
    assert mean_paired_cosine(a, b) == pytest.approx(expected, abs=1e-12)
    assert mean_paired_cosine(a, b) != pytest.approx(mean_pairwise_cosine(a, b), abs=1e-6)
    with pytest.raises(MetricError, match="clip_t: 4 images but 3 prompts"):
        mean_paired_cosine(a, b[:3])


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(m)
    return vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T


def test_frechet_distance_is_the_closed_form_of_the_samples_gaussians():
    real, fake = _gaussian(300, 4, 4), _gaussian(200, 4, 5, scale=1.5, shift=0.3)
    mu_r, mu_f = real.mean(0), fake.mean(0)
    cov_r, cov_f = torch.cov(real.T), torch.cov(fake.T)  # unbiased (n - 1), as FID
    root = _sqrt_psd(cov_r)
    trace_sqrt = _sqrt_psd(root @ cov_f @ root).trace()  # tr sqrt(S_r S_f) = tr sqrt(S_r^½ S_f S_r^½)
    expected = float((mu_r - mu_f).square().sum() + cov_r.trace() + cov_f.trace() - 2 * trace_sqrt)
    assert expected > 0.5
    assert frechet_distance(real, fake) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-9)


def _unbiased_mmd2(x: torch.Tensor, y: torch.Tensor) -> float:
    d, m = x.shape[1], x.shape[0]

    def k(u, v):
        return (float(u @ v) / d + 1.0) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_is_the_unbiased_polynomial_mmd_when_the_subset_is_the_whole_set():
    real, fake = _gaussian(12, 3, 6), _gaussian(12, 3, 7, shift=0.8)
    mean, std = kernel_distance(real, fake, subset_size=12, subsets=5)
    assert mean == pytest.approx(_unbiased_mmd2(real, fake), rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-9)  # every subset is the whole set
    # The default subset size is min(n_real, n_fake): torchmetrics' default of 1000 would fail here.
    assert kernel_distance(real, fake[:10], subsets=3) == kernel_distance(
        real, fake[:10], subset_size=10, subsets=3
    )


def test_kid_subsets_are_seeded_and_leave_the_callers_rng_alone():
    real, fake = _gaussian(30, 3, 8), _gaussian(30, 3, 9, shift=0.5)
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    first = kernel_distance(real, fake, subset_size=8, subsets=20)
    assert torch.equal(torch.get_rng_state(), before)
    assert inception_score(real, splits=3)[0] > 0 and torch.equal(torch.get_rng_state(), before)
    assert kernel_distance(real, fake, subset_size=8, subsets=20) == first  # reproducible
    other = kernel_distance(real, fake, subset_size=8, subsets=20, seed=1)
    assert other != first and first[1] > 0  # the seed does choose the subsets


def test_inception_score_of_known_logits():
    assert inception_score(torch.zeros(40, 7)) == pytest.approx((1.0, 0.0), abs=1e-9)  # uniform: 1
    k = 5
    confident = torch.eye(k, dtype=torch.float64).repeat(8, 1) * 50.0  # k classes, each 8 times
    mean, std = inception_score(confident)
    assert mean == pytest.approx(k, rel=1e-6) and std == 0.0
    one_class = torch.zeros(40, k, dtype=torch.float64)
    one_class[:, 2] = 50.0
    assert inception_score(one_class)[0] == pytest.approx(1.0, abs=1e-6)  # confident but no variety


def test_inception_score_uses_ten_splits_from_a_hundred_images():
    logits = _gaussian(120, 6, 10, scale=3.0)
    assert inception_score(logits) == inception_score(logits, splits=10)
    assert inception_score(logits) != inception_score(logits, splits=1)
    assert inception_score(logits[:99]) == inception_score(logits[:99], splits=1)
    with pytest.raises(MetricError, match="is: splits must be between 1 and the number of images"):
        inception_score(logits[:5], splits=6)


def _images(value: float, n: int = 2, size: int = 16) -> torch.Tensor:
    return torch.full((n, 3, size, size), value, dtype=torch.float64)


def test_psnr_is_the_mean_over_pairs_of_10_log10_one_over_mse():
    # rel 1e-6: torchmetrics converts to base 10 with a float32 constant.
    assert psnr(_images(0.5), _images(0.6)) == pytest.approx(10 * math.log10(1 / 0.01), rel=1e-6)
    a = torch.cat([_images(0.5, 1), _images(0.5, 1)])
    b = torch.cat([_images(0.6, 1), _images(0.7, 1)])  # mse 0.01 and 0.04
    expected = (10 * math.log10(1 / 0.01) + 10 * math.log10(1 / 0.04)) / 2  # not the PSNR of the mean mse
    assert psnr(a, b) == pytest.approx(expected, rel=1e-6)
    assert psnr(a, a) == math.inf


def test_ssim_of_known_images():
    generator = torch.Generator().manual_seed(11)
    noise = torch.rand(2, 3, 24, 24, generator=generator, dtype=torch.float64)
    assert ssim(noise, noise) == pytest.approx(1.0, abs=1e-9)
    # Constant images: no variance, so SSIM is the luminance term (2 m_a m_b + C1) / (m_a² + m_b² + C1).
    c1 = (0.01 * 1.0) ** 2
    expected = (2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1)
    assert ssim(_images(0.2), _images(0.6)) == pytest.approx(expected, rel=1e-9)
    assert ssim(noise, noise.flip(-1)) < 0.5
    with pytest.raises(MetricError, match="ssim: images must be at least 11x11"):
        ssim(_images(0.2, size=8), _images(0.6, size=8))


def test_paired_images_are_checked():
    with pytest.raises(
        MetricError, match=r"psnr: the second batch has values in \[1.5, 1.5\]; expected \[0, 1\]"
    ):
        psnr(_images(0.0), _images(1.5))
    with pytest.raises(MetricError, match="psnr: paired batches differ in shape"):
        psnr(_images(0.5, n=2), _images(0.5, n=3))
    with pytest.raises(MetricError, match=r"ssim: the first batch must be float images \[N, 3, H, W\]"):
        ssim(torch.zeros(2, 1, 16, 16), torch.zeros(2, 1, 16, 16))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda x: kernel_distance(x, x[:1]), "kid: needs at least 2 generated images, got 1"),
        (lambda x: kernel_distance(x[:1], x), "kid: needs at least 2 real images, got 1"),
        (lambda x: frechet_distance(x, x[:1]), "fid: needs at least 2 generated images, got 1"),
        (lambda x: inception_score(x[:0]), "is: needs at least 1 generated image, got 0"),
        (lambda x: mean_pairwise_cosine(x[:0], x), "clip_i: needs at least 1 generated image, got 0"),
        (
            lambda x: kernel_distance(x, x, subset_size=9),
            r"kid: subset_size must be between 2 and .* = 8, got 9",
        ),
        (
            lambda x: frechet_distance(x, x[:, :2]),
            r"fid: feature widths differ \(3 vs 2\); use one evaluator",
        ),
        (
            lambda x: frechet_distance(x[0], x),
            r"fid: real image features must be a 2-d tensor \[N, D\], got \(3,\)",
        ),
    ],
)
def test_bad_input_names_the_metric(call, message):
    x = _gaussian(8, 3, 12)
    with pytest.raises(MetricError, match=f"^{message}$"):
        call(x)


def test_the_minimum_counts_table_is_what_the_metrics_enforce():
    assert MIN_IMAGES["fid"] == MIN_IMAGES["kid"] == 2 and MIN_IMAGES["is"] == 1
    two = _gaussian(2, 3, 13)
    frechet_distance(two, two)
    kernel_distance(two, two)
    inception_score(two[:1])
    psnr(_images(0.1, n=1), _images(0.2, n=1))


def test_a_nan_image_is_named_by_its_label():
    features = torch.ones(4, 3)
    features[2, 1] = float("nan")
    labels = [
        "samples/epoch002/00-seed0.png",
        "samples/epoch002/00-seed1.png",
        "samples/epoch002/01-seed2.png",
        "x",
    ]
    with pytest.raises(
        MetricError, match=r"^clip_t: image 2 \(samples/epoch002/01-seed2.png\) has non-finite values$"
    ):
        check_finite("clip_t", features, labels)
    features[1, 0] = float("inf")  # the first bad row is reported
    with pytest.raises(MetricError, match=r"^dino: prompt 1 \(b\) has non-finite values$"):
        check_finite("dino", features, ["a", "b", "c", "d"], noun="prompt")
    check_finite("clip_t", torch.ones(4, 3), labels)  # finite input passes
    fake = torch.rand(4, 3)
    fake[2, 0] = float("nan")
    with pytest.raises(MetricError, match=r"^kid: generated image 2 has non-finite values$"):
        kernel_distance(torch.rand(4, 3), fake)


def test_fid_note_warns_on_small_sets_only():
    note = fid_note(40, 40)
    assert note is not None and "KID" in note and "biased" in note
    assert "singular" in fid_note(40, 40, dim=2048)
    assert fid_note(FID_RELIABLE_IMAGES, FID_RELIABLE_IMAGES + 5, dim=64) is None
    assert "at least 2" in fid_note(1, 100)
