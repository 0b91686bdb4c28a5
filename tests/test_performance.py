"""Memory and speed options on the tiny SDXL: each `[performance]` option, mixed-precision dtypes, offloading,
and what the loop reports (images/s, peak memory) in metrics.jsonl and the progress bar."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from helpers import make_recipe, step_rows
from loratk.models.family import freeze_and_cast, offload_frozen_encoders
from loratk.models.performance import apply_performance_options, require_attention_backend, set_tf32
from loratk.models.sdxl import load_sdxl
from loratk.run import TrainingRun


@pytest.fixture
def restore_tf32():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.fixture
def unet(tiny_sdxl_dir):
    model = load_sdxl(str(tiny_sdxl_dir))
    freeze_and_cast(model, torch.device("cpu"), torch.float32)
    return model.unet


def _unet_inputs(batch_size: int = 2):
    g = torch.Generator().manual_seed(0)
    return dict(
        sample=torch.randn(batch_size, 4, 8, 8, generator=g),
        timestep=torch.tensor([10, 500]),
        encoder_hidden_states=torch.randn(batch_size, 77, 80, generator=g),
        added_cond_kwargs={
            "text_embeds": torch.randn(batch_size, 48, generator=g),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch_size),
        },
    )


# ---------------------------------------------------------------- recipe


def test_performance_defaults_and_errors():
    from loratk.recipe import RecipeError, validate_recipe

    recipe = validate_recipe({"name": "x", "data": {"dir": "d"}})
    perf = recipe.performance
    assert (perf.attention, perf.tf32, perf.channels_last, perf.compile_unet) == ("sdpa", True, False, False)
    with pytest.raises(RecipeError) as err:
        validate_recipe(
            {"name": "x", "data": {"dir": "d"}, "performance": {"attention": "xformer", "tf23": 1}}
        )
    text = str(err.value)
    assert "performance.attention: must be one of 'sdpa' or 'xformers', got 'xformer'" in text
    assert "performance.tf23: unknown key (did you mean 'tf32'?)" in text


def test_performance_and_checkpointing_may_change_on_resume(tmp_path, tiny_sdxl_dir, images_dir):
    from loratk.recipe import dump_recipe, recipe_diff

    old = make_recipe(tmp_path, tiny_sdxl_dir, images_dir)
    new = make_recipe(
        tmp_path,
        tiny_sdxl_dir,
        images_dir,
        train={"gradient_checkpointing": True},
        performance={"channels_last": True, "compile_unet": True, "tf32": False},
    )
    assert recipe_diff(dump_recipe(old), new) == []


# ---------------------------------------------------------------- each option on the tiny UNet


def test_sdpa_is_the_default_attention(unet):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor())  # the slow, non-SDPA processor
    apply_performance_options(unet, attention="sdpa")
    processors = unet.attn_processors
    assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors.values())


def test_xformers_not_installed_says_how_to_install(unet):
    assert importlib.util.find_spec("xformers") is None  # this environment has no xformers
    with pytest.raises(ImportError, match=r"pip install 'loratk\[xformers\]'"):
        apply_performance_options(unet, attention="xformers")


def test_xformers_when_installed_is_enabled_on_the_unet(unet, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "xformers" else find_spec(name, *a)
    )
    calls = []
    monkeypatch.setattr(unet, "enable_xformers_memory_efficient_attention", lambda: calls.append(1))
    apply_performance_options(unet, attention="xformers")
    assert calls == [1]


def test_train_cli_reports_missing_xformers_before_loading_a_model(tmp_path, images_dir, capsys):
    from loratk.train import main

    recipe = tmp_path / "r.toml"
    recipe.write_text(
        f'name = "x"\noutput_dir = "{tmp_path / "runs"}"\n[model]\npath = "{tmp_path / "no-such-model"}"\n'
        f'[data]\ndir = "{images_dir}"\nresolution = 64\n[performance]\nattention = "xformers"\n'
    )
    assert main([str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "pip install 'loratk[xformers]'" in err and "could not load" not in err


@pytest.mark.usefixtures("restore_tf32")
def test_tf32_switches_both_matmul_and_cudnn():
    set_tf32(True)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    set_tf32(False)
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32


@pytest.mark.usefixtures("restore_tf32")
def test_channels_last_changes_the_layout_not_the_output(unet):
    with torch.no_grad():
        before = unet(**_unet_inputs()).sample
        apply_performance_options(unet, channels_last=True)
        after = unet(**_unet_inputs()).sample
    convs = [m.weight for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


@pytest.mark.usefixtures("restore_tf32")
def test_compile_unet_compiles_in_place_and_keeps_state_dict_keys(unet):
    keys = list(unet.state_dict())
    apply_performance_options(unet, compile_unet=True)
    assert unet._compiled_call_impl is not None  # compiled lazily, on the first forward
    assert list(unet.state_dict()) == keys  # exports and states see the same names


@pytest.mark.slow
@pytest.mark.usefixtures("restore_tf32")
def test_compiled_unet_matches_eager(unet):
    torch._dynamo.reset()
    with torch.no_grad():
        eager = unet(**_unet_inputs()).sample
        apply_performance_options(unet, compile_unet=True)
        compiled = unet(**_unet_inputs()).sample
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-4)
    torch._dynamo.reset()


# ---------------------------------------------------------------- through TrainingRun.setup


@pytest.mark.usefixtures("restore_tf32")
def test_setup_applies_checkpointing_and_performance_options(tmp_path, tiny_sdxl_dir, images_dir):
    from diffusers.models.attention_processor import AttnProcessor2_0

    recipe = make_recipe(
        tmp_path,
        tiny_sdxl_dir,
        images_dir,
        train={"gradient_checkpointing": True, "max_steps": 1},
        performance={"channels_last": True, "tf32": True},
    )
    run = TrainingRun(recipe)
    try:
        run.setup()
        unet = run.model.unet
        assert unet.is_gradient_checkpointing
        assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())
        assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        assert torch.backends.cuda.matmul.allow_tf32
        run.train()  # checkpointing + channels_last train a step
    finally:
        run.cleanup()


def test_bf16_keeps_trainable_lora_in_fp32_and_frozen_weights_in_bf16(tmp_path, tiny_sdxl_dir, images_dir):
    recipe = make_recipe(
        tmp_path,
        tiny_sdxl_dir,
        images_dir,
        lora={"rank": 4, "alpha": 4, "train_text_encoders": True},
        train={"mixed_precision": "bf16", "max_steps": 1},
    )
    run = TrainingRun(recipe)
    try:
        run.setup()
        for part in ("unet", "text_encoder", "text_encoder_2"):
            params = dict(getattr(run.model, part).named_parameters())
            trainable = {n: p.dtype for n, p in params.items() if p.requires_grad}
            frozen = {n: p.dtype for n, p in params.items() if not p.requires_grad}
            assert trainable and set(trainable.values()) == {torch.float32}, part
            assert all(".lora_" in n for n in trainable), part
            assert frozen and set(frozen.values()) == {torch.bfloat16}, part
        assert run.model.vae.dtype == torch.bfloat16
        run.train()
        unet_lora = [p for p in run.model.unet.parameters() if p.requires_grad]
        assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in unet_lora)
    finally:
        run.cleanup()


# ---------------------------------------------------------------- offloading


@pytest.mark.parametrize(
    "train_text_encoders, moved", [(False, ["vae", "text_encoder", "text_encoder_2"]), (True, ["vae"])]
)
def test_offload_frozen_encoders_moves_only_what_does_not_train(tiny_sdxl_dir, train_text_encoders, moved):
    from loratk.adapters.lora import LoraAdapter

    model = load_sdxl(str(tiny_sdxl_dir))
    freeze_and_cast(model, torch.device("cpu"), torch.float32)
    LoraAdapter(rank=2, alpha=2, train_text_encoders=train_text_encoders).apply(model)
    # `meta` stands in for "somewhere else": on a GPU the default target is the CPU.
    assert offload_frozen_encoders(model, torch.device("meta")) == moved
    for name in ("vae", "text_encoder", "text_encoder_2"):
        expected = "meta" if name in moved else "cpu"
        assert {p.device.type for p in getattr(model, name).parameters()} == {expected}, name
    assert {p.device.type for p in model.unet.parameters()} == {"cpu"}


def test_require_attention_backend_rejects_unknown_names():
    require_attention_backend("sdpa")
    with pytest.raises(ValueError, match="attention must be one of sdpa, xformers, got 'flash'"):
        require_attention_backend("flash")


# ---------------------------------------------------------------- what the loop reports


def test_metrics_and_progress_bar_show_images_per_second_and_peak_memory(
    tmp_path, tiny_sdxl_dir, images_dir, monkeypatch
):
    import loratk.core.loop as loop

    postfixes = []

    class RecordingBar:
        def __init__(self, *args, **kwargs):
            pass

        def update(self, n):
            pass

        def set_postfix(self, postfix=None, **kwargs):
            postfixes.append(dict(postfix or {}, **kwargs))

        def close(self):
            pass

    monkeypatch.setattr(loop, "tqdm", RecordingBar)
    monkeypatch.setattr(loop, "compute_peak_memory_gib", lambda: 3.25)  # as on a GPU
    run = TrainingRun(make_recipe(tmp_path, tiny_sdxl_dir, images_dir, train={"max_steps": 2}))
    try:
        run.setup()
        run.train()
    finally:
        run.cleanup()
    lines = step_rows(run.run_dir / "metrics.jsonl")
    assert [r["step"] for r in lines] == [1, 2]
    assert all(r["mem/peak_gib"] == 3.25 and r["perf/images_per_s"] > 0 for r in lines)
    assert len(postfixes) == 2
    assert set(postfixes[0]) == {"loss", "lr", "img/s", "mem"} and postfixes[0]["mem"] == "3.2GiB"


def test_progress_without_cuda_has_no_memory_field():
    from loratk.core.loop import compute_peak_memory_gib, format_progress

    record = {"train/loss": 0.5, "lr/unet": 1e-4, "perf/images_per_s": 12.345}
    assert format_progress(record, "unet") == {"loss": "0.5000", "lr": "1.00e-04", "img/s": "12.35"}
    if not torch.cuda.is_available():
        assert compute_peak_memory_gib() is None


# ---------------------------------------------------------------- host syncs in the hot loop

_HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


def _callers() -> set[str]:
    import sys

    frame, names = sys._getframe(2), set()
    while frame is not None:
        names.add(frame.f_code.co_qualname)
        frame = frame.f_back
    return names


@pytest.mark.parametrize("fused_backward", [False, True], ids=["plain", "fused-backward"])
def test_a_step_that_does_not_log_reads_the_device_only_through_the_step_agreement(
    tmp_path, tiny_sdxl_dir, images_dir, monkeypatch, fused_backward
):
    """Every value read from a tensor into Python during a non-logging step is counted, from the start of
    the forward pass to the end of the optimizer step: only `StepAgreement.read` (once per step) may read."""
    recipe = make_recipe(
        tmp_path,
        tiny_sdxl_dir,
        images_dir,
        train={"epochs": 2, "batch_size": 1, "log_every_n_steps": 1000, "max_grad_norm": 1.0},
        optim={"name": "adafactor", "fused_backward": fused_backward},
    )
    run = TrainingRun(recipe)
    run.setup()
    events: list[tuple[str, set[str]]] = []
    objective = run.objective
    compute_loss = objective.compute_loss

    def marked_compute_loss(batch):
        events.append(("forward", set()))
        return compute_loss(batch)

    monkeypatch.setattr(objective, "compute_loss", marked_compute_loss)
    for name in _HOST_READS:
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            events.append((f"read {_name}", _callers()))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    run.train(step_hooks=[lambda state: events.append(("step end", set()))])
    monkeypatch.undo()
    run.cleanup()

    steps, current = [], None
    for kind, callers in events:
        if kind == "forward" and current is None:
            current = []
        elif kind == "step end" and current is not None:
            steps.append(current)
            current = None
        elif kind.startswith("read") and current is not None:
            current.append((kind, callers))
    assert len(steps) == run.plan.total_steps >= 4
    for index, reads in enumerate(steps[:-1]):  # the last step logs
        agreed = [kind for kind, callers in reads if "StepAgreement.read" in callers]
        others = [(kind, sorted(callers)) for kind, callers in reads if "StepAgreement.read" not in callers]
        assert len(agreed) == 1, f"step {index + 1}"
        assert others == [], f"step {index + 1} reads the device outside the step agreement: {others}"


def test_batches_are_pinned_and_copied_to_the_device_without_blocking(tmp_path, tiny_sdxl_dir, images_dir):
    run = TrainingRun(make_recipe(tmp_path, tiny_sdxl_dir, images_dir))
    run.setup()
    try:
        assert run.accelerator.non_blocking is True
        assert run.dataloader.base_dataloader.pin_memory is torch.cuda.is_available()
    finally:
        run.cleanup()
