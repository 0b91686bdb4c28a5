"""Sampling on the tiny SDXL: seeded images, grids, PNG text, the epoch hook in training, `loratk sample`."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from helpers import copy_examples, make_recipe
from loratk.cli import main as cli_main
from loratk.models.sdxl import load_sdxl
from loratk.prompts import PromptSpec
from loratk.run import TrainingRun
from loratk.sampling.hook import SampleHook
from loratk.sampling.images import build_grid, read_grid_labels, read_png_parameters, save_grid
from loratk.sampling.pipeline import (
    adapters_disabled,
    build_pipeline,
    decode_latents,
    generate_images,
    sampling_mode,
)
from loratk.sampling.specs import ImageSpec, expand_prompts

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "quickstart"
SAMURAI = "Samurai on a hill with his sword drawn, highly detailed, clouds and ocean"
FAST = {"steps": 2, "size": 64}  # tiny sizes and few steps keep these tests fast


def spec(seed: int = 1, **changes) -> ImageSpec:
    values = dict(
        prompt="a red sun", negative_prompt="", width=64, height=64, seed=seed, steps=2, guidance=7.0
    )
    return ImageSpec(**{**values, **changes})


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def tiny_model(tiny_sdxl_dir):
    return load_sdxl(str(tiny_sdxl_dir))


@pytest.fixture(scope="module")
def trained_run(tiny_sdxl_dir, tmp_path_factory):
    """A 2-epoch LoRA (UNet and both text encoders) trained in-process, with samples every epoch."""
    root = tmp_path_factory.mktemp("trained")
    copy_examples(root / "images")
    recipe = make_recipe(
        root,
        tiny_sdxl_dir,
        root / "images",
        lora={"train_text_encoders": True},
        train={"epochs": 2, "learning_rate": 1e-2},
        export={"diffusers": True},
        sample={**FAST, "prompts": [f"{SAMURAI} --n blurry", "a boat --d 3"], "seeds": [1, 2]},
    )
    run = TrainingRun(recipe)
    run.setup()
    try:
        run.train()
    finally:
        run.cleanup()
    return run


# ---------------------------------------------------------------- images


def test_the_same_seed_gives_the_same_image(tiny_model):
    pipe = build_pipeline(tiny_model)
    a, b, c = (image for _, image in generate_images(pipe, [spec(1), spec(1), spec(2)]))
    assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(c))
    assert a.size == (64, 64)


def test_batched_images_match_single_ones(tiny_model):
    pipe = build_pipeline(tiny_model)
    specs = [spec(1), spec(2), spec(3), spec(1, prompt="a boat")]
    batched = [image for _, image in generate_images(pipe, specs, batch_size=2)]
    single = [image for _, image in generate_images(pipe, specs)]
    for a, b in zip(batched, single, strict=True):
        assert np.abs(pixels(a) - pixels(b)).max() <= 2  # float noise of batched kernels only


@pytest.mark.parametrize("scheduler", ["euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras"])
def test_every_scheduler_renders_deterministically(tiny_model, scheduler):
    pipe = build_pipeline(tiny_model, scheduler=scheduler)
    a, b = (image for _, image in generate_images(pipe, [spec(5), spec(5)]))
    assert np.array_equal(pixels(a), pixels(b))


def test_prompt_options_override_the_defaults():
    prompts = [
        PromptSpec("a", seed=9, width=128, steps=3),
        PromptSpec("b", negative_prompt="fog", guidance=2.0),
    ]
    specs = expand_prompts(
        prompts, seeds=[1, 2], width=64, height=48, steps=30, guidance=7.0, negative_prompt="ugly"
    )
    assert [(s.index, s.seed, s.width, s.height, s.steps) for s in specs] == [
        (1, 9, 128, 48, 3),
        (2, 1, 64, 48, 30),
        (2, 2, 64, 48, 30),
    ]
    assert [s.negative_prompt for s in specs] == ["ugly", "fog", "fog"] and specs[1].guidance == 2.0
    assert [s.filename for s in specs] == ["01-seed9.png", "02-seed1.png", "02-seed2.png"]


def test_the_vae_never_decodes_in_fp16(tiny_model):
    pipe = build_pipeline(tiny_model)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = []
    handle = tiny_model.vae.decoder.conv_in.register_forward_hook(
        lambda m, args, out: seen.append(args[0].dtype)
    )
    tiny_model.vae.to(torch.float16)
    try:
        (image,) = decode_latents(tiny_model.vae, latents.half(), pipe.image_processor)
        assert seen == [torch.float32] and image.size == (64, 64)
        assert tiny_model.vae.dtype == torch.float16  # put back as it was
    finally:
        handle.remove()
        tiny_model.vae.to(torch.float32)


def test_sampling_mode_restores_train_flags_and_every_rng(tiny_model):
    unet = tiny_model.unet
    unet.train()
    unet.conv_in.eval()  # mixed flags must come back exactly
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    with sampling_mode([unet, tiny_model.vae]):
        assert not unet.training and not torch.is_grad_enabled()
        torch.randn(10), random.random(), np.random.rand()
    assert unet.training and not unet.conv_in.training
    assert torch.equal(states[0], torch.get_rng_state()) and states[1] == random.getstate()
    assert np.array_equal(states[2], np.random.get_state()[1])
    unet.eval()


def test_adapters_disabled_gives_the_base_model_and_restores_the_adapter(tiny_sdxl_dir):
    from peft import LoraConfig

    model = load_sdxl(str(tiny_sdxl_dir))
    pipe = build_pipeline(model)
    (base,) = (image for _, image in generate_images(pipe, [spec(1)]))
    model.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_v"])
    )
    grads = {n: p.requires_grad for n, p in model.unet.named_parameters()}
    (adapted,) = (image for _, image in generate_images(pipe, [spec(1)]))
    with adapters_disabled([model.unet]):
        (disabled,) = (image for _, image in generate_images(pipe, [spec(1)]))
    (again,) = (image for _, image in generate_images(pipe, [spec(1)]))
    assert np.abs(pixels(base) - pixels(adapted)).max() > 10
    # Bypassed peft layers are exact; diffusers' UNet still rounds a little differently with peft inside (~1e-7).
    assert np.abs(pixels(base) - pixels(disabled)).max() <= 1
    assert np.array_equal(pixels(adapted), pixels(again))
    assert grads == {n: p.requires_grad for n, p in model.unet.named_parameters()}


def test_grid_layout_cells_and_labels(tmp_path):
    colours = [[(255, 0, 0), (0, 255, 0), (0, 0, 255)], [(255, 255, 0), (0, 255, 255), (255, 0, 255)]]
    cells = [[Image.new("RGB", (64, 64), c) for c in row] for row in colours]
    cells[1][2] = None  # an image that failed: a grey cell
    rows, columns = ["base", "epoch 1"], [f"#1 seed {s}: {SAMURAI}" for s in (1, 2, 3)]
    grid = build_grid(cells, rows, columns)
    w, h = grid.cell_size
    assert (w, h) == (64, 64)
    assert grid.image.size == (grid.label_width + 3 * w, grid.header_height + 2 * h)
    assert grid.label_width > 20 and grid.header_height > 10
    for r, row in enumerate(cells):
        for c, im in enumerate(row):
            crop = grid.image.crop(grid.cell_box(r, c))
            if im is not None:
                assert np.array_equal(pixels(crop), pixels(im))
            else:
                assert pixels(crop)[-1, -1].tolist() == [200, 200, 200]
    dark = np.asarray(grid.image.convert("L")) < 128
    for r in range(2):  # every row label and column label has ink
        assert dark[grid.header_height + r * h : grid.header_height + (r + 1) * h, : grid.label_width].any()
    for c in range(3):
        left = grid.label_width + c * w
        assert dark[: grid.header_height, left : left + w].any()
    save_grid(grid, tmp_path / "grid.png")
    assert read_grid_labels(tmp_path / "grid.png") == {"rows": rows, "columns": columns}


def test_grid_scales_large_images_down():
    grid = build_grid([[Image.new("RGB", (1024, 768), "red")]], ["a"], ["b"], max_cell=256)
    assert grid.cell_size == (256, 192)


# ---------------------------------------------------------------- the epoch hook during training


def test_training_writes_samples_grid_and_metadata(trained_run):
    samples = trained_run.run_dir / "samples"
    names = ["01-seed1.png", "01-seed2.png", "02-seed3.png"]  # prompt 2 has its own seed (--d 3)
    for folder in ("base", "epoch001", "epoch002"):
        assert sorted(p.name for p in (samples / folder).glob("*.png")) == names, folder
    params = read_png_parameters(samples / "epoch002" / "01-seed2.png")
    assert params["prompt"] == SAMURAI and params["negative_prompt"] == "blurry"
    assert (params["steps"], params["seed"], params["cfg_scale"], params["Sampler"]) == (2, 2, 7.0, "Euler")
    assert (params["width"], params["height"], params["epoch"]) == (64, 64, 2)
    assert params["loras"] == [("epoch2", 1.0)] and params["Model"] == trained_run.recipe.model.path
    base = read_png_parameters(samples / "base" / "02-seed3.png")
    assert base["prompt"] == "a boat" and base["loras"] == [] and "epoch" not in base

    labels = read_grid_labels(samples / "grid.png")
    assert labels["rows"] == ["base", "epoch 1", "epoch 2"]
    assert labels["columns"] == [f"#1 seed 1: {SAMURAI}", f"#1 seed 2: {SAMURAI}", "#2 seed 3: a boat"]
    with Image.open(samples / "grid.png") as grid:
        assert grid.width > 3 * 64 and grid.height > 3 * 64

    # The adapter changes the image; the base row is the base model.
    base_image = Image.open(samples / "base" / "01-seed1.png")
    assert not np.array_equal(pixels(base_image), pixels(Image.open(samples / "epoch002" / "01-seed1.png")))
    assert trained_run.model.unet.training  # train mode is back after sampling


def test_sampling_does_not_change_training(trained_run, tiny_sdxl_dir, tmp_path):
    """Same recipe without [sample]: bit-identical LoRA weights."""
    copy_examples(tmp_path / "images")
    raw = trained_run.recipe.model_dump()
    recipe = make_recipe(
        tmp_path,
        tiny_sdxl_dir,
        tmp_path / "images",
        lora=raw["lora"],
        train=raw["train"],
    )
    assert not recipe.sample.enabled
    run = TrainingRun(recipe)
    run.setup()
    run.train()
    run.cleanup()
    assert not (run.run_dir / "samples").exists()
    with_samples = trained_run.adapter.state_dicts(trained_run.model)
    without = run.adapter.state_dicts(run.model)
    assert with_samples.keys() == without.keys()
    for part in without:
        assert with_samples[part].keys() == without[part].keys()
        for key, tensor in without[part].items():
            assert torch.equal(with_samples[part][key], tensor), (part, key)


def test_a_failing_sampler_is_logged_and_training_goes_on(
    tmp_path, tiny_sdxl_dir, images_dir, monkeypatch, caplog
):
    import loratk.sampling.hook

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(loratk.sampling.hook, "generate_images", out_of_memory)
    recipe = make_recipe(tmp_path, tiny_sdxl_dir, images_dir, sample={**FAST, "prompts": ["a cat"]})
    run = TrainingRun(recipe)
    run.setup()
    with caplog.at_level(logging.ERROR):
        result = run.train()
    run.cleanup()
    assert result.global_step == 3 and (run.run_dir / "test.safetensors").is_file()
    failures = [r.getMessage() for r in caplog.records if "sampling failed" in r.getMessage()]
    assert len(failures) == 2 and "training continues" in failures[0] and "out of memory" in failures[0]
    assert run.model.unet.training


def test_sample_schedule_every_n_epochs_and_the_last(tiny_model, tmp_path):
    hook = SampleHook(
        model=tiny_model,
        specs=[spec()],
        samples_dir=tmp_path,
        scheduler="euler",
        every_n_epochs=3,
        num_epochs=7,
        at_start=False,
        model_name="m",
    )
    assert [e for e in range(1, 8) if hook.samples_epoch(e)] == [3, 6, 7]
    hook.start()  # at_start = false: nothing
    assert not any(tmp_path.iterdir())


def test_prompt_file_errors_stop_training_before_the_model_loads(tmp_path, tiny_sdxl_dir, images_dir, capsys):
    from loratk.train import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# samples\na cat\na dog --s many\n")
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        f'name = "x"\noutput_dir = "{tmp_path}"\n[model]\npath = "{tmp_path / "no-model"}"\n'
        f'[data]\ndir = "{images_dir}"\nresolution = 64\n[sample]\nprompts_file = "{prompts}"\n'
    )
    assert main([str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"{prompts}:3: --s needs a whole number, got 'many'" in err and "Traceback" not in err


# ---------------------------------------------------------------- `loratk sample`


def run_cli(*args: str) -> int:
    return cli_main(["sample", *args])


def test_cli_end_to_end_epochs_scales_and_base(trained_run, tmp_path, capsys):
    run_dir = trained_run.run_dir
    out = tmp_path / "out"
    code = run_cli(
        "--lora", str(run_dir / "epoch1.safetensors"),
        "--lora", str(run_dir / "epoch2.safetensors"),
        "--prompt", "a red sun --n blurry",
        "--seed", "1", "2",
        "--steps", "2",
        "--scale", "0,1",
        "--compare-base",
        "--out", str(out),
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "10/10" in captured.err and "img" in captured.err  # the progress bar counts images
    labels = read_grid_labels(out / "grid.png")
    assert labels["columns"] == ["base", "epoch1 x0", "epoch1 x1", "epoch2 x0", "epoch2 x1"]
    assert labels["rows"] == ["#1 seed 1: a red sun", "#1 seed 2: a red sun"]
    assert len(list(out.glob("01-seed*.png"))) == 10
    for seed in (1, 2):
        base = pixels(Image.open(out / f"01-seed{seed}-base.png"))
        for epoch in (1, 2):
            assert np.array_equal(base, pixels(Image.open(out / f"01-seed{seed}-epoch{epoch}-x0.png")))
            assert not np.array_equal(base, pixels(Image.open(out / f"01-seed{seed}-epoch{epoch}-x1.png")))
    # The base model and the size came from the LoRA's metadata; the PNG says what was used.
    params = read_png_parameters(out / "01-seed2-epoch2-x1.png")
    assert params["Model"] == str(trained_run.recipe.model.path) and params["Size"] == "64x64"
    assert (
        params["loras"] == [("epoch2", 1.0)]
        and params["epoch"] == 2
        and params["negative_prompt"] == "blurry"
    )
    assert read_png_parameters(out / "01-seed1-base.png")["loras"] == []


def test_cli_without_prompts_renders_the_runs_sample_prompts(trained_run, tmp_path, capsys):
    """`loratk sample --lora epoch2.safetensors`: the [sample] prompts, seeds and steps of its run."""
    run_dir, out = trained_run.run_dir, tmp_path / "out"
    assert run_cli("--lora", str(run_dir / "epoch2.safetensors"), "--out", str(out)) == 0, (
        capsys.readouterr().err
    )
    names = sorted(p.name for p in out.glob("*.png") if p.name != "grid.png")
    assert names == ["01-seed1-epoch2.png", "01-seed2-epoch2.png", "02-seed3-epoch2.png"]
    params = read_png_parameters(out / "01-seed2-epoch2.png")
    assert (params["prompt"], params["negative_prompt"], params["steps"]) == (SAMURAI, "blurry", 2)
    # What the run rendered after epoch 2, from the live model; here from the fp16 file.
    live = pixels(Image.open(run_dir / "samples" / "epoch002" / "01-seed2.png"))
    assert np.abs(pixels(Image.open(out / "01-seed2-epoch2.png")) - live).mean() < 1.0


def test_cli_lora_tags_match_the_lora_option(trained_run, tmp_path):
    run_dir = trained_run.run_dir
    common = ["--seed", "4", "--steps", "2", "--size", "64", "--model", str(trained_run.recipe.model.path)]
    by_tag = ["--prompt", "a boat <lora:epoch1:0.5>", "--lora-dir", str(run_dir)]
    by_option = ["--prompt", "a boat", "--lora", str(run_dir / "epoch1.safetensors"), "--scale", "0.5"]
    assert run_cli(*by_tag, *common, "--out", str(tmp_path / "a")) == 0
    assert run_cli(*by_option, *common, "--out", str(tmp_path / "b")) == 0
    tagged = pixels(Image.open(tmp_path / "a" / "01-seed4-prompted.png"))
    direct = pixels(Image.open(tmp_path / "b" / "01-seed4-epoch1-x0.5.png"))
    assert np.array_equal(tagged, direct)
    assert read_png_parameters(tmp_path / "a" / "01-seed4-prompted.png")["loras"] == [("epoch1", 0.5)]


def test_cli_reads_the_diffusers_layout_export_too(trained_run, tmp_path):
    run_dir, out = trained_run.run_dir, tmp_path / "out"
    model = ["--model", str(trained_run.recipe.model.path)]
    common = ["--prompt", "a cat", "--seed", "3", "--steps", "2", *model]
    args = ["--lora", str(run_dir / "epoch2.safetensors"), "--lora", str(run_dir / "epoch2_diffusers")]
    assert run_cli(*args, *common, "--out", str(out)) == 0
    assert read_grid_labels(out / "grid.png")["columns"] == ["epoch2", "epoch2_diffusers"]
    kohya, peft = (
        pixels(Image.open(out / f"01-seed3-{name}.png")) for name in ("epoch2", "epoch2_diffusers")
    )
    assert np.abs(kohya - peft).max() <= 1


def test_scheduler_names_agree_everywhere():
    import typing

    from loratk.cli import build_parser
    from loratk.recipe import SampleConfig
    from loratk.sampling.pipeline import SCHEDULERS

    recipe_names = typing.get_args(SampleConfig.model_fields["scheduler"].annotation)
    sample_parser = build_parser()._subparsers._group_actions[0].choices["sample"]
    cli_names = next(a.choices for a in sample_parser._actions if a.dest == "scheduler")
    assert list(recipe_names) == list(cli_names) == list(SCHEDULERS)
    assert SampleConfig().scheduler == "euler" and "ddim" not in SCHEDULERS


def test_cli_prompts_file_and_a_diffusers_folder_as_model(tiny_sdxl_dir, tmp_path):
    """A DreamBooth diffusers folder is a --model with no LoRA: one column, named after the folder."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"# study\n{SAMURAI} --d 11\na boat --w 64 --h 32\n")
    out = tmp_path / "out"
    options = ["--steps", "2", "--size", "64x64", "--scheduler", "dpmpp_2m"]
    files = ["--prompts-file", str(prompts), "--out", str(out), "--grid", str(tmp_path / "g.png")]
    code = run_cli("--model", str(tiny_sdxl_dir), *options, *files)
    assert code == 0
    labels = read_grid_labels(tmp_path / "g.png")
    assert labels["columns"] == [tiny_sdxl_dir.name]
    assert labels["rows"] == [f"#1 seed 11: {SAMURAI}", "#2 seed 0: a boat"]
    assert Image.open(out / "02-seed0-base.png").size == (64, 32)
    assert read_png_parameters(out / "01-seed11-base.png")["Sampler"] == "DPM++ 2M"


