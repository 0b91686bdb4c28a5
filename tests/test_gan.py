"""The GAN baselines' parts on their own: architectures and initialisation, the losses and the gradient
penalty against hand computations, the critic-step schedule, Diffusion-GAN's adaptive augmentation, the
generator file, and the [gan] recipe section."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from loratk.baselines.augment import DiffusionAugment, compute_alphas_bar, diffuse
from loratk.baselines.losses import (
    compute_dcgan_d_loss,
    compute_gradient_penalty,
    generator_step_due,
)
from loratk.baselines.nets import (
    Discriminator,
    GeneratorConfig,
    build_discriminator,
    build_generator,
)
from loratk.baselines.steps import GanSteps
from loratk.recipe import RecipeError, validate_recipe


@pytest.mark.parametrize("resolution, first_channels", [(64, 512), (128, 1024)])
def test_generator_and_discriminator_shapes(resolution, first_channels):
    torch.manual_seed(0)
    generator = build_generator(GeneratorConfig(resolution, latent_dim=100, width=64))
    first = generator.net[0]
    assert isinstance(first, nn.ConvTranspose2d) and first.out_channels == first_channels  # [B, 8w, 4, 4]
    images = generator(torch.randn(2, 100))
    assert images.shape == (2, 3, resolution, resolution)
    assert images.abs().max() <= 1  # tanh
    for norm in ("batch", "layer", "none"):
        d = build_discriminator(resolution, 16, norm=norm, conditioned=False)
        assert d(images).shape == (2,)
    conditioned = build_discriminator(resolution, 16, norm="layer", conditioned=True)
    assert conditioned.net[0].in_channels == 4
    assert conditioned(images, torch.tensor([0.0, 1.0])).shape == (2,)
    with pytest.raises(ValueError, match="conditioned"):
        conditioned(images)


@pytest.mark.parametrize("resolution", [48, 16, 100])
def test_a_side_that_is_not_a_power_of_two_from_32_is_refused(resolution):
    with pytest.raises(ValueError, match="power of two"):
        Discriminator(resolution)


def test_dcgan_initialisation_and_normalisation_layout():
    torch.manual_seed(0)
    generator = build_generator(GeneratorConfig(64, 100, 64))
    convs = torch.cat([m.weight.flatten() for m in generator.modules() if isinstance(m, nn.ConvTranspose2d)])
    assert convs.mean().item() == pytest.approx(0.0, abs=1e-3)
    assert convs.std().item() == pytest.approx(0.02, rel=0.02)
    bn = [m for m in generator.modules() if isinstance(m, nn.BatchNorm2d)]
    scales = torch.cat([m.weight for m in bn])
    assert scales.mean().item() == pytest.approx(1.0, abs=3e-3)
    assert scales.std().item() == pytest.approx(0.02, rel=0.15)
    assert all(torch.count_nonzero(m.bias) == 0 for m in bn)
    d = build_discriminator(64, 64, norm="batch", conditioned=False)
    layers = list(d.net)
    assert (
        isinstance(layers[1], nn.LeakyReLU) and layers[1].negative_slope == 0.2
    )  # no norm on the input layer
    assert sum(isinstance(m, nn.BatchNorm2d) for m in d.modules()) == 3
    critic = build_discriminator(64, 64, norm="layer", conditioned=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in critic.modules())


def test_the_dcgan_discriminator_loss_is_the_two_binary_cross_entropies():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    sigmoid = torch.sigmoid
    hand = -(torch.log(sigmoid(real)).mean() + torch.log(1 - sigmoid(fake)).mean())
    assert compute_dcgan_d_loss(real, fake).item() == pytest.approx(hand.item(), rel=1e-6)


def test_gradient_penalty_matches_hand_computations():
    torch.manual_seed(0)
    real, fake = torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2)
    alpha = torch.tensor([0.0, 0.25, 1.0])
    # A linear critic D(x) = <w, x>: its gradient is w everywhere, so the penalty is (||w|| - 1)^2.
    w = torch.tensor([3.0, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0, 0.0], requires_grad=True)
    penalty = compute_gradient_penalty(lambda x: x.flatten(1) @ w, real, fake, alpha)
    assert penalty.item() == pytest.approx((5.0 - 1.0) ** 2)
    (grad,) = torch.autograd.grad(penalty, w)  # the penalty trains the critic: d/dw = 2 (||w|| - 1) w / ||w||
    assert torch.allclose(grad, 2 * 4.0 * w.detach() / 5.0)
    # D(x) = 0.5 ||x||^2: its gradient at x_hat is x_hat.
    penalty = compute_gradient_penalty(lambda x: 0.5 * x.flatten(1).pow(2).sum(1), real, fake, alpha)
    a = alpha.reshape(-1, 1, 1, 1)
    mixed = a * real + (1 - a) * fake
    hand = ((mixed.flatten(1).norm(dim=1) - 1) ** 2).mean()
    assert penalty.item() == pytest.approx(hand.item(), rel=1e-6)
    assert torch.equal(mixed[0], fake[0]) and torch.equal(mixed[2], real[2])


def test_critic_step_schedule():
    assert [generator_step_due(k, 5) for k in range(1, 11)] == [False] * 4 + [True] + [False] * 4 + [True]
    assert all(generator_step_due(k, 1) for k in range(1, 5))


class _Counting(torch.optim.SGD):
    def __init__(self, params):
        super().__init__(params, lr=0.01)
        self.steps = 0

    def step(self, closure=None):
        self.steps += 1
        return super().step(closure)


def _toy_steps(critic_steps_loss: str = "wgan-gp", augment=None, resolution: int = 32) -> GanSteps:
    torch.manual_seed(0)
    generator = build_generator(GeneratorConfig(resolution, 8, 4))
    d = build_discriminator(resolution, 4, norm="layer", conditioned=augment is not None)
    return GanSteps(
        generator, d, _Counting(generator.parameters()), _Counting(d.parameters()),
        loss=critic_steps_loss, latent_dim=8, augment=augment,
    )  # fmt: skip


def test_the_generator_steps_once_per_critic_steps_and_leaves_the_critic_alone():
    steps = _toy_steps()
    real = torch.rand(4, 3, 32, 32) * 2 - 1
    for k in range(1, 11):
        out = steps.discriminator_step(real)
        assert out.finite and {"train/wasserstein", "train/gradient_penalty", "train/d_loss"} <= set(out.logs)
        if generator_step_due(k, 5):
            before = [p.detach().clone() for p in steps.discriminator.parameters()]
            g = steps.generator_step(4, real.device)
            assert "train/g_loss" in g.logs
            assert all(
                torch.equal(a, p) for a, p in zip(before, steps.discriminator.parameters(), strict=True)
            )
            assert all(p.grad is None for p in steps.discriminator.parameters())
    assert (steps.d_optimizer.steps, steps.g_optimizer.steps) == (10, 2)


def test_a_non_finite_loss_skips_the_update():
    steps = _toy_steps("dcgan")
    real = torch.full((4, 3, 32, 32), float("nan"))
    before = [p.detach().clone() for p in steps.discriminator.parameters()]
    assert not steps.discriminator_step(real).finite
    assert steps.d_optimizer.steps == 0
    assert all(torch.equal(a, p) for a, p in zip(before, steps.discriminator.parameters(), strict=True))


def test_diffusion_of_a_batch_follows_the_forward_process():
    abar = compute_alphas_bar(10, 0.1, 0.2)
    betas = torch.linspace(0.1, 0.2, 10, dtype=torch.float64)
    assert abar[0] == 1 and abar[3].item() == pytest.approx(float((1 - betas[:3]).prod()), rel=1e-6)
    x, noise = torch.ones(2, 1, 1, 1), torch.full((2, 1, 1, 1), 2.0)
    out = diffuse(x, torch.tensor([0, 3]), abar, noise, std=0.5)
    assert out[0].item() == 1.0  # t = 0: the clean image
    expected = math.sqrt(abar[3]) + math.sqrt(1 - abar[3]) * 0.5 * 2.0
    assert out[1].item() == pytest.approx(expected, rel=1e-6)


def test_the_timestep_range_adapts_to_a_scripted_discriminator_signal():
    aug = DiffusionAugment(t_min=10, t_max=110, target=0.6, interval=2, ada_kimg=0.1, batch_size=5)
    assert aug.step_size == pytest.approx(5 * 2 / 100) and aug.t_limit == 10  # p moves 0.1 per adjustment
    at_target = torch.tensor([1.0, 2.0, 3.0, -1.0, 5.0])  # r_d = mean of the signs = 0.6: no move
    confident = torch.ones(5)  # r_d = 1 > 0.6: grow
    unsure = torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0])  # r_d = -0.2 < 0.6: shrink
    limits = []
    for outputs in [confident] * 6 + [at_target] * 2 + [unsure] * 4:
        aug.observe(outputs)
        limits.append(aug.t_limit)
    # Adjusted every 2 steps: +0.1 x3 (T 10 -> 40), at the target once (no move), then -0.1 x2.
    assert limits == [10, 20, 20, 30, 30, 40, 40, 40, 40, 30, 30, 20]
    assert aug.last_signal == pytest.approx(-0.2)
    for _ in range(40):
        aug.observe(unsure)
    assert aug.p == 0.0 and aug.t_limit == 10  # clipped at t_min
    for _ in range(60):
        aug.observe(confident)
    assert aug.p == 1.0 and aug.t_limit == 110  # and at t_max
    aug.observe(unsure)  # half an interval: kept in the state
    copy = DiffusionAugment(t_min=10, t_max=110, target=0.6, interval=2, ada_kimg=0.1, batch_size=5)
    copy.load_state_dict(aug.state_dict())
    assert copy.state_dict() == aug.state_dict()
    assert copy.observe(unsure) and aug.observe(unsure) and copy.p == aug.p == pytest.approx(0.9)
    t = copy.sample_timesteps(1000, "cpu")
    assert t.min() >= 0 and t.max() <= copy.t_limit


def test_diffusion_augmented_steps_feed_the_adaptation():
    aug = DiffusionAugment(t_min=0, t_max=50, interval=1, ada_kimg=0.004, batch_size=4)
    steps = _toy_steps("dcgan", augment=aug)
    real = torch.rand(4, 3, 32, 32) * 2 - 1
    for _ in range(3):
        before = aug.p
        steps.discriminator_step(real)
        r_d = aug.last_signal  # observed from this step's outputs on the (diffused) real batch
        direction = (r_d > 0.6) - (r_d < 0.6)
        assert aug.p == pytest.approx(min(1.0, max(0.0, before + direction * aug.step_size)))
    assert set(steps.state_logs()) >= {"aug/t_limit", "aug/p", "aug/r_d"}
    assert "train/g_loss" in steps.generator_step(4, real.device).logs


def test_a_generator_file_renders_the_same_images_after_reloading(tmp_path):
    from loratk.baselines.outputs import build_fixed_latents, load_generator, render_images, save_generator

    torch.manual_seed(0)
    generator = build_generator(GeneratorConfig(32, 8, 4))
    generator(torch.randn(4, 8))  # move the BatchNorm statistics away from their start
    path = tmp_path / "epoch1.safetensors"
    save_generator(generator, path, {"loratk.epoch": "1"})
    loaded, metadata = load_generator(path)
    assert metadata["loratk.epoch"] == "1" and loaded.config == generator.config
    z = build_fixed_latents([3, 4], 8)
    assert torch.equal(z[0], build_fixed_latents([3], 8)[0])  # a latent depends on its seed alone
    ours, theirs = render_images(generator, z), render_images(loaded, z)
    assert [a.tobytes() for a in ours] == [b.tobytes() for b in theirs]
    assert generator.training  # rendering restored the mode


def _gan_recipe(**gan):
    return {"name": "g", "method": "wgan-gp", "data": {"dir": "images"}, "gan": gan}


def test_the_gan_section_takes_the_papers_defaults():
    dcgan = validate_recipe({**_gan_recipe(), "method": "dcgan"})
    assert dcgan.gan.resolved("dcgan") == {
        "g_lr": 2e-4, "d_lr": 2e-4, "betas": (0.5, 0.999), "critic_steps": 1, "d_norm": "batch",
    }  # fmt: skip
    wgan = validate_recipe(_gan_recipe(g_lr=3e-4))
    assert wgan.gan.resolved("wgan-gp") == {
        "g_lr": 3e-4, "d_lr": 3e-4, "betas": (0.0, 0.9), "critic_steps": 5, "d_norm": "layer",
    }  # fmt: skip
    assert validate_recipe({"name": "g", "method": "dcgan", "data": {"dir": "i"}}).gan is None  # all defaults


@pytest.mark.parametrize(
    "raw, message",
    [
        (_gan_recipe(resolution=96), "power of two"),
        (_gan_recipe(d_norm="batch"), "gan.d_norm: WGAN-GP"),
        ({**_gan_recipe(), "train": {"learning_rate": 1e-3}}, "set gan.g_lr and gan.d_lr"),
        ({**_gan_recipe(), "train": {"max_steps": 10}}, "train.max_steps"),
        ({**_gan_recipe(), "data": {"dir": "i", "random_flip": True}}, "data.random_flip: not used"),
        ({**_gan_recipe(), "sample": {"prompts": ["a cat"]}}, "sample.prompts: a GAN has no prompts"),
        ({"name": "g", "method": "wgan-gp"}, "data.dir: required"),
        ({"name": "g", "data": {"dir": "i"}, "gan": {}}, "gan: only for methods 'dcgan' / 'wgan-gp'"),
        (_gan_recipe(diffusion_t_min=9, diffusion_t_max=8), "diffusion_t_min"),
    ],
)
def test_gan_recipe_problems_are_reported(raw, message):
    with pytest.raises(RecipeError, match=message):
        validate_recipe(raw)


def test_loratk_sample_renders_a_generator_file_from_seeds(tmp_path, capsys):
    from loratk.baselines.outputs import build_fixed_latents, render_images, save_generator
    from loratk.cli import main

    torch.manual_seed(0)
    generator = build_generator(GeneratorConfig(32, 8, 4))
    save_generator(
        generator, tmp_path / "epoch3.safetensors", {"loratk.epoch": "3", "loratk.method": "dcgan"}
    )
    out = tmp_path / "out"
    assert (
        main(
            ["sample", "--lora", str(tmp_path / "epoch3.safetensors"), "--seed", "5", "6", "--out", str(out)]
        )
        == 0
    )
    assert "2 image(s)" in capsys.readouterr().out
    first = out / "epoch3" / "01-seed5.png"
    expected = render_images(generator, build_fixed_latents([5], 8))[0]
    from PIL import Image

    with Image.open(first) as image:
        assert (
            image.convert("RGB").tobytes() == expected.tobytes()
        )  # seed 5's latent, as in the run's samples
        assert "Seed: 5" in image.text["parameters"]
    assert (out / "grid.png").is_file()
    assert main(["sample", "--lora", str(tmp_path / "epoch3.safetensors"), "--prompt", "a cat"]) == 2
    assert "generator renders from seeds alone" in capsys.readouterr().err


def test_the_optimizers_and_the_exponential_decay_follow_the_section():
    from loratk.components.gan import build_gan_parts, build_lr_schedulers

    recipe = validate_recipe(
        {
            "name": "g",
            "method": "dcgan",
            "data": {"dir": "i"},
            "gan": {"resolution": 32, "g_width": 4, "d_width": 4, "optimizer": "rmsprop", "g_lr": 1e-4,
                    "lr_decay": "exponential", "decay_rate": 0.95, "decay_steps": 10},
        }
    )  # fmt: skip
    parts = build_gan_parts(recipe, device="cpu")
    assert (
        isinstance(parts.g_optimizer, torch.optim.RMSprop) and parts.d_optimizer.param_groups[0]["lr"] == 1e-4
    )
    schedulers = build_lr_schedulers(recipe, [parts.g_optimizer, parts.d_optimizer])
    for _ in range(10):
        parts.g_optimizer.step()
        schedulers[0].step()
    assert parts.g_optimizer.param_groups[0]["lr"] == pytest.approx(0.95e-4)  # x 0.95 per 10 of its steps
    assert parts.d_optimizer.param_groups[0]["lr"] == 1e-4  # each network decays on its own steps
    adam = build_gan_parts(
        validate_recipe({**_gan_recipe(resolution=32, g_width=4, d_width=4)}), device="cpu"
    )
    assert adam.g_optimizer.param_groups[0]["betas"] == (0.0, 0.9) and adam.critic_steps == 5


def test_what_a_gan_run_renders_and_scores_may_change_on_resume_but_not_what_it_learns():
    from loratk.recipe import dump_recipe, recipe_diff

    old = dump_recipe(validate_recipe(_gan_recipe()))
    changed = validate_recipe(
        _gan_recipe(eval_images=64, sample_seeds=[1], inception="builtin:tiny-inception")
    )
    assert recipe_diff(old, changed) == []
    assert recipe_diff(old, validate_recipe(_gan_recipe(g_lr=1e-3))) == ["gan.g_lr: '(unset)' -> 0.001"]
