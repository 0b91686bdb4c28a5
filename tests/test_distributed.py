"""Accelerate configs and multi-process behaviour (two CPU processes with gloo stand in for two GPUs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import copy_examples, make_recipe, step_rows
from loratk.components.launch import resolve_accumulation
from loratk.recipe import RecipeError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "accelerate_configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_accelerate_config_loads_and_says_when_to_use_it(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_machines == 1
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert len(header) >= 2
    assert any(f"--config_file accelerate_configs/{path.name}" in line for line in header)


def test_the_five_configs_exist():
    assert {p.stem for p in CONFIGS} >= {"single_gpu", "multi_gpu", "deepspeed_zero2", "fsdp", "cpu_2proc"}


def test_readme_documents_the_configs():
    readme = (REPO / "README.md").read_text()
    assert all(f"accelerate_configs/{p.name}" in readme for p in CONFIGS)


def test_global_batch_sets_the_accumulation(tmp_path):
    recipe = make_recipe(tmp_path, "m", tmp_path, train={"batch_size": 2, "global_batch_size": 16})
    assert resolve_accumulation(recipe, num_processes=2) == 4
    assert resolve_accumulation(recipe, num_processes=8) == 1
    with pytest.raises(RecipeError, match=r"not a multiple of batch_size x processes = 2 x 3 = 6"):
        resolve_accumulation(recipe, num_processes=3)
    plain = make_recipe(tmp_path, "m", tmp_path, train={"gradient_accumulation_steps": 3})
    assert resolve_accumulation(plain, num_processes=4) == 3


def test_global_batch_and_accumulation_together_are_refused(tmp_path):
    with pytest.raises(
        RecipeError, match="train: global_batch_size and gradient_accumulation_steps are both set"
    ):
        make_recipe(tmp_path, "m", tmp_path, train={"global_batch_size": 8, "gradient_accumulation_steps": 2})


def _launch(recipe: Path, cwd: Path, processes: int, *overrides: str) -> subprocess.CompletedProcess:
    accelerate = Path(sys.executable).with_name("accelerate")
    config = (
        ["--config_file", str(REPO / "accelerate_configs" / "cpu_2proc.yaml")]
        if processes == 2
        else [
            "--num_processes",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--num_machines",
            "1",
        ]
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run(
        [str(accelerate), "launch", *config, "-m", "loratk.train", str(recipe), *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _train_in_this_process(recipe: Path, cwd: Path, *overrides: str) -> None:
    """The 1-process reference run, as `loratk.train` runs it (`train`), in this process: what a 1-process
    launch would write, without starting the launcher and a trainer."""
    from loratk.recipe import load_recipe
    from loratk.run import train

    old = Path.cwd()
    os.chdir(cwd)  # the recipe's paths are relative
    try:
        train(load_recipe(recipe, list(overrides)))
    finally:
        os.chdir(old)


# One uninterrupted 2-process run, read by the tests below that check different things of it.
DDP_RUN = dict(
    data={"dir": "images"}, train={"epochs": 2, "learning_rate": 1e-2, "save_state_every_n_steps": 1}
)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, tiny_sdxl_dir) -> tuple[Path, subprocess.CompletedProcess]:
    """`runs/two` of a 2-process `loratk.train` launch of the recipe `_write(..., "two", **DDP_RUN)` writes; its
    paths are relative, so the same recipe in another folder writes the same files."""
    tmp = tmp_path_factory.mktemp("ddp")
    recipe = _write(tmp, tiny_sdxl_dir, copy_examples(tmp / "images"), "two", **DDP_RUN)
    two = _launch(recipe, tmp, 2)
    assert two.returncode == 0, two.stderr[-3000:]
    return tmp, two


@pytest.mark.slow
def test_two_processes_write_the_same_outputs_as_one(tmp_path, tiny_sdxl_dir, images_dir, ddp_run):
    # 6 images in 3 aspect buckets give an uneven number of batches: every rank must still get the same
    # number of steps, or the run would hang at the epoch end (the subprocess timeout catches a hang).
    shared, two = ddp_run
    path = _write(tmp_path, tiny_sdxl_dir, images_dir, "two", **DDP_RUN)
    _train_in_this_process(path, tmp_path, "name=one")
    assert "2 process(es)" in two.stderr

    def names(root: Path, run: str) -> list[str]:  # the final adapter is named after the run
        return sorted(p.name.replace(run, "NAME") for p in (root / "runs" / run).iterdir())

    assert names(shared, "two") == names(tmp_path, "one")
    lines = step_rows(shared / "runs" / "two" / "metrics.jsonl")
    assert [r["step"] for r in lines] == [1, 2, 3, 4]  # 6 images / (2 x 2) -> 2 steps per epoch, metrics once


DRIVER = """
import os, signal, sys
from loratk.recipe import load_recipe
from loratk.run import TrainingRun

