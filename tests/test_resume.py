"""Training that survives kills, full disks and NaNs (subprocesses for kills)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from helpers import copy_examples, make_recipe, step_rows
from loratk.core.checkpoint import MARKER, RunLock, StateError, list_complete_states
from loratk.core.interrupts import StopRequest
from loratk.core.loop import NonFiniteLossError
from loratk.files import OutputWriteError, atomic_write_text, load_safetensors, save_safetensors_atomic
from loratk.recipe import dump_recipe
from loratk.run import TrainingRun
from loratk.run_folder import RunDirError

REPO = Path(__file__).resolve().parents[1]

# Runs the real TrainingRun; SIGKILLs itself after optimizer step KILL_AT, or inside the state save of step
# KILL_IN_SAVE after Accelerate wrote its files but before the state is complete.
DRIVER = textwrap.dedent(
    """
    import logging, os, signal, sys
    from loratk.recipe import load_recipe

    logging.basicConfig(level=logging.INFO)
    from loratk.run import TrainingRun

    recipe = load_recipe(sys.argv[1])
    kill_at, kill_in_save = int(os.environ.get("KILL_AT", 0)), int(os.environ.get("KILL_IN_SAVE", 0))
    run = TrainingRun(recipe)
    run.setup()
    if kill_in_save:
        original = run.accelerator.save_state
        def save_state(path, **kwargs):
            original(path, **kwargs)
            if run.state.global_step == kill_in_save:
                os.kill(os.getpid(), signal.SIGKILL)
        run.accelerator.save_state = save_state
    def hook(state):
        if state.global_step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    run.train(step_hooks=[hook])
    run.cleanup()
    """
)


def _write_recipe(tmp_path: Path, tiny_sdxl_dir: Path, images_dir: Path, name: str, **sections) -> Path:
    """A recipe with paths relative to `tmp_path`, so runs in different folders write identical files."""
    assert images_dir == tmp_path / "images"
    train = {"epochs": 2, "learning_rate": 1e-2, "save_state_every_n_steps": 2, **sections.pop("train", {})}
    sections.setdefault("eval", {"holdout": 1})  # the validation loss must resume exactly too
    recipe = make_recipe(
        tmp_path,
        tiny_sdxl_dir,
        images_dir,
        name=name,
        output_dir="runs",
        train=train,
        data={"dir": "images"},
        **sections,
    )
    path = tmp_path / f"{name}.toml"
    path.write_text(dump_recipe(recipe))
    return path


def _drive(recipe: Path, **env: int) -> subprocess.CompletedProcess:
    driver = recipe.parent / "driver.py"
    driver.write_text(DRIVER)
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", **{k: str(v) for k, v in env.items()})
    return subprocess.run(
        [sys.executable, str(driver), str(recipe)],
        cwd=recipe.parent,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _resume_here(recipe: Path) -> None:
    """The run after a kill, resumed as the driver runs it (a fresh TrainingRun on the recipe from disk), in
    this process: the killed process's memory is gone either way, only its folder is left."""
    from loratk.recipe import load_recipe

    cwd = Path.cwd()
    os.chdir(recipe.parent)  # the recipe's paths are relative
    try:
        run = TrainingRun(load_recipe(recipe))
        run.setup()
        run.train()
        run.cleanup()
    finally:
        os.chdir(cwd)


def _trace(run_dir: Path) -> tuple[list[tuple], bytes, bytes]:
    lines = step_rows(run_dir / "metrics.jsonl")
    steps = [
        (r["step"], float.hex(r["train/loss"]), float.hex(r["lr/unet"]), r["data/batch_sha1"]) for r in lines
    ]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = {r["epoch"]: (r["step"], float.hex(r["val/loss"])) for r in rows if "val/loss" in r}
    assert sorted(val) == [0, 1, 2], val
    steps.append(("val", val))
    return steps, (run_dir / "epoch2.safetensors").read_bytes(), (run_dir / "epoch1.safetensors").read_bytes()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_sdxl_dir):
    """The uninterrupted run every resumed run must equal, bit for bit."""

    tmp = tmp_path_factory.mktemp("reference")
    images = tmp / "images"
    copy_examples(images)
    recipe = _write_recipe(tmp, tiny_sdxl_dir, images, "run")
    proc = _drive(recipe)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return _trace(tmp / "runs" / "run")