def test_cli_a_single_file_checkpoint_with_the_builtin_configs_as_model(tiny_sdxl_dir, tmp_path):
    """What a DreamBooth quickstart user tries first: its single-file checkpoint, configs from the builtin."""
    from loratk.files import save_safetensors_atomic
    from loratk.models.sdxl import SDXL

    checkpoint = tmp_path / "quickstart_dreambooth.safetensors"
    save_safetensors_atomic(
        SDXL.single_file_state_dict(load_sdxl("builtin:tiny-sdxl"), dtype=torch.float16), checkpoint
    )
    out, common = tmp_path / "out", ["--prompt", "a red sun", "--steps", "2", "--size", "64", "--seed", "3"]
    assert (
        run_cli("--model", str(checkpoint), "--model-config", "builtin:tiny-sdxl", *common, "--out", str(out))
        == 0
    )
    assert run_cli("--model", "builtin:tiny-sdxl", *common, "--out", str(tmp_path / "ref")) == 0
    from_file = pixels(Image.open(out / "01-seed3-base.png"))
    reference = pixels(Image.open(tmp_path / "ref" / "01-seed3-base.png"))
    assert np.abs(from_file - reference).max() <= 8  # the same model, stored in fp16


def _bad_lora_files(trained_run: TrainingRun, folder: Path) -> dict[str, Path]:
    good = trained_run.run_dir / "epoch1.safetensors"
    data = good.read_bytes()
    files = {
        "truncated": folder / "truncated.safetensors",
        "not safetensors": folder / "model.ckpt",
        "garbage": folder / "garbage.safetensors",
        "no lora keys": folder / "full.safetensors",
        "renamed keys": folder / "renamed.safetensors",
        "wrong shapes": folder / "shapes.safetensors",
        "nan weights": folder / "nan.safetensors",
    }
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["not safetensors"].write_bytes(b"\x80\x04pickle")
    files["garbage"].write_text("not a tensor file at all")
    save_file({"model.diffusion_model.conv_in.weight": torch.zeros(4, 4)}, str(files["no lora keys"]))
    tensors = load_file(str(good))
    renamed = {k.replace("input_blocks_4_1", "input_blocks_44_1"): v for k, v in tensors.items()}
    save_file(
        renamed, str(files["renamed keys"]), metadata={"loratk.base_model": trained_run.recipe.model.path}
    )
    wrong = {
        k: torch.zeros(v.shape[0], 7) if k.endswith("lora_down.weight") and v.ndim == 2 else v
        for k, v in tensors.items()
    }
    save_file(
        wrong, str(files["wrong shapes"]), metadata={"loratk.base_model": trained_run.recipe.model.path}
    )
    broken = dict(tensors)
    key = sorted(k for k in broken if k.endswith("lora_up.weight"))[3]
    broken[key] = broken[key].clone()
    broken[key][0, 0] = float("nan")
    save_file(
        broken, str(files["nan weights"]), metadata={"loratk.base_model": trained_run.recipe.model.path}
    )
    return files


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", r"missing\.safetensors: LoRA file not found"),
        ("not safetensors", r"model\.ckpt: not a \.safetensors file; only safetensors LoRAs are loaded"),
        ("truncated", r"truncated\.safetensors: cannot read it as safetensors \(.*incomplete metadata"),
        ("garbage", r"garbage\.safetensors: cannot read it as safetensors"),
        ("no lora keys", r"full\.safetensors: holds no LoRA weights"),
        (
            "renamed keys",
            r"renamed.safetensors: does not fit the base model .*: only \d+ of \d+ LoRA modules matched",
        ),
        (
            "wrong shapes",
            r"shapes.safetensors: does not fit the base model .*: 0 of \d+ LoRA modules .*size mismatch",
        ),
        ("nan weights", r"nan\.safetensors: tensor lora_\w+\.lora_up\.weight holds NaN/inf values"),
    ],
)
def test_cli_bad_lora_files_exit_2_naming_the_file(trained_run, tmp_path, capsys, case, message):
    import re

    files = _bad_lora_files(trained_run, tmp_path)
    path = files.get(case, tmp_path / "missing.safetensors")
    code = run_cli("--lora", str(path), "--prompt", "a cat", "--steps", "2", "--out", str(tmp_path / "out"))
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and str(tmp_path) in err and "Traceback" not in err
    assert re.search(message, err), err
    if case == "renamed keys":
        matched, expected = map(int, re.search(r"only (\d+) of (\d+)", err).groups())
        assert 0 < matched < expected