run = TrainingRun(load_recipe(sys.argv[1]))
run.setup()
kill_at = int(os.environ.get("KILL_AT", 0))
def hook(state):
    if state.global_step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
run.train(step_hooks=[hook])
run.cleanup()
"""


def _write(tmp_path: Path, tiny_sdxl_dir: Path, images_dir: Path, name: str, **sections) -> Path:
    from loratk.recipe import dump_recipe

    recipe = make_recipe(tmp_path, tiny_sdxl_dir, images_dir, name=name, output_dir="runs", **sections)
    path = tmp_path / f"{name}.toml"
    path.write_text(dump_recipe(recipe))
    return path


def _weights(path: Path) -> dict:
    from loratk.files import load_safetensors

    return load_safetensors(path)[0]


@pytest.mark.slow
def test_two_processes_with_batch_b_match_one_process_with_batch_2b(tmp_path, tiny_sdxl_dir, images_dir):
    import torch

    for extra in sorted(images_dir.iterdir())[8:]:  # 4 images, one bucket, file order: a fixed data order
        extra.unlink()
    common = dict(
        data={"dir": "images", "buckets": False, "shuffle": False, "repeats": 2},
        # Adam turns float-rounding noise in near-zero gradients into +-lr steps: a small lr keeps that noise
        # under the tolerance while the weights still move (checked below). The UNet's CPU kernels round
        # differently for batch 2 and batch 4 (about 1e-6 per forward), which 1e-3 amplified to 2e-5.
        train={"epochs": 2, "learning_rate": 1e-4},
        export={"dtype": "fp32"},
    )
    one = _write(
        tmp_path,
        tiny_sdxl_dir,
        images_dir,
        "one",
        **{**common, "train": {**common["train"], "batch_size": 4}},
    )
    two = _write(
        tmp_path,
        tiny_sdxl_dir,
        images_dir,
        "two",
        **{**common, "train": {**common["train"], "batch_size": 2}},
    )
    _train_in_this_process(one, tmp_path)
    proc = _launch(two, tmp_path, 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _weights(tmp_path / "runs/one/one.safetensors"), _weights(tmp_path / "runs/two/two.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)  # atol: summation-order noise near 0
    before = _weights(tmp_path / "runs/one/epoch1.safetensors")
    assert any(not torch.equal(before[k], a[k]) for k in a)  # it trained


@pytest.mark.slow
def test_kill_and_resume_with_two_processes_ends_with_the_same_weights(
    tmp_path, tiny_sdxl_dir, images_dir, ddp_run
):
    shared, _ = ddp_run  # the uninterrupted run of the same recipe
    recipe = _write(tmp_path, tiny_sdxl_dir, images_dir, "two", **DDP_RUN)
    (tmp_path / "driver.py").write_text(DRIVER)
    accelerate = Path(sys.executable).with_name("accelerate")

    def launch(**env: int) -> subprocess.CompletedProcess:
        full = dict(
            os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **{k: str(v) for k, v in env.items()}
        )
        cmd = [
            str(accelerate),
            "launch",
            "--config_file",
            str(REPO / "accelerate_configs" / "cpu_2proc.yaml"),
            "driver.py",
            str(recipe),
        ]
        return subprocess.run(cmd, cwd=tmp_path, env=full, capture_output=True, text=True, timeout=600)

    def trace(root: Path) -> list[tuple]:
        lines = step_rows(root / "runs/two/metrics.jsonl")
        return [(r["step"], float.hex(r["train/loss"]), float.hex(r["lr/unet"])) for r in lines]

    reference, metrics = (shared / "runs/two/epoch2.safetensors").read_bytes(), trace(shared)
    assert [m[0] for m in metrics] == [1, 2, 3, 4]
    assert launch(KILL_AT=3).returncode != 0  # both ranks die after step 3 (mid-run, epoch 2)
    assert not (tmp_path / "runs/two/epoch2.safetensors").exists()
    resumed = launch()
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (tmp_path / "runs/two/epoch2.safetensors").read_bytes() == reference
    assert trace(tmp_path) == metrics


def test_each_process_gets_its_own_deterministic_seed():
    from loratk.core.loop import compute_step_seed

    assert compute_step_seed(1, 5, 0) == compute_step_seed(1, 5, 0)
    assert len({compute_step_seed(1, 5, rank) for rank in range(8)}) == 8


# ---------------------------------------------------------------- sharded engines: export, launch checks


def _lora_model(tmp_path, tiny_sdxl_dir, images_dir):
    from loratk.components.strategies import build_adapter
    from loratk.models.sdxl import load_sdxl

    model = load_sdxl(str(tiny_sdxl_dir))
    adapter = build_adapter(make_recipe(tmp_path, tiny_sdxl_dir, images_dir))
    adapter.apply(model)
    return model, adapter


def test_every_rank_gathers_the_weights_and_only_the_main_process_writes_them(
    tmp_path, tiny_sdxl_dir, images_dir
):
    """Under FSDP a rank's live module holds a shard; the export must write the gathered full weights."""
    import torch
    from accelerate import PartialState

    from loratk.export.epochs import EpochExporter

    PartialState(cpu=True)  # the exporter logs through Accelerate

    model, adapter = _lora_model(tmp_path, tiny_sdxl_dir, images_dir)
    live = model.unet.state_dict()
    gathered = {"unet": {k: torch.full_like(v, 0.5) if "lora_" in k else v for k, v in live.items()}}
    calls = []

    def gather():
        calls.append("gather")
        return gathered

    common = dict(adapter=adapter, model=model, name="t", every_n_epochs=1, num_epochs=2, gather=gather)
    metadata = lambda epoch, step: {"loratk.epoch": str(epoch)}  # noqa: E731
    (tmp_path / "rank1").mkdir()
    EpochExporter(run_dir=tmp_path / "rank1", is_main=False, metadata=metadata, **common)(1, 3)
    assert calls == ["gather"] and list((tmp_path / "rank1").iterdir()) == []
    (tmp_path / "rank0").mkdir()
    EpochExporter(run_dir=tmp_path / "rank0", is_main=True, metadata=metadata, **common)(1, 3)
    tensors = _weights(tmp_path / "rank0" / "epoch1.safetensors")
    lora = {k: v for k, v in tensors.items() if ".lora_" in k}
    assert lora and all(torch.all(v == 0.5) for v in lora.values())
    assert not all(torch.all(v == 0.5) for k, v in live.items() if "lora_A" in k)  # the live ones differ


