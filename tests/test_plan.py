"""loratk.memory and `loratk plan`: the tracker, CUDA's autocast rules, the estimate on the tiny model (linear
in the batch; the chosen batch fits and the next does not), and `train.batch_size = "auto"`."""

from __future__ import annotations

import pytest
import torch

from helpers import make_recipe
from loratk.memory.autocast import CudaAutocastRules
from loratk.memory.estimate import MemoryEstimate, fake_run, run_step, with_margin
from loratk.memory.sizes import parse_size
from loratk.memory.tracker import MemoryTracker

MIB = 2**20


def _recipe(tmp_path, **sections):
    sections.setdefault("lora", {"rank": 4, "alpha": 4, "targets": "attention"})  # fewer ops per step
    return make_recipe(tmp_path, "builtin:tiny-sdxl", tmp_path / "images", **sections)


def test_tracker_counts_live_storages_and_frees_them():
    with MemoryTracker() as tracker:
        a = torch.ones(MIB // 4)  # 1 MiB of fp32
        view = a[10:]  # shares the storage: not counted again
        b = a * 2
        assert tracker.current == 2 * MIB
        del a
        assert tracker.current == 2 * MIB  # the view keeps the storage alive
        del view
        assert tracker.current == MIB
        tracker.track([b], "optimizer")
        assert tracker.totals["optimizer"] == MIB and tracker.totals["activations"] == 0
        c = b + 1
        del c, b
    assert tracker.current == 0
    assert tracker.peak == 2 * MIB
    assert tracker.breakdown().by_category["activations"] == 2 * MIB  # the first peak: a and b


def test_cuda_autocast_rules_run_norms_and_softmax_in_fp32():
    x = torch.randn(2, 8, 4, 4, dtype=torch.bfloat16)
    weight = torch.randn(8, 8, requires_grad=True)  # an fp32 trainable weight
    with CudaAutocastRules(torch.bfloat16):
        assert torch.nn.functional.group_norm(x, 2).dtype == torch.float32  # CPU autocast: bf16
        assert torch.softmax(x, -1).dtype == torch.float32
        assert torch.nn.functional.linear(x.float().flatten(1)[:, :8], weight).dtype == torch.bfloat16
        assert torch.nn.functional.silu(x).dtype == torch.bfloat16  # not listed: the input's dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.functional.group_norm(x, 2).dtype == torch.bfloat16  # why CUDA's rules are needed


def test_parse_size():
    assert parse_size("24GiB") == 24 * 2**30
    assert parse_size("1.5 GB") == 1_500_000_000
    assert parse_size("512M") == 512 * MIB
    with pytest.raises(ValueError, match="24GiB"):
        parse_size("lots")


@pytest.fixture(scope="module")
def tiny_steps(tmp_path_factory):
    """Steps at batch 1, 2 and 3 of a tiny LoRA recipe (AdamW, fp32), on fake tensors."""
    recipe = _recipe(tmp_path_factory.mktemp("plan"))
    with fake_run(recipe) as run:
        return [run_step(run, batch) for batch in (1, 2, 3)]


def test_estimate_is_linear_in_the_batch(tiny_steps):
    p1, p2, p3 = (s.peak.total for s in tiny_steps)
    assert p1 < p2 < p3
    assert (p3 - p2) == pytest.approx(p2 - p1, rel=0.02)


def test_estimate_splits_the_peak(tiny_steps):
    peak = tiny_steps[1].peak
    parts = peak.by_category
    assert sum(parts.values()) == peak.total
    assert parts["weights"] > 0 and parts["trainable"] > 0 and parts["activations"] > 0
    # AdamW keeps two fp32 moments per trainable weight (and a scalar step each).
    assert parts["optimizer"] == pytest.approx(2 * parts["trainable"], rel=0.02)
    assert peak.phase in ("forward", "backward", "optimizer")


def test_chosen_batch_fits_and_the_next_does_not(tiny_steps):
    first, second, third = tiny_steps
    per_image = second.peak.total - first.peak.total
    estimate = MemoryEstimate((first, second), first.peak.total - per_image, per_image, 0.0)
    budget = (with_margin(second.peak.total) + with_margin(third.peak.total)) // 2
    assert estimate.max_batch(budget) == 2
    assert with_margin(second.peak.total) <= budget < with_margin(third.peak.total)  # measured, not fitted
    assert estimate.max_batch(with_margin(first.peak.total) - 1) == 0


def test_the_forked_second_step_gives_the_same_line(tmp_path, monkeypatch):
    """`loratk plan` runs the line's second step and the samples in a forked process beside the first step:
    the same numbers."""
    import os

    from loratk.memory.estimate import estimate_memory
    from loratk.memory.forked import can_fork

    if not can_fork():
        pytest.skip("needs fork and two cores")
    recipe = _recipe(tmp_path, sample={"prompts": ["a cat"]})
    alone = estimate_memory(recipe, batch_sizes=(1, 2), renders=True)
    forks, fork = [], os.fork
    monkeypatch.setattr(os, "fork", lambda: forks.append(1) or fork())
    forked = estimate_memory(recipe, batch_sizes=(1, 2), renders=True, parallel=True)
    assert forks == [1]
    assert [p.peak for p in forked.points] == [p.peak for p in alone.points]
    assert forked.per_image_bytes == alone.per_image_bytes > 0
    assert [r.peak for r in forked.renders] == [r.peak for r in alone.renders] != []  # the samples too


def test_plan_refuses_a_recipe_error(tmp_path, capsys):
    from loratk.cli import main

    path = tmp_path / "bad.toml"
    path.write_text('name = "x"\nmethod = "lora"\n[train]\nlerning_rate = 1e-3\n')
    assert main(["plan", str(path)]) == 2
    assert "learning_rate" in capsys.readouterr().err


def test_plan_explains_that_the_gan_baselines_are_not_estimated(tmp_path, capsys):
    from loratk.cli import main

    path = tmp_path / "gan.toml"
    path.write_text('name = "g"\nmethod = "dcgan"\n[data]\ndir = "images"\nresolution = 64\n')
    assert main(["plan", str(path)]) == 2
    assert "method = 'dcgan' trains from scratch, without a base model" in capsys.readouterr().err


def test_plan_says_when_nothing_fits(tmp_path, capsys):
    from loratk.cli import main

    path = tmp_path / "tiny.toml"
    path.write_text(
        'name = "tiny"\nmethod = "lora"\n[model]\npath = "builtin:tiny-sdxl"\n'
        '[data]\ndir = "images"\nresolution = 64\n[lora]\nrank = 4\n'
        '[train]\nbatch_size = 2\nmixed_precision = "bf16"\ngradient_checkpointing = true\n'
        '[optim]\nname = "adafactor"\nfused_backward = true\n'
    )
    assert main(["plan", str(path), "--memory", "1MiB"]) == 2  # the weights alone are bigger
    assert "nothing fits: the weights and the optimizer state alone" in capsys.readouterr().err


def test_auto_batch_keeps_the_batch_of_the_run_it_resumes(tmp_path):
    from loratk.components.batch import resolve_batch_size
    from loratk.recipe import dump_recipe

    recipe = _recipe(tmp_path, train={"batch_size": "auto"}, performance={"memory_budget": "1GiB"})
    started = recipe.model_copy(update={"train": recipe.train.model_copy(update={"batch_size": 3})})
    recipe.run_dir.mkdir(parents=True)
    (recipe.run_dir / "recipe.resolved.toml").write_text(dump_recipe(started))
    assert resolve_batch_size(recipe).train.batch_size == 3


def test_auto_batch_needs_a_budget_without_a_gpu(tmp_path, monkeypatch):
    from loratk.components.batch import resolve_batch_size
    from loratk.components.launch import LaunchError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(LaunchError, match="performance.memory_budget"):
        resolve_batch_size(_recipe(tmp_path, train={"batch_size": "auto"}))


def test_auto_batch_fills_the_budget_and_is_recorded(tmp_path, tiny_steps):
    import tomllib

    from loratk.components.batch import resolve_batch_size
    from loratk.run_folder import claim_run_folder

    first, second, third = tiny_steps
    budget = (with_margin(second.peak.total) + with_margin(third.peak.total)) // 2
    recipe = _recipe(tmp_path, train={"batch_size": "auto"}, performance={"memory_budget": str(budget)})
    resolved = resolve_batch_size(recipe)
    assert resolved.train.batch_size == 2
    claim_run_folder(resolved, overwrite=False).release()
    written = tomllib.loads((recipe.run_dir / "recipe.resolved.toml").read_text())
    assert written["train"]["batch_size"] == 2
    assert written["performance"]["memory_budget"] == str(budget)


def test_train_runs_with_the_resolved_batch(tmp_path, monkeypatch):
    import loratk.run
    from loratk.recipe import dump_recipe

    recipe = _recipe(tmp_path, train={"batch_size": "auto"}, performance={"memory_budget": "1GiB"})
    started = recipe.model_copy(update={"train": recipe.train.model_copy(update={"batch_size": 3})})
    recipe.run_dir.mkdir(parents=True)
    (recipe.run_dir / "recipe.resolved.toml").write_text(dump_recipe(started))
    seen = []
    monkeypatch.setattr(loratk.run, "_train", lambda r, **_: seen.append(r.train.batch_size) or r.run_dir)
    loratk.run.train(recipe)
    assert seen == [3]


def test_memory_options_each_come_with_their_peak(tmp_path, tiny_steps):
    from loratk.memory.options import memory_options

    first, second, _ = tiny_steps
    per_image = second.peak.total - first.peak.total
    estimate = MemoryEstimate((first, second), first.peak.total - per_image, per_image, 0.0)
    recipe = _recipe(
        tmp_path,
        train={"batch_size": 1, "mixed_precision": "bf16", "gradient_checkpointing": True},
        optim={"name": "adamw", "fused_backward": True},
    )
    options = {o.override: o for o in memory_options(recipe, estimate, 1)}
    assert set(options) == {"optim.name=adafactor", "optim.name=adamw8bit"}  # the rest are on already
    assert options["optim.name=adafactor"].peak_bytes > 0
    saved = first.peak.total - options["optim.name=adamw8bit"].peak_bytes
    assert saved == pytest.approx(0.75 * first.peak.by_category["optimizer"])  # 2 bytes a weight, not 8


@pytest.mark.parametrize(
    ("path", "family_name", "unet_parameters"),
    [
        ("stabilityai/stable-diffusion-xl-base-1.0", "sdxl", 2_567_463_684),
        ("stable-diffusion-v1-5/stable-diffusion-v1-5", "sd1", 859_520_964),
    ],
)
def test_the_standard_bases_configs_are_known_offline(path, family_name, unet_parameters):
    """`loratk plan` on a recipe of either standard base needs no download: their configs ship with loratk,
    and the meta model built from them has the real parameter counts."""
    from loratk.memory.bases import build_meta_model, load_model_configs
    from loratk.models.family import families

    family = families()[family_name]
    model = build_meta_model(family, load_model_configs(path, family), path)
    assert sum(p.numel() for p in model.unet.parameters()) == unet_parameters
    assert sum(p.numel() for p in model.vae.parameters()) == 83_653_863
    assert all(p.is_meta for p in model.unet.parameters())


def test_the_breakdown_reads_in_mib_below_a_gib():
    from loratk.memory.tracker import CATEGORIES, PeakBreakdown, describe_breakdown

    sizes = dict(zip(CATEGORIES, [3 * 2**30, 5 * MIB, 0, 2**31, 512 * MIB], strict=True))
    lines = describe_breakdown(
        PeakBreakdown(total=sum(sizes.values()), by_category=sizes, phase="", module="")
    )
    assert [line.split()[-2:] for line in lines] == [
        ["3.00", "GiB"],
        ["5.0", "MiB"],
        ["0.0", "MiB"],
        ["2.00", "GiB"],
        ["512.0", "MiB"],
    ]
