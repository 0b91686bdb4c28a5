"""One training run with a visible shape: `setup()` (a short list of build_* calls) -> `train()` ->
`cleanup()`. The run folder and the choice of the state to resume from are in `run_folder`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from accelerate.logging import get_logger

from loratk.recipe import Recipe, dump_recipe
from loratk.run_folder import RunDirError, claim_run_folder, finished_state, resume_candidates, write_skipped

logger = get_logger(__name__)


class TrainingRun:
    """One training run with a visible shape: `setup()` -> `train()` -> `cleanup()`."""

    def __init__(self, recipe: Recipe, *, overwrite: bool = False, stop: Any = None):
        self.recipe = recipe
        self.run_dir = recipe.run_dir
        self.overwrite = overwrite
        self.stop = stop
        self.lock: Any = None
        self.resume_from: Path | None = None
        self.finished: Any = None  # (state folder, counters) of a run that has nothing left to train
        self.logger = logger

    def setup(self) -> None:
        from accelerate.utils import set_seed

        from loratk.components.evaluation import build_image_eval, build_report_hook
        from loratk.components.hooks import build_exporter, build_sampler, load_sample_prompts
        from loratk.components.launch import build_accelerator, check_launch, run_on_main_process
        from loratk.components.methods import method_of
        from loratk.core.checkpoint import StateError, StateManager
        from loratk.core.precision import resolve_dtype
        from loratk.models.performance import require_attention_backend

        recipe = self.recipe
        self.method = method_of(recipe)
        self.accelerator = accelerator = build_accelerator(recipe)
        set_seed(recipe.seed)
        require_attention_backend(recipe.performance.attention)  # a missing xformers fails before any loading
        # Launch, prompt-file, run-folder and data problems surface before any model is loaded, and a finished
        # run is recognised before any image is decoded.
        sample_prompts = load_sample_prompts(recipe)
        check_launch(recipe, accelerator, samples_during_training=bool(sample_prompts))
        self.lock = run_on_main_process(
            accelerator,
            lambda: claim_run_folder(recipe, overwrite=self.overwrite),
            (RunDirError, StateError),
            share=False,
        )
        self.candidates = resume_candidates(recipe, overwrite=self.overwrite)
        self.finished = finished_state(recipe, self.candidates)
        if self.finished is not None:
            return
        self.dataset, report = self.method.build_data(recipe, accelerator)
        self._report_data(report)
        self.weight_dtype = resolve_dtype(recipe.train.mixed_precision)
        self._setup_model()
        self._setup_training()
        self._setup_objective_and_caches()
        self.exporter = build_exporter(
            recipe,
            self.adapter,
            self.model,
            self.dataset,
            self.plan,
            accelerator,
            gather=self._gather_weights,
        )
        # Samples come after the export, from the live model (no reload).
        self.sampler = build_sampler(recipe, self.model, sample_prompts, self.plan.num_epochs, self.stop)
        self.image_eval = build_image_eval(
            recipe,
            self.model,
            self.dataset,
            self.sampler,
            accelerator,
            weight_dtype=self.weight_dtype,
            num_epochs=self.plan.num_epochs,
            stop=self.stop,
        )
        self.report = build_report_hook(recipe)
        if recipe.train.report_to:
            accelerator.init_trackers(recipe.name, config={"plan": str(self.plan.as_dict())})
        self.states = StateManager(
            accelerator, self.run_dir / "state", dump_recipe(recipe), keep=recipe.train.keep_states
        )
        self.state = self._load_resume_state()

    def _setup_model(self) -> None:
        """Load the base model, place it, make class images from it, then put the adapter in."""
        from accelerate.utils import set_seed

        from loratk.components.strategies import load_recipe_model
        from loratk.models.family import enable_text_encoder_checkpointing, freeze_and_cast
        from loratk.models.performance import apply_performance_options

        recipe, accelerator = self.recipe, self.accelerator
        # The local main process loads first: it alone writes `builtin:` models and hub downloads into the
        # cache (under torch.distributed, `save_pretrained` on other ranks writes no weights).
        with accelerator.local_main_process_first():
            self.model = load_recipe_model(recipe)
        self.adapter = self.method.build_adapter(recipe)
        set_seed(recipe.seed)  # adapter initialisation draws from a known RNG state, whatever loading did
        freeze_and_cast(
            self.model, accelerator.device, self.weight_dtype, keep_fp32=self.adapter.fp32_parts(self.model)
        )
        if self.method.prepare is not None:  # class images come from the base model, before the adapter
            self.method.prepare(recipe, self.model, self.dataset, accelerator, self.weight_dtype)
        self.adapter.apply(self.model)
        self.trainables = self.adapter.trainable_modules(self.model)
        if recipe.train.gradient_checkpointing:
            self.model.unet.enable_gradient_checkpointing()
            for name, module in self.trainables.items():
                if name != "unet":
                    enable_text_encoder_checkpointing(module)
        perf = recipe.performance
        apply_performance_options(
            self.model.unet,
            attention=perf.attention,
            tf32=perf.tf32,
            channels_last=perf.channels_last,
            compile_unet=perf.compile_unet,
        )

    def _setup_training(self) -> None:
        """The data loader, the optimizer and its schedule, prepared by Accelerate; the plan in between."""
        from loratk.core.optim import build_lr_scheduler, build_optimizer
        from loratk.plan import compute_plan

        recipe, accelerator = self.recipe, self.accelerator
        dataloader = self.method.build_dataloader(recipe, self.dataset)
        optimizer = build_optimizer(
            self.adapter.param_groups(self.model, recipe.train.learning_rate),
            recipe.optim.name,
            lr=recipe.train.learning_rate,
            weight_decay=recipe.optim.weight_decay,
            betas=recipe.optim.betas,
            eps=recipe.optim.eps,
            fused_backward=recipe.optim.fused_backward,
            max_grad_norm=recipe.train.max_grad_norm,
        )
        *self.modules, self.optimizer, self.dataloader = accelerator.prepare(
            *self.trainables.values(), optimizer, dataloader
        )
        self.trainable_names = list(self.trainables)
        self.plan = compute_plan(
            num_examples=len(self.dataset),
            batches_per_epoch=len(self.dataloader),
            per_device_batch=recipe.train.batch_size,
            gradient_accumulation_steps=accelerator.gradient_accumulation_steps,
            num_processes=accelerator.num_processes,
            epochs=recipe.train.epochs,
            max_steps=recipe.train.max_steps,
        )
        self.lr_scheduler = accelerator.prepare(
            build_lr_scheduler(
                self.optimizer,
                recipe.optim.scheduler,
                warmup_steps=recipe.optim.warmup_steps,
                total_steps=self.plan.total_steps,
            )
        )
        self.logger.info(f"plan: {self.plan.describe()}", main_process_only=True)

    def _setup_objective_and_caches(self) -> None:
        """The denoiser over the prepared (possibly DDP-wrapped) modules, the method's objective on it, and
        the caches (they need the VAE, the text encoders and the plan's epochs: crops and flips are per epoch)."""
        from loratk.components.caches import build_data_caches
        from loratk.components.evaluation import build_validation
        from loratk.components.strategies import build_denoiser
        from loratk.models.family import offload_frozen_encoders

        recipe, accelerator = self.recipe, self.accelerator
        # Export reads the plain modules; the objective runs the prepared ones.
        prepared = self.model.replace(**dict(zip(self.trainables, self.modules, strict=True)))
        self.denoiser = build_denoiser(
            recipe, prepared, device=accelerator.device, weight_dtype=self.weight_dtype
        )
        self.objective = self.method.build_objective(recipe, self.denoiser)
        self.validation = build_validation(
            recipe,
            self.model,
            self.dataset,
            accelerator,
            weight_dtype=self.weight_dtype,
            num_epochs=self.plan.num_epochs,
        )
        if not self.method.caches:  # DreamBooth's few instance images are encoded per batch
            return
        cached = build_data_caches(
            recipe, self.dataset, self.denoiser, self.model, accelerator, self.plan.num_epochs, self.stop
        )
        if accelerator.device.type != "cpu":
            # Cached parts are not needed on the GPU while training; sampling borrows them back.
            moved = offload_frozen_encoders(self.model, "cpu", names=cached)
            if moved:
                self.logger.info(
                    f"moved {', '.join(moved)} to the CPU (caches cover them)", main_process_only=True
                )

    def _report_data(self, report: Any) -> None:
        """Main process: the skipped images' list and a line about the buckets (a preflight report's data)."""
        from loratk.components.data import describe_buckets

        if report is not None and self.accelerator.is_main_process:
            write_skipped(self.recipe, report)
            self.logger.info(f"data: {describe_buckets(self.dataset)}", main_process_only=True)

    def _gather_weights(self) -> dict[str, dict[str, Any]]:
        from loratk.components.launch import gather_full_weights

        return gather_full_weights(
            self.accelerator, dict(zip(self.trainable_names, self.modules, strict=True))
        )

    def _load_resume_state(self) -> Any:
        from loratk.core.checkpoint import StateError, TrainState

        for path in self.candidates:
            try:
                state = self.states.load(path, self.modules)
            except StateError as err:
                self.logger.warning(f"{err}; falling back to an older state", main_process_only=True)
                continue
            self.resume_from = path
            where = (
                f"epoch {state.epoch}, {state.batches_done} batch(es) into it"
                if state.batches_done
                else f"the start of epoch {state.epoch}"
            )
            self.logger.info(
                f"resuming from {path}: step {state.global_step}, at {where}", main_process_only=True
            )
            return state
        if self.candidates:
            # A failed load may have changed some weights or optimizer state: never train on from there.
            raise StateError(
                f"none of the {len(self.candidates)} saved state(s) in {self.run_dir / 'state'} could be loaded "
                "(see the warnings above); pass --overwrite to start again"
            )
        return TrainState()

    def train(self, step_hooks: Sequence[Any] = ()) -> Any:
        from loratk.core.loop import LoopResult, MetricsWriter, on_main_process, run_training

        if self.finished is not None:
            path, state = self.finished
            epochs = (
                f"max_steps = {self.recipe.train.max_steps}"
                if self.recipe.train.max_steps is not None
                else f"all {state.epoch - 1} epoch(s)"
            )
            self.logger.info(
                f"nothing to train: {path} finished {epochs} at step {state.global_step} (raise "
                "train.epochs to continue, or pass --overwrite to start again)",
                main_process_only=True,
            )
            return LoopResult(state=state)
        main = self.accelerator.is_main_process
        hooks = [self.exporter]
        if self.validation is not None:
            hooks.append(self.validation)  # every process: a sharded model needs them all
        fresh = self.resume_from is None
        for hook in (self.sampler, self.image_eval):
            if hook is None:
                continue
            hooks.append(on_main_process(self.accelerator, hook))
            if main and fresh:
                hook.start()  # the base model's samples and their scores, once per run
        hooks.append(on_main_process(self.accelerator, self.report))
        self.accelerator.wait_for_everyone()
        resume_step = self.state.global_step if self.resume_from else None
        metrics = MetricsWriter(self.run_dir / "metrics.jsonl" if main else None, resume_step=resume_step)
        if self.validation is not None and self.resume_from is None:
            base = self.validation.compute()  # the base model's
            metrics.write({"step": 0, "epoch": 0, "val/loss": base})
            self.logger.info(f"base model: val/loss {base:.5f}", main_process_only=True)
        try:
            result = run_training(
                self.accelerator,
                objective=self.objective,
                modules=self.modules,
                optimizer=self.optimizer,
                lr_scheduler=self.lr_scheduler,
                dataloader=self.dataloader,
                plan=self.plan,
                seed=self.recipe.seed,
                max_grad_norm=self.recipe.train.max_grad_norm,
                log_every_n_steps=self.recipe.train.log_every_n_steps,
                metrics=metrics,
                epoch_hooks=hooks,
                step_hooks=step_hooks,
                state=self.state,
                save_state=self.states.save,
                save_every_n_steps=self.recipe.train.save_state_every_n_steps,
                max_nonfinite_steps=self.recipe.train.max_nonfinite_steps,
                stop=self.stop,
            )
        finally:
            metrics.close()
        if main:
            self.report.finish()  # with the last epoch's time and memory; names the best epoch
        self.logger.info(
            f"done: {result.global_step} steps; outputs in {self.run_dir}", main_process_only=True
        )
        return result

    def cleanup(self) -> None:
        if hasattr(self, "accelerator"):
            self.accelerator.end_training()
        if self.lock is not None:
            self.lock.release()


def train(recipe: Recipe, *, overwrite: bool = False, stop: Any = None) -> Path:
    """Run a recipe from start (or its newest state) to end; return the run directory."""
    from loratk.components.batch import resolve_batch_size
    from loratk.components.launch import ProcessGroupHold

    recipe = resolve_batch_size(recipe, overwrite=overwrite)  # "auto": a number, before anything uses it
    group = ProcessGroupHold()
    try:
        run_dir = _train(recipe, overwrite=overwrite, stop=stop, group=group)
    except BaseException as err:
        group.release(err)
        raise
    group.release()
    return run_dir


def _train(recipe: Recipe, *, overwrite: bool, stop: Any, group: Any) -> Path:
    from loratk.components.methods import method_of

    if method_of(recipe).trainer == "gan":
        from loratk.run_gan import GanRun

        run: Any = GanRun(recipe, overwrite=overwrite, stop=stop)
    else:
        run = TrainingRun(recipe, overwrite=overwrite, stop=stop)
    try:
        run.setup()
        group.hold()
        run.train()
    finally:
        run.cleanup()
    return run.run_dir