def test_full_export_writes_the_gathered_weights_not_the_live_shard(tmp_path, tiny_sdxl_dir):
    import torch

    from loratk.adapters.full import FullAdapter
    from loratk.models.sdxl import load_sdxl

    model = load_sdxl(str(tiny_sdxl_dir))
    adapter = FullAdapter(export_dtype="fp32")
    adapter.apply(model)
    live = {k: v.detach().clone() for k, v in model.unet.state_dict().items()}
    gathered = {"unet": {k: v + 1.0 if v.is_floating_point() else v for k, v in live.items()}}
    files = adapter.export(model, tmp_path / "epoch1.safetensors", {}, weights=gathered)
    tensors = _weights(files[0])
    torch.testing.assert_close(
        tensors["model.diffusion_model.input_blocks.0.0.weight"], live["conv_in.weight"] + 1.0
    )
    assert all(torch.equal(v, model.unet.state_dict()[k]) for k, v in live.items())  # live model untouched


class _FakeAccelerator:
    def __init__(self, kind: str, processes: int, zero_stage: int | None = None):
        from types import SimpleNamespace

        self.distributed_type = f"DistributedType.{kind}"
        self.num_processes = processes
        self.state = SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=zero_stage))


@pytest.mark.parametrize(
    ("engine", "sections", "sampling", "message"),
    [
        (("FSDP", 2), {}, True, r"\[sample\] renders on the main process alone, but FSDP shards"),
        (("DEEPSPEED", 2, 3), {}, True, r"DeepSpeed ZeRO-3 shards the weights(.|\n)*loratk sample"),
        (("DEEPSPEED", 2, 2), {"lora": {"train_text_encoders": True}}, False, r"lora.train_text_encoders"),
        (("MULTI_GPU", 2), {"optim": {"name": "adafactor", "fused_backward": True}}, False, "fused_backward"),
    ],
)
def test_the_launch_check_refuses_what_the_engine_cannot_run(tmp_path, engine, sections, sampling, message):
    from loratk.components.launch import LaunchError, check_launch

    recipe = make_recipe(tmp_path, "m", tmp_path, **sections)
    with pytest.raises(LaunchError, match=message):
        check_launch(recipe, _FakeAccelerator(*engine), samples_during_training=sampling)