@pytest.mark.slow
@pytest.mark.parametrize(
    "kill_at", [1, 3, 5, 6], ids=["first-step", "epoch-boundary", "mid-epoch", "last-step"]
)
def test_sigkill_and_resume_is_bit_identical(tmp_path, tiny_sdxl_dir, images_dir, reference, kill_at):
    expected = reference
    recipe = _write_recipe(tmp_path, tiny_sdxl_dir, images_dir, "run")
    killed = _drive(recipe, KILL_AT=kill_at)
    assert killed.returncode == -signal.SIGKILL
    _resume_here(recipe)
    steps, final, first = _trace(tmp_path / "runs" / "run")
    assert [s[0] for s in steps] == [*range(1, 7), "val"]
    assert steps == expected[0]  # losses, learning rates and batch contents
    assert final == expected[1] and first == expected[2]  # adapter bytes


@pytest.mark.slow
def test_kill_while_a_state_is_written_resumes_from_the_previous_one(
    tmp_path, tiny_sdxl_dir, images_dir, reference, caplog
):
    import logging

    expected = reference
    recipe = _write_recipe(tmp_path, tiny_sdxl_dir, images_dir, "run")
    killed = _drive(recipe, KILL_IN_SAVE=4)
    assert killed.returncode == -signal.SIGKILL
    root = tmp_path / "runs" / "run" / "state"
    assert [p.name for p in list_complete_states(root)] == ["step-00000003", "step-00000002"]
    assert (root / ".step-00000004.partial").is_dir()  # the half-written one is never picked
    caplog.set_level(logging.INFO, logger="loratk")
    _resume_here(recipe)
    assert "resuming from" in caplog.text and "step-00000003" in caplog.text
    assert _trace(tmp_path / "runs" / "run") == expected
    assert not list(root.glob(".*.partial"))


@pytest.mark.slow
def test_sigterm_saves_a_state_and_exits_143(tmp_path, tiny_sdxl_dir, images_dir):
    recipe = _write_recipe(
        tmp_path, tiny_sdxl_dir, images_dir, "term", train={"epochs": 200, "save_state_every_n_steps": 1000}
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "loratk.train", str(recipe)],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "runs" / "term" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and len(step_rows(metrics)) < 2:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "Resume with" in err and "loratk.train" in err
    states = list_complete_states(tmp_path / "runs" / "term" / "state")
    assert states, "no state was saved"
    last_logged = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert states[0].name == f"step-{last_logged:08d}"


def test_second_ctrl_c_aborts_at_once():
    stop = StopRequest()
    stop._handle(signal.SIGINT, None)
    assert stop.requested and stop.signal_name == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)
    term = StopRequest()
    term._handle(signal.SIGTERM, None)
    term._handle(signal.SIGTERM, None)  # repeated SIGTERM keeps waiting for the step to end
    assert term.signal_name == "SIGTERM"


def test_damaged_newest_state_falls_back_with_a_warning(tmp_path, tiny_sdxl_dir, images_dir, caplog):
    recipe = make_recipe(
        tmp_path, tiny_sdxl_dir, images_dir, train={"epochs": 2, "save_state_every_n_steps": 1}, name="d"
    )
    run = TrainingRun(recipe)
    run.setup()
    run.train()
    run.cleanup()
    root = run.run_dir / "state"
    newest, older = list_complete_states(root)[:2]
    (newest / "model.safetensors").write_bytes(b"\x00" * 10)  # damaged
    run = TrainingRun(recipe.model_copy(update={"train": recipe.train.model_copy(update={"epochs": 3})}))
    run.setup()
    assert run.resume_from == older
    assert "falling back to an older state" in caplog.text
    run.cleanup()
    for state in list_complete_states(root):
        (state / "model.safetensors").write_bytes(b"\x00" * 10)
    run = TrainingRun(recipe.model_copy(update={"train": recipe.train.model_copy(update={"epochs": 3})}))
    with pytest.raises(StateError, match="could be loaded(.|\n)*--overwrite"):
        run.setup()  # never a silent fresh start on top of a half-loaded state
    run.cleanup()


