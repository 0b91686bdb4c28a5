"""A GAN baseline's run, with the shape of `run.TrainingRun`: `setup()` -> `train()` -> `cleanup()`. The same
run folder (claimed, locked, recipe checked), the same preflight, the same resumable states and stop
requests; the networks and the loop are the GAN's own (`baselines`)."""

from __future__ import annotations

from typing import Any

from accelerate.logging import get_logger

from loratk.recipe import Recipe, dump_recipe
from loratk.run_folder import claim_run_folder, finished_state, resume_candidates, write_skipped

logger = get_logger(__name__)


class GanRun:
    def __init__(self, recipe: Recipe, *, overwrite: bool = False, stop: Any = None):
        self.recipe = recipe
        self.run_dir = recipe.run_dir
        self.overwrite = overwrite
        self.stop = stop
        self.lock: Any = None
        self.finished: Any = None
        self.hooks: list[Any] = []

    def setup(self) -> None:
        from accelerate import Accelerator

        from loratk.baselines.data import build_image_dataloader
        from loratk.components.gan import (
            build_gan_data,
            build_gan_hooks,
            build_gan_parts,
            build_lr_schedulers,
        )
        from loratk.components.launch import LaunchError
        from loratk.core.checkpoint import StateManager

        recipe = self.recipe
        # fp32 on one process: the networks are small, and the GAN loop has no gradient scaler or reduction.
        self.accelerator = accelerator = Accelerator(mixed_precision="no", project_dir=str(self.run_dir))
        if accelerator.num_processes > 1:
            raise LaunchError(
                "the GAN methods train on one process; launch them without accelerate's multi-process configs"
            )
        self.lock = claim_run_folder(recipe, overwrite=self.overwrite)
        self.candidates = resume_candidates(recipe, overwrite=self.overwrite)
        self.finished = finished_state(recipe, self.candidates)
        if self.finished is not None:
            return
        self.dataset, report = build_gan_data(recipe, accelerator)
        write_skipped(recipe, report)
        logger.info(
            f"data: {len(self.dataset)} images at {self.dataset.resolution}x{self.dataset.resolution}"
        )
        self.parts = build_gan_parts(recipe, device=accelerator.device, backward=accelerator.backward)
        dataloader = build_image_dataloader(
            self.dataset,
            batch_size=recipe.train.batch_size,
            seed=recipe.seed,
            num_workers=recipe.data.num_workers,
        )
        p = self.parts
        schedulers = build_lr_schedulers(recipe, [p.g_optimizer, p.d_optimizer])
        # Prepared, so Accelerate's save_state holds both networks, both optimizers and their schedules.
        prepared = accelerator.prepare(
            p.generator, p.discriminator, p.g_optimizer, p.d_optimizer, dataloader, *schedulers
        )
        *_, self.dataloader = prepared[:5]
        self.schedulers = tuple(prepared[5:])
        if p.augment is not None:
            accelerator.register_for_checkpointing(p.augment)
        self.states = StateManager(
            accelerator,
            self.run_dir / "state",
            dump_recipe(recipe),
            keep=recipe.train.keep_states,
            weights="all",
        )
        self.num_epochs = recipe.train.epochs
        self.hooks = build_gan_hooks(recipe, p, self.dataset, accelerator, self.num_epochs)
        self.state = self._load_resume_state()

    def _load_resume_state(self) -> Any:
        from loratk.core.checkpoint import StateError, TrainState

        for path in self.candidates:
            try:
                state = self.states.load(path, [self.parts.generator, self.parts.discriminator])
            except StateError as err:
                logger.warning(f"{err}; falling back to an older state")
                continue
            self.resume_from = path
            logger.info(f"resuming from {path}: step {state.global_step}, epoch {state.epoch}")
            return state
        if self.candidates:
            raise StateError(
                f"none of the {len(self.candidates)} saved state(s) in {self.run_dir / 'state'} could be loaded; "
                "pass --overwrite to start again"
            )
        self.resume_from = None
        return TrainState()

    def train(self) -> Any:
        from loratk.baselines.loop import run_gan_training
        from loratk.core.loop import LoopResult, MetricsWriter

        if self.finished is not None:
            path, state = self.finished
            logger.info(
                f"nothing to train: {path} finished all {state.epoch - 1} epoch(s) (raise train.epochs to "
                "continue, or pass --overwrite to start again)"
            )
            return LoopResult(state=state)
        resume_step = self.state.global_step if self.resume_from else None
        metrics = MetricsWriter(self.run_dir / "metrics.jsonl", resume_step=resume_step)
        try:
            result = run_gan_training(
                self.accelerator,
                steps=self.parts.steps,
                dataloader=self.dataloader,
                num_epochs=self.num_epochs,
                critic_steps=self.parts.critic_steps,
                seed=self.recipe.seed,
                lr_schedulers=self.schedulers,
                state=self.state,
                log_every_n_steps=self.recipe.train.log_every_n_steps,
                metrics=metrics,
                epoch_hooks=self.hooks,
                save_state=self.states.save,
                save_every_n_steps=self.recipe.train.save_state_every_n_steps,
                max_nonfinite_steps=self.recipe.train.max_nonfinite_steps,
                stop=self.stop,
            )
        finally:
            metrics.close()
        from loratk.evaluation.report import write_report

        write_report(self.run_dir)  # again, now that metrics.jsonl holds the last epoch's times
        logger.info(f"done: {result.global_step} steps; outputs in {self.run_dir}")
        return result

    def cleanup(self) -> None:
        for hook in self.hooks:
            evaluator = getattr(hook, "inception", None)
            if evaluator is not None:
                evaluator.close()
        if hasattr(self, "accelerator"):
            self.accelerator.end_training()
        if self.lock is not None:
            self.lock.release()