def test_cli_other_bad_input_exits_2(trained_run, tmp_path, capsys):
    epoch1 = str(trained_run.run_dir / "epoch1.safetensors")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n\na dog --x 1\n")
    no_meta = tmp_path / "bare.safetensors"
    save_file(load_file(epoch1), str(no_meta))
    kohya = tmp_path / "kohya.safetensors"  # kohya names a checkpoint file that is not here
    save_file(load_file(epoch1), str(kohya), metadata={"ss_sd_model_name": "sd_xl_base_1.0.safetensors"})
    cases = [
        (
            ["--lora", epoch1, "--prompt", "a cat <lora:epoch9:0.8>"],
            # names the missing file and lists what is there
            "epoch9.safetensors: unknown LoRA <lora:epoch9> in prompt 1 ('a cat'); LoRAs in ",
        ),
        (["--lora", epoch1, "--prompts-file", str(prompts)], f"{prompts}:3: unknown option --x"),
        (["--lora", str(no_meta), "--prompt", "a cat"], "bare.safetensors has no loratk.base_model"),
        (["--lora", str(kohya), "--prompt", "a cat"], "kohya.safetensors: its metadata names the base model"),
        (
            ["--lora", epoch1, "--prompt", "a cat", "--model", str(tmp_path / "nowhere")],
            "nowhere': no such folder, and not a hub id",  # the family is read first
        ),
        (["--lora", str(no_meta)], "no prompts; give --prompt or --prompts-file ("),  # no run recorded
    ]
    for args, message in cases:
        assert run_cli(*args, "--out", str(tmp_path / "out")) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        if "epoch9" in message:
            assert "epoch1, epoch2, test." in err