@pytest.mark.parametrize("engine", [("DEEPSPEED", 2, 2), ("MULTI_GPU", 2), ("FSDP", 2), ("NO", 1)])
def test_the_launch_check_lets_sampling_run_where_the_main_process_holds_every_weight(tmp_path, engine):
    from loratk.components.launch import check_launch

    recipe = make_recipe(tmp_path, "m", tmp_path)
    check_launch(recipe, _FakeAccelerator(*engine), samples_during_training=engine[0] != "FSDP")


PREFLIGHT_DRIVER = """
import json, sys
from pathlib import Path
from accelerate import Accelerator
from loratk.data import check
from loratk.data.dataset import DataError
from loratk.recipe import load_recipe
from loratk.components.launch import use_cpu_for_multiprocess_launch
from loratk.components.data import check_data_once

calls = []
real = check.run_preflight
check.run_preflight = lambda *a, **k: calls.append(1) or real(*a, **k)
accelerator = Accelerator(cpu=use_cpu_for_multiprocess_launch())
results = {}
for recipe in sys.argv[1:]:
    try:
        results[recipe] = {"good": len(check_data_once(load_recipe(recipe), accelerator).good)}
    except DataError as err:
        results[recipe] = {"error": str(err)}
results["preflights"] = len(calls)
Path(f"rank{accelerator.process_index}.json").write_text(json.dumps(results))
accelerator.end_training()  # destroys the process group before exit
"""


