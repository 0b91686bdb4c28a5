"""The GAN baselines' parts from a recipe: its checks, the data (the same preflight as the adapters'; captions
do not apply), the two networks with their optimizers and schedules, the augmentation, and the epoch hooks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loratk.recipe import GanConfig, Recipe


def gan_config(recipe: Recipe) -> GanConfig:
    from loratk.recipe import GanConfig

    return recipe.gan if recipe.gan is not None else GanConfig()


def check_gan_recipe(recipe: Recipe) -> list[str]:
    """What the GAN methods need, and the adapters' keys that would silently do nothing here."""
    from loratk.recipe import TrainConfig

    problems = []
    gan, resolved = gan_config(recipe), gan_config(recipe).resolved(recipe.method)
    if recipe.data.dir is None and not recipe.data.subsets:
        problems.append(f"data.dir: required for method {recipe.method!r}: set it to a folder of images")
    if recipe.dreambooth is not None:
        problems.append("dreambooth: only for methods 'dreambooth' / 'dreambooth-lora'")
    if recipe.method == "wgan-gp" and resolved["d_norm"] == "batch":
        problems.append(
            "gan.d_norm: WGAN-GP's gradient penalty is per sample, which BatchNorm breaks; use 'layer' or 'none'"
        )
    if recipe.method == "dcgan" and gan.gp_weight != 10.0:
        problems.append("gan.gp_weight: only used by method 'wgan-gp'")
    if recipe.sample.enabled:
        problems.append(
            "sample.prompts: a GAN has no prompts; it renders gan.sample_seeds (fixed latent vectors)"
        )
    if recipe.data.random_flip:
        problems.append("data.random_flip: not used by the GAN methods (images are centre-cropped squares)")
    defaults = TrainConfig()
    if recipe.train.learning_rate != defaults.learning_rate:
        problems.append("train.learning_rate: not used by the GAN methods; set gan.g_lr and gan.d_lr")
    if recipe.train.max_steps is not None:
        problems.append("train.max_steps: not supported by the GAN methods; set train.epochs")
    if recipe.train.gradient_accumulation_steps != 1 or recipe.train.global_batch_size is not None:
        problems.append("train.gradient_accumulation_steps: the GAN methods do not accumulate; use 1")
    return problems


def build_gan_data_spec(recipe: Recipe) -> Any:
    """The preflight spec of [data] at the GAN's square, one size (no buckets)."""
    from dataclasses import replace

    from loratk.components.data import build_data_spec

    side = gan_config(recipe).resolution
    return replace(build_data_spec(recipe), resolution=(side, side), buckets=False)


def build_gan_data(recipe: Recipe, accelerator: Any) -> tuple[Any, Any]:
    """The preflight of [data] at the GAN's square (bad images are errors, or skipped with
    data.on_bad_image = "skip", as for the adapters), then the dataset of the good images."""
    from loratk.baselines.data import SquareImageDataset
    from loratk.components.data import check_data
    from loratk.components.launch import run_on_main_process
    from loratk.data.dataset import DataError

    spec = build_gan_data_spec(recipe)
    side = spec.resolution[0]

    def check() -> Any:
        return check_data(recipe, progress=True, spec=spec, reads_captions=False)  # a GAN reads no caption

    report = run_on_main_process(accelerator, check, (DataError,))
    repeats = {i: s.repeats for i, s in enumerate(spec.subsets)}
    paths = [image.path for image in report.good for _ in range(repeats[image.subset_index])]
    return SquareImageDataset(paths, side, max_pixels=recipe.data.max_pixels), report


@dataclass
class GanParts:
    generator: Any
    discriminator: Any
    g_optimizer: Any
    d_optimizer: Any
    augment: Any
    steps: Any
    critic_steps: int