def test_a_stop_request_ends_sampling_between_images(tmp_path, tiny_sdxl_dir):
    from accelerate import PartialState

    from loratk.models.sdxl import load_sdxl
    from loratk.prompts import parse_prompt_line
    from loratk.sampling.hook import SampleHook
    from loratk.sampling.specs import expand_prompts

    PartialState()  # the hook logs through accelerate, as inside a training run
    model = load_sdxl(str(tiny_sdxl_dir))
    specs = expand_prompts(
        [parse_prompt_line("a red sun")], seeds=[1, 2, 3], width=64, height=64, steps=2, guidance=7.0
    )
    asked = []
    hook = SampleHook(
        model=model,
        specs=specs,
        samples_dir=tmp_path,
        scheduler="euler",
        every_n_epochs=1,
        num_epochs=1,
        at_start=False,
        model_name="tiny",
        should_stop=lambda: asked.append(1) or len(asked) > 1,
    )
    hook(1, 1)
    assert len(list((tmp_path / "epoch001").glob("*.png"))) == 1


def test_offloaded_parts_come_to_the_unet_device_for_sampling_and_go_back():
    import torch

    from loratk.sampling.pipeline import parts_on_device

    class Part:
        def __init__(self, device: str):
            self.device, self.moves = torch.device(device), []

        def to(self, device):
            self.moves.append(str(device))
            self.device = torch.device(device)
            return self

    from loratk.models.family import DiffusionModel
    from loratk.models.sdxl import SDXL

    encoders = {"text_encoder": Part("cpu"), "text_encoder_2": Part("meta")}
    model = DiffusionModel(SDXL, None, Part("cpu"), encoders, {}, None, "fake")
    with parts_on_device(model, torch.device("meta")):
        assert {str(p.device) for p in (model.vae, model.text_encoder, model.text_encoder_2)} == {"meta"}
    assert (model.vae.moves, model.text_encoder_2.moves) == (["meta", "cpu"], [])
    assert str(model.vae.device) == "cpu"
