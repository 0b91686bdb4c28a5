"""Stopping a run the way container runtimes and schedulers do: SIGTERM to the process group and SIGKILL after
a grace period, or a signal to the launcher alone. Each run must end with a state it resumes from."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import make_recipe, step_rows
from loratk.core.checkpoint import list_complete_states
from loratk.recipe import dump_recipe

REPO = Path(__file__).resolve().parents[1]
GRACE_S = 60  # docker stop waits 10 s by default; the tiny run saves in well under a second


def _recipe(tmp_path: Path, tiny_sdxl_dir: Path, images_dir: Path) -> Path:
    recipe = make_recipe(
        tmp_path,
        tiny_sdxl_dir,
        images_dir,
        name="stop",
        output_dir="runs",
        data={"dir": "images"},
        train={"epochs": 200, "learning_rate": 1e-3},
    )
    path = tmp_path / "stop.toml"
    path.write_text(dump_recipe(recipe))
    return path


def _start(command: list[str], cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    # A session of its own: the process group a runtime signals.
    return subprocess.Popen(
        command, cwd=cwd, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def _wait_for_steps(run_dir: Path, proc: subprocess.Popen, steps: int = 2) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:
        if len(step_rows(metrics)) >= steps:
            return
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.2)
    pytest.fail("training did not start")


def _stop_like_a_container(proc: subprocess.Popen, target: int, group: bool) -> tuple[int, str, bool]:
    """SIGTERM (to the group or one process), then SIGKILL to the group once the grace period is over."""
    (os.killpg if group else os.kill)(target, signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=GRACE_S)
        killed = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        killed = True
    return proc.returncode, err, killed


def _pids_in_group(pgid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _assert_resumable(run_dir: Path) -> None:
    states = list_complete_states(run_dir / "state")
    assert states, "no state was saved"
    last_logged = step_rows(run_dir / "metrics.jsonl")[-1]["step"]
    assert states[0].name == f"step-{last_logged:08d}"  # the state holds every logged step
    assert not list((run_dir / "state").glob(".*.partial"))


@pytest.mark.slow
def test_loratk_train_saves_within_the_grace_period_of_a_container_stop(tmp_path, tiny_sdxl_dir, images_dir):
    recipe = _recipe(tmp_path, tiny_sdxl_dir, images_dir)
    proc = _start([sys.executable, "-m", "loratk.cli", "train", str(recipe)], tmp_path)
    run_dir = tmp_path / "runs" / "stop"
    _wait_for_steps(run_dir, proc)
    code, err, killed = _stop_like_a_container(proc, proc.pid, group=True)
    assert not killed, "still running when the grace period ended"
    assert code == 143, err[-3000:]
    assert f"Resume with:\n  loratk train {recipe}" in err  # the command that ran
    assert "Traceback" not in err
    _assert_resumable(run_dir)


@pytest.mark.slow
def test_killing_the_launcher_alone_stops_the_trainer_with_a_state(tmp_path, tiny_sdxl_dir, images_dir):
    """`kill LAUNCHER_PID` (or `docker stop` of a launcher that is PID 1): the trainer must not train on."""
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    launch = [accelerate, "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no"]
    launch += ["--dynamo_backend", "no", "-m", "loratk.train", str(tmp_path / "stop.toml")]
    _recipe(tmp_path, tiny_sdxl_dir, images_dir)
    proc = _start(launch, tmp_path)
    run_dir = tmp_path / "runs" / "stop"
    _wait_for_steps(run_dir, proc)
    trainer = int((run_dir / ".lock").read_text())
    assert trainer != proc.pid
    os.kill(proc.pid, signal.SIGTERM)  # the launcher only
    proc.communicate(timeout=GRACE_S)
    deadline = time.time() + GRACE_S
    while time.time() < deadline and Path(f"/proc/{trainer}").exists():
        time.sleep(0.2)
    alive = Path(f"/proc/{trainer}").exists()
    if alive:
        os.killpg(proc.pid, signal.SIGKILL)
    assert not alive, "the trainer went on training after its launcher was killed"
    _assert_resumable(run_dir)
    assert not _pids_in_group(proc.pid)


@pytest.mark.slow
def test_the_multi_process_launcher_passes_sigterm_on_and_waits_for_the_save(
    tmp_path, tiny_sdxl_dir, images_dir
):
    """What torchrun (accelerate's multi-GPU launcher) does with a SIGTERM to itself alone: it signals every
    trainer and waits for them, so both ranks save one state together."""
    _recipe(tmp_path, tiny_sdxl_dir, images_dir)
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    config = REPO / "accelerate_configs" / "cpu_2proc.yaml"
    proc = _start(
        [
            accelerate,
            "launch",
            "--config_file",
            str(config),
            "-m",
            "loratk.train",
            str(tmp_path / "stop.toml"),
        ],
        tmp_path,
    )
    run_dir = tmp_path / "runs" / "stop"
    _wait_for_steps(run_dir, proc)
    code, err, killed = _stop_like_a_container(proc, proc.pid, group=False)
    assert not killed, err[-3000:]
    assert code != 0  # the launcher reports the stop as a failure; the state is what matters
    _assert_resumable(run_dir)
    assert not _pids_in_group(proc.pid)