def build_gan_parts(recipe: Recipe, *, device: Any, backward: Any = None) -> GanParts:
    """Both networks (DCGAN initialisation, seeded), their optimizers and the step strategy."""
    import torch

    from loratk.baselines.augment import DiffusionAugment
    from loratk.baselines.nets import GeneratorConfig, build_discriminator, build_generator
    from loratk.baselines.steps import GanSteps

    gan = gan_config(recipe)
    resolved = gan.resolved(recipe.method)
    torch.manual_seed(recipe.seed)
    generator = build_generator(GeneratorConfig(gan.resolution, gan.latent_dim, gan.g_width)).to(device)
    discriminator = build_discriminator(
        gan.resolution, gan.d_width, norm=resolved["d_norm"], conditioned=gan.diffusion
    ).to(device)

    def optimizer(module: Any, lr: float) -> Any:
        if gan.optimizer == "rmsprop":
            return torch.optim.RMSprop(module.parameters(), lr=lr)
        return torch.optim.Adam(module.parameters(), lr=lr, betas=resolved["betas"])

    g_opt, d_opt = optimizer(generator, resolved["g_lr"]), optimizer(discriminator, resolved["d_lr"])
    augment = None
    if gan.diffusion:
        augment = DiffusionAugment(
            t_min=gan.diffusion_t_min,
            t_max=gan.diffusion_t_max,
            target=gan.diffusion_target,
            interval=gan.diffusion_interval,
            ada_kimg=gan.diffusion_kimg,
            noise_std=gan.diffusion_noise_std,
            batch_size=recipe.train.batch_size,
        )
    steps = GanSteps(
        generator,
        discriminator,
        g_opt,
        d_opt,
        loss="dcgan" if recipe.method == "dcgan" else "wgan-gp",
        latent_dim=gan.latent_dim,
        gp_weight=gan.gp_weight,
        augment=augment,
        **({"backward": backward} if backward is not None else {}),
    )
    return GanParts(generator, discriminator, g_opt, d_opt, augment, steps, int(resolved["critic_steps"]))


def build_lr_schedulers(recipe: Recipe, optimizers: list[Any]) -> list[Any]:
    """Exponential decay (x decay_rate every decay_steps of each network's own steps, smoothly) or constant;
    (generator's, discriminator's)."""
    import torch

    gan = gan_config(recipe)
    factor = 1.0 if gan.lr_decay == "none" else gan.decay_rate ** (1 / gan.decay_steps)
    return [torch.optim.lr_scheduler.ExponentialLR(opt, gamma=factor) for opt in optimizers]


def build_generator_metadata(recipe: Recipe, num_images: int) -> Any:
    def metadata(epoch: int, step: int) -> dict[str, str]:
        return {
            "loratk.name": recipe.name,
            "loratk.method": recipe.method,
            "loratk.epoch": str(epoch),
            "loratk.steps": str(step),
            "loratk.seed": str(recipe.seed),
            "loratk.num_train_images": str(num_images),
            "ss_output_name": recipe.name,
        }

    return metadata


def build_gan_hooks(
    recipe: Recipe, parts: GanParts, dataset: Any, accelerator: Any, num_epochs: int
) -> list[Any]:
    """The exporter, the sampler, (with gan.inception set) the evaluator and the report, in that order."""
    from loratk.baselines.hooks import GanEvaluator, GanSampler, GeneratorExporter, ReportWriter

    gan = gan_config(recipe)
    hooks: list[Any] = [
        GeneratorExporter(
            parts.generator,
            recipe.run_dir,
            recipe.name,
            num_epochs,
            build_generator_metadata(recipe, len(set(dataset.paths))),
            every_n_epochs=recipe.export.every_n_epochs or 1,
        ),
        GanSampler(
            parts.generator,
            recipe.run_dir / "samples",
            gan.sample_seeds,
            num_epochs=num_epochs,
            model=f"{recipe.method} {recipe.name}",
            every_n_epochs=gan.sample_every_n_epochs,
            interpolation_steps=gan.interpolation_steps,
        ),
    ]
    if gan.inception and gan.eval_every_n_epochs:
        hooks.append(
            GanEvaluator(
                parts.generator,
                load_gan_evaluator(recipe, accelerator.device),
                sorted(set(dataset.paths)),
                recipe.run_dir / "eval.jsonl",
                num_images=gan.eval_images,
                seed=recipe.seed,
                num_epochs=num_epochs,
                every_n_epochs=gan.eval_every_n_epochs,
            )
        )
    hooks.append(ReportWriter(recipe.run_dir))
    return hooks


def load_gan_evaluator(recipe: Recipe, device: Any) -> Any:
    from loratk.evaluation.evaluators import load_evaluator

    return load_evaluator("inception", gan_config(recipe).inception, device=device)