@pytest.mark.slow
def test_the_preflight_runs_once_and_every_rank_gets_its_report_or_its_error(
    tmp_path, tiny_sdxl_dir, images_dir
):
    import shutil

    bad = tmp_path / "bad_images"
    shutil.copytree(images_dir, bad)
    (bad / "broken.png").write_bytes(b"not a png")
    good_recipe = _write(tmp_path, tiny_sdxl_dir, images_dir, "good")
    bad_recipe = _write(tmp_path, tiny_sdxl_dir, bad, "bad")
    (tmp_path / "driver.py").write_text(PREFLIGHT_DRIVER)
    accelerate = Path(sys.executable).with_name("accelerate")
    config = str(REPO / "accelerate_configs" / "cpu_2proc.yaml")
    done = subprocess.run(
        [str(accelerate), "launch", "--config_file", config, "driver.py", str(good_recipe), str(bad_recipe)],
        cwd=tmp_path,
        env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert (rank0["preflights"], rank1["preflights"]) == (2, 0)
    assert rank0[str(good_recipe)] == rank1[str(good_recipe)] == {"good": 6}
    assert "broken.png" in rank1[str(bad_recipe)]["error"]
    assert rank0[str(bad_recipe)] == rank1[str(bad_recipe)]


def test_the_launch_check_lists_every_problem_at_once(tmp_path):
    from loratk.components.launch import LaunchError, check_launch

    recipe = make_recipe(
        tmp_path,
        "m",
        tmp_path,
        optim={"name": "adafactor", "fused_backward": True},
        lora={"train_text_encoders": True},
    )
    with pytest.raises(LaunchError) as err:
        check_launch(recipe, _FakeAccelerator("DEEPSPEED", 2, 3), samples_during_training=True)
    assert str(err.value).count("\n  ") == 3 and "cannot run on DeepSpeed ZeRO-3" in str(err.value)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_each_config_headers_example_command_passes_the_launch_check(path, monkeypatch):
    """The command in each config's header is one a user can paste: its recipe and overrides fit the engine."""
    import shlex

    from accelerate.commands.config.config_args import load_config_from_file

    from loratk.components.hooks import load_sample_prompts
    from loratk.components.launch import check_launch
    from loratk.recipe import load_recipe

    config = load_config_from_file(str(path))
    command = next(line for line in path.read_text().splitlines() if "-m loratk.train" in line)
    recipe_path, *overrides = shlex.split(command.split("-m loratk.train", 1)[1])
    monkeypatch.chdir(REPO)
    recipe = load_recipe(recipe_path, overrides)
    zero_stage = (config.deepspeed_config or {}).get("zero_stage")
    kind = str(config.distributed_type).rsplit(".", 1)[-1]
    engine = _FakeAccelerator(kind, config.num_processes, zero_stage)
    check_launch(recipe, engine, samples_during_training=bool(load_sample_prompts(recipe)))


def test_unsharded_runs_export_the_live_weights_without_gathering(tmp_path, tiny_sdxl_dir, images_dir):
    """A gather copies every weight (DeepSpeed clones the whole state dict): only sharded engines need it."""
    from loratk.core.engine import describe_engine
    from loratk.run import TrainingRun

    run = TrainingRun(make_recipe(tmp_path, tiny_sdxl_dir, images_dir))
    run.setup()
    try:
        assert describe_engine(run.accelerator) == ("NO", False) and run.exporter.gather is None
        assert describe_engine(_FakeAccelerator("FSDP", 2)) == ("FSDP", True)
        assert describe_engine(_FakeAccelerator("DEEPSPEED", 2, 2)) == ("DeepSpeed ZeRO-2", False)
    finally:
        run.cleanup()


FSDP2_DRIVER = """
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from loratk.adapters.full import FullAdapter
from loratk.export.epochs import EpochExporter
from loratk.models.sdxl import load_sdxl
from loratk.recipe import load_recipe
from loratk.core.engine import describe_engine
from loratk.components.strategies import build_adapter
from loratk.components.launch import gather_full_weights, use_cpu_for_multiprocess_launch

recipe, out = load_recipe(sys.argv[1]), Path(sys.argv[2])
accelerator = Accelerator(cpu=use_cpu_for_multiprocess_launch())
mesh = init_device_mesh("cpu", (accelerator.num_processes,))

for kind in ("lora", "full"):
    model = load_sdxl(recipe.model.path)
    adapter = build_adapter(recipe) if kind == "lora" else FullAdapter(export_dtype="fp32")
    torch.manual_seed(0)  # every rank initialises the adapter alike (`loratk.train` seeds before it too)
    adapter.apply(model)
    with torch.no_grad():  # weights that look trained, the same on every rank
        for name, param in model.unet.named_parameters():
            if param.requires_grad and (kind == "full" or "lora_B" in name):
                param.add_(torch.randn_like(param) * 0.1)
    if accelerator.is_main_process:
        adapter.export(model, out / f"{kind}-unsharded.safetensors", {})
    # Shard as Accelerate's FSDP2 wrap does: every transformer block, then the UNet.
    for module in list(model.unet.modules()):
        if type(module).__name__ == "BasicTransformerBlock":
            fully_shard(module, mesh=mesh)
    fully_shard(model.unet, mesh=mesh)
    assert isinstance(next(model.unet.parameters()), DTensor)
    # Accelerate's FSDP2 branch of get_state_dict (a CPU launch cannot select FSDP by itself).
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = SimpleNamespace(fsdp_version=2)
    assert describe_engine(accelerator) == ("FSDP", True)
    EpochExporter(
        adapter=adapter,
        model=model,
        run_dir=out,
        name=f"{kind}-sharded",
        every_n_epochs=1,
        num_epochs=1,
        metadata=lambda epoch, step: {},
        gather=lambda: gather_full_weights(accelerator, {"unet": model.unet}),
        is_main=accelerator.is_main_process,
    )(1, 1)
    accelerator.state.distributed_type = DistributedType.MULTI_CPU
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (out / "epoch1.safetensors").rename(out / f"{kind}-sharded.safetensors")
    accelerator.wait_for_everyone()
accelerator.end_training()
"""


@pytest.mark.slow
def test_fsdp2_sharded_weights_export_exactly_as_the_unsharded_model(tmp_path, tiny_sdxl_dir, images_dir):
    """Two CPU processes shard the UNet with FSDP2 (`fully_shard`); the export gathers with Accelerate's
    `get_state_dict` and must write the same tensors as the unsharded model, for LoRA and full weights."""
    import torch

    recipe = _write(tmp_path, tiny_sdxl_dir, images_dir, "fsdp2")
    (tmp_path / "driver.py").write_text(FSDP2_DRIVER)
    (tmp_path / "out").mkdir()
    accelerate = Path(sys.executable).with_name("accelerate")
    config = str(REPO / "accelerate_configs" / "cpu_2proc.yaml")
    done = subprocess.run(
        [str(accelerate), "launch", "--config_file", config, "driver.py", str(recipe), "out"],
        cwd=tmp_path,
        env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    for kind in ("lora", "full"):
        sharded = _weights(tmp_path / "out" / f"{kind}-sharded.safetensors")
        unsharded = _weights(tmp_path / "out" / f"{kind}-unsharded.safetensors")
        assert sharded.keys() == unsharded.keys() and len(sharded) > 10
        assert all(torch.equal(sharded[k], unsharded[k]) for k in sharded), kind


FSDP_TRAIN_DRIVER = """
import sys

import accelerate
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from loratk.recipe import load_recipe
from loratk.core.engine import describe_engine
from loratk.run import TrainingRun


class FSDPOnCPU(accelerate.Accelerator):
    # Accelerate selects FSDP on GPUs only; on this CPU launch the engine is switched after start-up, with the
    # plugin read from the FSDP_* variables that `accelerate launch --config_file fsdp.yaml` set.
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.state.distributed_type = DistributedType.FSDP
        self.state.fsdp_plugin = FullyShardedDataParallelPlugin()


accelerate.Accelerator = FSDPOnCPU
run = TrainingRun(load_recipe(sys.argv[1], sys.argv[2:]))
run.setup()
assert describe_engine(run.accelerator) == ("FSDP", True) and run.accelerator.is_fsdp2
run.train()
run.cleanup()
"""


@pytest.mark.slow
def test_a_run_on_the_fsdp_config_trains_saves_and_resumes_like_ddp(
    tmp_path, tiny_sdxl_dir, images_dir, ddp_run
):
    """accelerate_configs/fsdp.yaml (FSDP2) on two CPU processes: 1 epoch, then resumed to 2, end with the
    adapters of the 2-epoch DDP run of the same recipe (`ddp_run`); states are FSDP's sharded folders."""
    import torch

    shared, _ = ddp_run
    # The math of DDP_RUN; states at the epoch ends only (their frequency changes nothing that is trained).
    train = {k: v for k, v in DDP_RUN["train"].items() if k != "save_state_every_n_steps"}
    recipe = _write(tmp_path, tiny_sdxl_dir, images_dir, "fsdp", data=DDP_RUN["data"], train=train)
    (tmp_path / "driver.py").write_text(FSDP_TRAIN_DRIVER)
    accelerate = Path(sys.executable).with_name("accelerate")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")

    def fsdp(*overrides: str) -> None:
        config = ["--config_file", str(REPO / "accelerate_configs" / "fsdp.yaml"), "--mixed_precision", "no"]
        done = subprocess.run(
            [str(accelerate), "launch", *config, "driver.py", str(recipe), *overrides],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-4000:]

    fsdp("train.epochs=1")
    states = sorted((tmp_path / "runs" / "fsdp" / "state").iterdir())
    assert states and all((s / "pytorch_model_fsdp_0").is_dir() for s in states)
    assert not (tmp_path / "runs" / "fsdp" / "epoch2.safetensors").exists()
    fsdp()
    metrics = step_rows(tmp_path / "runs" / "fsdp" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    for epoch in (1, 2):
        a = _weights(tmp_path / "runs" / "fsdp" / f"epoch{epoch}.safetensors")
        b = _weights(shared / "runs" / "two" / f"epoch{epoch}.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key].float(), b[key].float(), rtol=1e-3, atol=1e-4, msg=key)


def test_process_group_outlives_the_models_of_a_failed_run(tmp_path):
    """The run's DDP models (held by the failed run's frames) are freed before the process group goes."""
    code = """
import os, socket, weakref
import torch, torch.distributed as dist
from loratk.components.launch import ProcessGroupHold
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
dist.init_process_group("gloo", rank=0, world_size=1)
hold = ProcessGroupHold()
hold.hold()
def failing_run():
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
    failing_run.model = weakref.ref(model)
    raise RuntimeError("the run failed")
try:
    failing_run()
except RuntimeError as err:
    dist.destroy_process_group()
    assert failing_run.model() is not None and hold.group is not None
    hold.release(err)
    assert failing_run.model() is None, "the DDP model outlived the process group"
    assert hold.group is None
print("ok")
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