def test_changed_math_is_refused_with_a_diff_but_more_epochs_resume(tmp_path, tiny_sdxl_dir, images_dir):
    recipe = make_recipe(tmp_path, tiny_sdxl_dir, images_dir, name="m")
    run = TrainingRun(recipe)
    run.setup()
    run.train()
    run.cleanup()
    changed = make_recipe(tmp_path, tiny_sdxl_dir, images_dir, name="m", lora={"rank": 8})
    with pytest.raises(RunDirError, match=r"lora.rank: 4 -> 8(.|\n)*--overwrite"):
        TrainingRun(changed).setup()
    longer = make_recipe(tmp_path, tiny_sdxl_dir, images_dir, name="m", train={"epochs": 2})
    run = TrainingRun(longer)
    run.setup()
    assert run.state.global_step == 3 and run.state.epoch == 2
    result = run.train()
    run.cleanup()
    assert result.global_step == 6 and (run.run_dir / "epoch2.safetensors").is_file()
    assert [r["step"] for r in step_rows(run.run_dir / "metrics.jsonl")] == list(range(1, 7))
    fresh = TrainingRun(changed, overwrite=True)
    fresh.setup()
    assert fresh.state.global_step == 0 and not (fresh.run_dir / "epoch2.safetensors").exists()
    fresh.cleanup()


def test_concurrent_runs_into_one_directory_are_refused(tmp_path, tiny_sdxl_dir, images_dir):
    recipe = make_recipe(tmp_path, tiny_sdxl_dir, images_dir, name="c")
    lock = RunLock(recipe.run_dir)
    lock.acquire()
    try:
        with pytest.raises(StateError, match=f"another training \\(pid {os.getpid()}\\)"):
            TrainingRun(recipe).setup()
    finally:
        lock.release()


class _NaNAt:
    """Wraps an objective; returns a NaN loss on the given micro-steps (1-based)."""

    def __init__(self, objective, bad: set[int] | None = None, from_step: int | None = None):
        self.objective, self.bad, self.from_step, self.calls = objective, bad or set(), from_step, 0

    def compute_loss(self, batch):
        self.calls += 1
        out = self.objective.compute_loss(batch)
        if self.calls in self.bad or (self.from_step and self.calls >= self.from_step):
            out.loss = out.loss * float("nan")
        return out


def test_a_nan_loss_skips_the_update_and_is_counted(tmp_path, tiny_sdxl_dir, images_dir):
    run = TrainingRun(make_recipe(tmp_path, tiny_sdxl_dir, images_dir, train={"epochs": 1}))
    run.setup()
    run.objective = _NaNAt(run.objective, bad={2})
    snapshots = []
    run.train(
        step_hooks=[
            lambda s: snapshots.append(
                {n: p.detach().clone() for n, p in run.model.unet.named_parameters() if p.requires_grad}
            )
        ]
    )
    run.cleanup()
    assert all(torch.equal(snapshots[0][k], snapshots[1][k]) for k in snapshots[0])  # step 2: no update
    assert not all(torch.equal(snapshots[1][k], snapshots[2][k]) for k in snapshots[1])
    lines = step_rows(run.run_dir / "metrics.jsonl")
    assert [r["train/nonfinite_steps"] for r in lines] == [0, 1, 1]
    assert lines[1]["train/loss"] is None  # strict JSON, no NaN token
    tensors, _ = load_safetensors(run.run_dir / "epoch1.safetensors")
    assert all(torch.isfinite(t).all() for t in tensors.values())


def test_k_non_finite_steps_in_a_row_stop_the_run(tmp_path, tiny_sdxl_dir, images_dir):
    recipe = make_recipe(tmp_path, tiny_sdxl_dir, images_dir, train={"epochs": 3, "max_nonfinite_steps": 2})
    run = TrainingRun(recipe)
    run.setup()
    run.objective = _NaNAt(run.objective, from_step=5)
    with pytest.raises(NonFiniteLossError, match="2 optimizer steps in a row(.|\n)*bf16"):
        run.train()
    run.cleanup()
    assert [p.name for p in list_complete_states(run.run_dir / "state")][0] == "step-00000003"
    assert not (run.run_dir / "epoch2.safetensors").exists()


