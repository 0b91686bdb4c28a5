"""The method registry: the only reader of `recipe.method`. One entry per method says which adapter and
objective it pairs, which data it reads, whether caches apply, which recipe section it needs and how its
recipe is checked. Adding a method is one entry here plus its recipe section (as PEFT registers a method
with its config and model classes).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loratk.recipe import Recipe


@dataclass(frozen=True)
class Method:
    name: str
    description: str  # README and `--help`
    adapter: str  # the recipe section that configures what trains: "lora" | "full"
    objective: str  # what it is trained on: "caption" (captioned images) | "dreambooth" (instance + class)
    # None where the method trains through a run of its own (`trainer`: the GAN baselines).
    build_adapter: Callable[[Recipe], Any] | None
    build_objective: Callable[[Recipe, Any], Any] | None  # (recipe, denoiser) -> Objective
    build_data: (
        Callable[[Recipe, Any], tuple[Any, Any]] | None
    )  # (recipe, accelerator) -> (dataset, preflight report)
    build_dataloader: Callable[[Recipe, Any], Any] | None
    validation_records: Callable[[Recipe, Any], list[Any]] | None  # (recipe, eval.folder) -> its images
    check: Callable[[Recipe], list[str]]  # recipe problems of this method, each "key: what to do"
    section: str | None = None  # the recipe section the method needs
    caches: bool = True  # latent and text-embedding caches apply (a few instance images: no)
    prepare: Callable[..., None] | None = (
        None  # after the base model loads, before the adapter (class images)
    )
    final_export_only: bool = False  # full weights are big: only the last epoch is written by default
    # Which run trains it: "adapter" (`run.TrainingRun`, an adapter on a diffusion model) or "gan"
    # (`run_gan.GanRun`, networks trained from scratch by their own loop).
    trainer: str = "adapter"
    data_spec: Callable[[Recipe], Any] | None = None  # the preflight spec (`loratk check`); None: [data]'s
    reads_captions: bool = True  # False: caption problems are none (the GAN baselines)

    def trains_text_encoders(self, recipe: Recipe) -> bool:
        return getattr(recipe, self.adapter).train_text_encoders


def _check_captioned_folders(recipe: Recipe) -> list[str]:
    problems = []
    if recipe.data.dir is None and not recipe.data.subsets:
        problems.append(
            f"data.dir: required for method {recipe.method!r}: set it to a folder of captioned images "
            "(or add [[data.subsets]] for several folders)"
        )
    if recipe.dreambooth is not None:
        problems.append("dreambooth: only for methods 'dreambooth' / 'dreambooth-lora'")
    return problems + _check_no_gan(recipe)


def _check_no_gan(recipe: Recipe) -> list[str]:
    return ["gan: only for methods 'dcgan' / 'wgan-gp'"] if recipe.gan is not None else []


def _check_instances(recipe: Recipe) -> list[str]:
    problems = []
    db = recipe.dreambooth
    if db is None:
        problems.append(
            f"dreambooth: method {recipe.method!r} needs a [dreambooth] section "
            "(instance_dir, instance_prompt, class_prompt)"
        )
    elif db.prior_preservation and not db.class_prompt:
        problems.append(
            "dreambooth.class_prompt: required with prior_preservation = true (e.g. 'a picture of a girl')"
        )
    if recipe.data.dir is not None or recipe.data.subsets:
        problems.append(
            "data.dir: not used by DreamBooth (nor [[data.subsets]]); set dreambooth.instance_dir instead"
        )
    return problems + _check_no_gan(recipe)


def _builders() -> dict[str, Method]:  # the registry
    from loratk.components import data, gan, strategies

    return {
        m.name: m
        for m in (
            Method(
                name="lora",
                description="LoRA on captioned images (style or character)",
                adapter="lora",
                objective="caption",
                build_adapter=strategies.build_lora_adapter,
                build_objective=strategies.build_caption_objective,
                build_data=data.build_caption_data,
                build_dataloader=data.build_caption_dataloader,
                validation_records=data.captioned_folder_records,
                check=_check_captioned_folders,
            ),
            Method(
                name="dreambooth",
                description="full UNet fine-tuning with the DreamBooth objective (prior preservation)",
                adapter="full",
                objective="dreambooth",
                build_adapter=strategies.build_full_adapter,
                build_objective=strategies.build_dreambooth_objective,
                build_data=data.build_instance_data,
                build_dataloader=data.build_dreambooth_dataloader,
                validation_records=data.instance_folder_records,
                check=_check_instances,
                section="dreambooth",
                caches=False,
                prepare=data.prepare_class_images,
                final_export_only=True,
            ),
            Method(
                name="dreambooth-lora",
                description="LoRA with the DreamBooth objective (prior preservation)",
                adapter="lora",
                objective="dreambooth",
                build_adapter=strategies.build_lora_adapter,
                build_objective=strategies.build_dreambooth_objective,
                build_data=data.build_instance_data,
                build_dataloader=data.build_dreambooth_dataloader,
                validation_records=data.instance_folder_records,
                check=_check_instances,
                section="dreambooth",
                caches=False,
                prepare=data.prepare_class_images,
            ),
            *(
                Method(
                    name=name,
                    description=description,
                    adapter="gan",
                    objective="adversarial",
                    build_adapter=None,
                    build_objective=None,
                    build_data=None,
                    build_dataloader=None,
                    validation_records=None,
                    check=gan.check_gan_recipe,
                    section="gan",
                    caches=False,
                    trainer="gan",
                    data_spec=gan.build_gan_data_spec,
                    reads_captions=False,
                )
                for name, description in (
                    ("dcgan", "DCGAN baseline trained from scratch on the images (no base model)"),
                    ("wgan-gp", "WGAN-GP baseline trained from scratch on the images (no base model)"),
                )
            ),
        )
    }


@functools.cache
def methods() -> dict[str, Method]:
    """Every method by name (the table is built on first use; its builders import what they need lazily)."""
    return _builders()


def method_of(recipe: Recipe) -> Method:
    return methods()[recipe.method]