def test_disk_full_during_export_names_the_path_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "epoch1.safetensors"
    save_safetensors_atomic({"w": torch.ones(4)}, target, {"v": "old"})
    code = textwrap.dedent(
        f"""
        import resource, signal, torch
        from loratk.files import OutputWriteError, save_safetensors_atomic
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        try:
            save_safetensors_atomic({{"w": torch.ones(1_000_000)}}, {str(target)!r}, {{"v": "new"}})
        except OutputWriteError as err:
            print("ERR", err)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "ERR could not write" in proc.stdout and str(target) in proc.stdout, proc.stdout + proc.stderr
    tensors, meta = load_safetensors(target)
    assert meta["v"] == "old" and torch.equal(tensors["w"], torch.ones(4))
    assert [p.name for p in tmp_path.iterdir()] == ["epoch1.safetensors"]  # no temp file left


def test_export_is_read_back_before_it_replaces_the_old_file(tmp_path, monkeypatch):
    import loratk.files as checkpoint

    target = tmp_path / "a.safetensors"
    save_safetensors_atomic({"w": torch.ones(2)}, target)
    real = checkpoint.serialize_safetensors
    # A writer that silently writes the wrong shape: the read-back check must catch it.
    monkeypatch.setattr(
        checkpoint, "serialize_safetensors", lambda t, metadata=None: real({"w": torch.ones(3)})
    )
    with pytest.raises(ValueError, match="shape"):
        save_safetensors_atomic({"w": torch.ones(2) * 5}, target)
    assert torch.equal(load_safetensors(target)[0]["w"], torch.ones(2))
    monkeypatch.undo()
    with pytest.raises(FloatingPointError, match="not finite"):
        from loratk.adapters.lora import LoraAdapter

        LoraAdapter(rank=1, alpha=1)._check_finite(
            {"unet": {"x.lora_A.weight": torch.tensor([float("nan")])}}, target
        )


def test_written_files_get_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        save_safetensors_atomic({"w": torch.ones(1)}, tmp_path / "b.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.safetensors").stat().st_mode & 0o777 == 0o644


def test_damaged_safetensors_errors_name_the_file(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"\x01\x00")
    with pytest.raises(ValueError, match=f"{bad}: not a readable .safetensors file"):
        load_safetensors(bad)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_safetensors(tmp_path / "missing.safetensors")


def test_no_pickle_loading_and_no_remote_code_in_the_package():
    offenders = []
    for path in (REPO / "src").rglob("*.py"):
        text = path.read_text()
        if "torch.load(" in text or "trust_remote_code=True" in text or "pickle.load" in text:
            offenders.append(str(path))
    assert not offenders


def test_incomplete_state_is_never_listed(tmp_path):
    (tmp_path / "step-00000004").mkdir()
    (tmp_path / "step-00000002").mkdir()
    (tmp_path / "step-00000002" / MARKER).write_text("ok")
    assert [p.name for p in list_complete_states(tmp_path)] == ["step-00000002"]


def test_write_error_type_is_an_oserror():
    assert issubclass(OutputWriteError, OSError)


def test_safetensors_bytes_are_deterministic_and_readable_by_safetensors():
    from safetensors.torch import load

    from loratk.files import serialize_safetensors

    tensors = {
        "b.alpha": torch.tensor(4.0, dtype=torch.float16),
        "a.w": torch.randn(3, 5, dtype=torch.bfloat16),
        "c": torch.arange(7, dtype=torch.int64).reshape(7, 1),
        "d": torch.randn(2, 2).t(),  # not contiguous
    }
    one = serialize_safetensors(tensors, {"x": "1", "y": "2"})
    two = serialize_safetensors(dict(reversed(tensors.items())), {"y": "2", "x": "1"})
    assert one == two
    back = load(one)
    assert back.keys() == tensors.keys()
    assert all(torch.equal(back[k], tensors[k]) and back[k].dtype == tensors[k].dtype for k in tensors)


@pytest.mark.parametrize(("engine", "loads"), [("FSDP", True), ("DEEPSPEED", True), ("MULTI_GPU", False)])
def test_sharded_engines_states_are_loaded_by_the_engine_without_the_model_file_check(
    tmp_path, engine, loads
):
    """FSDP and DeepSpeed write their own checkpoint folders (no `model.safetensors`): a state they saved must
    not be refused for missing weights; a DDP state without its model file still is."""
    from types import SimpleNamespace

    from loratk.core.checkpoint import COUNTERS, MARKER, RECIPE, StateError, StateManager, TrainState

    state_dir = tmp_path / "state" / "step-00000004"
    state_dir.mkdir(parents=True)
    (state_dir / COUNTERS).write_text(TrainState(global_step=4).to_json())
    (state_dir / RECIPE).write_text("name = 'x'\n")
    (state_dir / MARKER).write_text("ok\n")
    loaded = []
    accelerator = SimpleNamespace(
        distributed_type=f"DistributedType.{engine}",
        register_save_state_pre_hook=lambda hook: None,
        load_state=lambda path, strict: loaded.append(path),
    )
    manager = StateManager(accelerator, tmp_path / "state", "name = 'x'\n")
    model = torch.nn.Linear(2, 2)
    if loads:
        assert manager.load(state_dir, [model]).global_step == 4 and loaded == [str(state_dir)]
    else:
        with pytest.raises(StateError, match="model.safetensors"):
            manager.load(state_dir, [model])


# ---------------------------------------------------------------- run folders, reruns and write failures


def test_a_run_that_failed_before_its_first_step_does_not_block_the_corrected_rerun(
    tmp_path, tiny_sdxl_dir, images_dir
):
    from loratk.models.family import ModelLoadError

    broken = make_recipe(
        tmp_path, tmp_path / "no-model", images_dir, name="rel", lora={"train_text_encoders": True}
    )
    with pytest.raises(ModelLoadError):
        TrainingRun(broken).setup()
    assert (broken.run_dir / "recipe.resolved.toml").is_file()  # it got that far, and no further
    fixed = make_recipe(tmp_path, tiny_sdxl_dir, images_dir, name="rel")
    run = TrainingRun(fixed)
    run.setup()  # no "holds a run with a different recipe": nothing was trained there
    try:
        assert run.train().global_step == 3
    finally:
        run.cleanup()
    again = make_recipe(tmp_path, tiny_sdxl_dir, images_dir, name="rel", lora={"rank": 8})
    with pytest.raises(RunDirError, match="holds a run with a different recipe"):  # now there is a run
        TrainingRun(again).setup()


def test_moving_the_caches_is_not_a_different_recipe(tmp_path, tiny_sdxl_dir, images_dir):
    first = make_recipe(
        tmp_path, tiny_sdxl_dir, images_dir, name="c", data={"cache_dir": str(tmp_path / "a")}
    )
    run = TrainingRun(first)
    run.setup()
    run.train()
    run.cleanup()
    moved = make_recipe(
        tmp_path,
        tiny_sdxl_dir,
        images_dir,
        name="c",
        data={"cache_dir": str(tmp_path / "b")},
        train={"epochs": 2},
    )
    run = TrainingRun(moved)
    run.setup()
    try:
        assert run.state.global_step == 3  # resumed
        assert run.train().global_step == 6
    finally:
        run.cleanup()


def test_rerunning_a_finished_run_says_so_without_loading_anything(
    tmp_path, tiny_sdxl_dir, images_dir, monkeypatch, caplog
):
    import logging

    import loratk.models.sdxl as sdxl

    recipe = make_recipe(tmp_path, tiny_sdxl_dir, images_dir, name="done")
    run = TrainingRun(recipe)
    run.setup()
    run.train()
    run.cleanup()

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded for a finished run")

    monkeypatch.setattr(sdxl, "load_sdxl", no_loading)
    monkeypatch.setattr("loratk.data.check.run_preflight", no_loading)  # nor any image decoded
    caplog.set_level(logging.INFO, logger="loratk")
    again = TrainingRun(recipe)
    again.setup()
    try:
        assert again.train().global_step == 3
    finally:
        again.cleanup()
    text = caplog.text
    assert (
        "nothing to train" in text and "finished all 1 epoch(s) at step 3" in text and "--overwrite" in text
    )
    assert "epoch 2" not in text  # it was a 1-epoch run: never "resuming ... epoch 2"


def test_the_resume_hint_is_the_command_that_ran_quoted(monkeypatch):
    import loratk.train as train

    monkeypatch.setattr(train, "_parent_command", lambda: ["/bin/bash"])
    assert train.rerun_command("loratk train", ["r.toml", "sample.prompts=[]"]) == (
        "loratk train r.toml 'sample.prompts=[]'"
    )
    launched = [
        "/v/bin/python3",
        "/v/bin/accelerate",
        "launch",
        "--config_file",
        "m.yaml",
        "-m",
        "loratk.train",
    ]
    monkeypatch.setattr(train, "_parent_command", lambda: [*launched, "r.toml", "train.epochs=3"])
    assert train.rerun_command("python -m loratk.train", ["r.toml", "train.epochs=3"]) == (
        "accelerate launch --config_file m.yaml -m loratk.train r.toml train.epochs=3"
    )
    torchrun = ["/v/bin/python3", "-m", "torch.distributed.run", "--nproc-per-node", "2", "t.py", "a b.toml"]
    monkeypatch.setattr(train, "_parent_command", lambda: torchrun)
    assert train.rerun_command("x", []) == "torchrun --nproc-per-node 2 t.py 'a b.toml'"


@pytest.mark.parametrize("where", ["under-a-file", "sysfs"])
def test_an_output_folder_that_cannot_be_written_is_a_clear_error_before_anything_loads(
    tmp_path, tiny_sdxl_dir, images_dir, monkeypatch, where
):
    import loratk.models.sdxl as sdxl

    if where == "under-a-file":
        (tmp_path / "afile").write_text("x")
        output = tmp_path / "afile" / "runs"
    else:
        output = Path("/sys/fs/loratk-runs")
        if os.access("/sys/fs", os.W_OK) and not os.path.ismount("/sys"):
            pytest.skip("/sys is writable here")
    monkeypatch.setattr(sdxl, "load_sdxl", lambda *a, **k: pytest.fail("the model was loaded"))
    recipe = make_recipe(tmp_path, tiny_sdxl_dir, images_dir, name="ro", output_dir=str(output))
    with pytest.raises(
        RunDirError, match=r"ro: cannot write there \(.+\); set output_dir \(now .+\) to a folder"
    ):
        TrainingRun(recipe).setup()


def test_stale_temporaries_of_killed_writes_are_removed_when_a_run_starts(
    tmp_path, tiny_sdxl_dir, images_dir
):
    recipe = make_recipe(tmp_path, tiny_sdxl_dir, images_dir, name="t", train={"epochs": 1})
    run_dir = recipe.run_dir
    stale = [
        run_dir / ".epoch1.safetensors.2k5xfeae.tmp",
        run_dir / ".epoch1_diffusers.ab12cd34",
        run_dir / "state" / ".step-00000003.partial",
        run_dir / "samples" / "epoch001" / ".01-seed1.png.qwertyui.tmp",
    ]
    kept = [run_dir / "notes.tmp", run_dir / ".my-own-file", run_dir / "samples" / "keep.png"]
    for path in stale + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.name.endswith("_diffusers.ab12cd34"):
            path.mkdir()  # a folder export's temporary folder
            (path / "model_index.json").write_text("{}")
        else:
            path.write_bytes(b"")
    run = TrainingRun(recipe)
    run.setup()
    run.cleanup()
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept)


def test_disk_full_during_a_state_save_is_a_clear_error_and_the_previous_state_stays(
    tmp_path, tiny_sdxl_dir, images_dir
):
    recipe = _write_recipe(tmp_path, tiny_sdxl_dir, images_dir, "full", train={"epochs": 1})
    code = textwrap.dedent(
        f"""
        import resource, signal
        from loratk.core.checkpoint import TrainState
        from loratk.files import OutputWriteError
        from loratk.recipe import load_recipe
        from loratk.run import TrainingRun

        run = TrainingRun(load_recipe({str(recipe)!r}))
        run.setup()
        run.train()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
        try:
            run.states.save(TrainState(global_step=99, epoch=2))
        except OutputWriteError as err:
            print("ERR", err)
        run.cleanup()
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )  # fmt: skip
    assert "ERR could not write" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert "step-00000099" in proc.stdout and "free some disk space" in proc.stdout
    assert "newest complete state" in proc.stdout and "step-00000003" in proc.stdout
    assert "Traceback" not in proc.stderr
    state_dir = tmp_path / "runs" / "full" / "state"
    assert sorted(p.name for p in state_dir.iterdir()) == ["step-00000002", "step-00000003"]  # no partial
