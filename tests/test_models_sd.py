"""SD 1.x and SD 2.x through the family seam: detection, conditioning and loss by hand, training with each
method, and exports that reload in diffusers with the trained model's outputs."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from helpers import REPO, copy_examples
from loratk.models.tiny_sd import TINY_SD2_ID, TINY_SD2_V_ID, TINY_SD15_ID, save_tiny_sd
from loratk.recipe import RecipeError, validate_recipe
from loratk.run import TrainingRun


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """A saved diffusers folder of each tiny SD model, by builtin id."""
    root = tmp_path_factory.mktemp("tiny-sd")
    return {
        tiny: save_tiny_sd(root / tiny.split(":")[1], tiny)
        for tiny in (TINY_SD15_ID, TINY_SD2_ID, TINY_SD2_V_ID)
    }


@pytest.fixture(scope="module")
def few_images(tmp_path_factory):
    """Two of the quickstart images with their captions: enough for a step or two per method."""
    folder = copy_examples(tmp_path_factory.mktemp("sd-images") / "images")
    for extra in sorted(folder.iterdir())[4:]:
        extra.unlink()
    return folder


def _load(path):
    from loratk.models.family import family_for_model, load_model

    return load_model(family_for_model(str(path)), str(path))


# ---------------------------------------------------------------- detection


@pytest.mark.parametrize(
    "tiny, family, side, prediction",
    [
        (TINY_SD15_ID, "sd1", 64, "epsilon"),
        (TINY_SD2_ID, "sd2", 64, "epsilon"),
        (TINY_SD2_V_ID, "sd2", 96, "v_prediction"),
    ],
)
def test_family_is_read_from_folders_and_single_files(tmp_path, tiny_dirs, tiny, family, side, prediction):
    from loratk.models.detection import detect_model, resolve_family
    from loratk.models.family import ModelLoadError

    info = detect_model(str(tiny_dirs[tiny]))
    assert (info.family, info.native_size, info.prediction_type) == (family, side, prediction)

    model = _load(tiny_dirs[tiny])
    single = tmp_path / "model.safetensors"
    save_file(
        model.family.single_file_state_dict(model, torch.float16),
        str(single),
        model.family.checkpoint_metadata(model),
    )
    info = detect_model(str(single))
    # modelspec.architecture carries the variant; the tiny models are smaller than their family's side.
    expected_side = {"sd1": 512, "sd2": 768 if prediction == "v_prediction" else 512}[family]
    assert (info.family, info.native_size, info.prediction_type) == (family, expected_side, prediction)
    assert detect_model(str(single), single_file_config=str(tiny_dirs[tiny])).native_size == side

    other = "sdxl" if family == "sd1" else "sd1"
    for path in (str(tiny_dirs[tiny]), str(single)):
        with pytest.raises(
            ModelLoadError, match=rf"model.family = '{other}', but .* is an SD {family[-1]}\.x"
        ):
            resolve_family(path, other)
        assert resolve_family(path, family)[0].name == family


def test_sdxl_and_known_hub_ids_are_told_apart_offline(tiny_sdxl_dir):
    from loratk.models.detection import detect_model

    assert detect_model(str(tiny_sdxl_dir)).family == "sdxl"
    assert detect_model("stable-diffusion-v1-5/stable-diffusion-v1-5").family == "sd1"
    info = detect_model("stabilityai/stable-diffusion-2-1")
    assert (info.family, info.native_size, info.prediction_type) == ("sd2", 768, "v_prediction")


def test_recipe_resolution_defaults_to_the_models_side_and_a_wrong_family_stops_the_run(
    tmp_path, tiny_dirs, few_images
):
    from loratk.models.family import ModelLoadError

    raw = {"name": "x", "output_dir": str(tmp_path), "data": {"dir": "imgs"}}
    for tiny, side in ((TINY_SD15_ID, 64), (TINY_SD2_V_ID, 96)):
        recipe = validate_recipe({**raw, "model": {"path": str(tiny_dirs[tiny])}})
        assert recipe.data.size == (side, side) and recipe.sample_size == (side, side)
    assert validate_recipe(raw).data.size == (1024, 1024)  # SDXL base, known offline
    wrong = {**raw, "model": {"path": str(tiny_dirs[TINY_SD15_ID]), "family": "sd2"}}
    with pytest.raises(RecipeError, match=r"model.family = 'sd2', but .* is an SD 1.x model"):
        validate_recipe(wrong)
    recipe = validate_recipe({**wrong, "data": {"dir": str(few_images), "resolution": 64}})
    with pytest.raises(ModelLoadError, match="model.family = 'sd2'"):
        TrainingRun(recipe).setup()


# ---------------------------------------------------------------- conditioning and the loss, by hand


@pytest.mark.parametrize("tiny", [TINY_SD15_ID, TINY_SD2_V_ID])
def test_one_step_loss_matches_a_hand_computation(tiny_dirs, tiny):
    from diffusers import StableDiffusionPipeline

    from loratk.objectives.denoising import Denoiser

    model = _load(tiny_dirs[tiny])
    denoiser = Denoiser(model, device=torch.device("cpu"), weight_dtype=torch.float32)
    assert denoiser.prediction_type == ("v_prediction" if tiny == TINY_SD2_V_ID else "epsilon")
    prompts = ["a red sun over blue waves", "a small boat"]
    gen = torch.Generator().manual_seed(0)
    side = 12 if tiny == TINY_SD2_V_ID else 8
    latents = torch.randn(2, 4, side, side, generator=gen)
    noise = torch.randn(2, 4, side, side, generator=gen)
    timesteps = torch.tensor([50, 800])
    with torch.no_grad():
        inputs = denoiser.encode_batch({"latents": latents, "captions": prompts})
        loss = denoiser.per_sample_loss(inputs, noise=noise, timesteps=timesteps)

        # By hand, from the pipeline's components: its own prompt encoding, then the DDPM forward process.
        pipe = StableDiffusionPipeline.from_pretrained(tiny_dirs[tiny], safety_checker=None)
        embeds, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
        assert set(inputs["conditioning"]) == {"prompt_embeds"}  # no pooled embedding, no time ids
        torch.testing.assert_close(inputs["conditioning"]["prompt_embeds"], embeds)
        acp = pipe.scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = acp.sqrt() * latents + (1 - acp).sqrt() * noise
        pred = pipe.unet(noisy, timesteps, embeds).sample
        target = noise if tiny == TINY_SD15_ID else acp.sqrt() * noise - (1 - acp).sqrt() * latents
        expected = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    # Samples and class images come from a scheduler that predicts what the model was trained to predict.
    from loratk.sampling.pipeline import build_pipeline

    sampler = build_pipeline(model)
    assert type(sampler).__name__ == "StableDiffusionPipeline"
    assert sampler.scheduler.config.prediction_type == denoiser.prediction_type


def test_sd2_conditions_on_the_layers_diffusers_keeps(tiny_dirs):
    """SD 2.x's text encoder as diffusers ships it holds OpenCLIP-H without its last layer, so its output
    (after the final layer norm) is the penultimate layer the original model reads."""
    model = _load(tiny_dirs[TINY_SD2_ID])
    ids = model.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        got = model.family.encode_prompts(model, ["a cat"], "cpu")["prompt_embeds"]
        out = model.text_encoder(ids, output_hidden_states=True)
        by_hand = model.text_encoder.final_layer_norm(out.hidden_states[-1])
    assert got.shape == (1, 77, 48)
    torch.testing.assert_close(got, by_hand)


# ---------------------------------------------------------------- training and exports


def _recipe(tmp_path, model_dir, images, method, **sections):
    raw = {
        "name": "sd",
        "method": method,
        "output_dir": str(tmp_path / "runs"),
        "seed": 0,
        "model": {"path": str(model_dir)},
        "lora": {"rank": 4, "alpha": 4},
        "train": {"epochs": 1, "batch_size": 2, "learning_rate": 1e-2, "mixed_precision": "no"},
        "optim": {"name": "adamw"},
        "export": {"dtype": "fp32"},
    }
    if method == "lora":
        raw["data"] = {"dir": str(images)}
    else:
        raw["dreambooth"] = {
            "instance_dir": str(images),
            "instance_prompt": "a picture of sks",
            "class_prompt": "a picture of a landscape",
            "class_dir": str(tmp_path / "class"),
            "num_class_images": 2,
            "class_steps": 2,
            "class_batch_size": 2,
        }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return validate_recipe(raw, source="test")


def _inputs(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    side = model.unet.config.sample_size
    width = model.unet.config.cross_attention_dim
    return (
        torch.randn(1, 4, side, side, generator=gen),
        torch.tensor([400]),
        torch.randn(1, 77, width, generator=gen),
    )


def _unet_out(unet, inputs):
    with torch.no_grad():
        return unet(*inputs).sample


def _te_out(encoder, tokenizer):
    ids = tokenizer(["a red sun"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return encoder(ids)[0]


@pytest.mark.parametrize(
    "tiny, method, version, architecture",
    [
        (TINY_SD15_ID, "lora", "sd_v1", "stable-diffusion-v1/lora"),
        (TINY_SD2_V_ID, "dreambooth-lora", "sd_v2_v", "stable-diffusion-v2-768-v/lora"),
    ],
)
def test_lora_trains_and_its_kohya_file_reloads_in_diffusers(
    tmp_path, tiny_dirs, few_images, tiny, method, version, architecture
):
    from diffusers import StableDiffusionPipeline

    recipe = _recipe(
        tmp_path,
        tiny_dirs[tiny],
        few_images,
        method,
        lora={"train_text_encoders": True},
        export={"diffusers": True},
    )
    run = TrainingRun(recipe)
    run.setup()
    run.train()
    path = run.run_dir / "sd.safetensors"
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    prefixes = {k.split("_")[1] for k in keys}
    assert prefixes == {"unet", "te"}
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
    assert meta["ss_base_model_version"] == version
    assert meta["modelspec.architecture"] == architecture
    assert meta["ss_v2"] == str(tiny != TINY_SD15_ID)
    assert meta["modelspec.resolution"] == "{0}x{0}".format(recipe.data.size[0])

    inputs = _inputs(run.model)
    trained_unet = _unet_out(run.model.unet, inputs)
    trained_te = _te_out(run.model.text_encoder, run.model.tokenizer)
    for layout in (str(path), str(run.run_dir / "sd_diffusers")):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_dirs[tiny], safety_checker=None)
        base = _unet_out(pipe.unet, inputs)
        pipe.load_lora_weights(layout)
        loaded = _unet_out(pipe.unet, inputs)
        torch.testing.assert_close(loaded, trained_unet, rtol=1e-3, atol=1e-5)
        assert (loaded - base).abs().max() > 1e-4
        torch.testing.assert_close(
            _te_out(pipe.text_encoder, pipe.tokenizer), trained_te, rtol=1e-3, atol=1e-5
        )

    # `loratk sample` finds the base model in the file's metadata and renders through the family's pipeline.
    from PIL import Image

    from loratk.prompts import PromptSpec, parse_parameters
    from loratk.sampling.command import run_sample

    result = run_sample(
        prompts=[PromptSpec("a red sun")],
        loras=[path],
        seeds=[1],
        steps=2,
        out_dir=tmp_path / "s",
        progress=False,
    )
    assert result.model == str(tiny_dirs[tiny]) and len(result.images) == 1
    with Image.open(result.images[0]) as image:
        assert image.size == recipe.data.size
        assert parse_parameters(image.info["parameters"])["Model"] == str(tiny_dirs[tiny])


@pytest.mark.parametrize("tiny", [TINY_SD15_ID, TINY_SD2_ID])
def test_full_dreambooth_exports_a_single_file_that_reloads_in_diffusers(
    tmp_path, tiny_dirs, few_images, tiny
):
    from diffusers import StableDiffusionPipeline

    recipe = _recipe(
        tmp_path,
        tiny_dirs[tiny],
        few_images,
        "dreambooth",
        full={"train_text_encoders": True},
        export={"extract_lora_rank": 4},
    )
    run = TrainingRun(recipe)
    run.setup()
    assert len(list((tmp_path / "class").glob("*.png"))) == 2  # class images from the SD pipeline
    run.train()
    path = run.run_dir / "sd.safetensors"
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    text_prefix = (
        "cond_stage_model.transformer.text_model." if tiny == TINY_SD15_ID else "cond_stage_model.model."
    )
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", text_prefix)) for k in keys)
    # SD 1.x/2.x: the first up block has no attention, so the upsamplers sit at slot 1 there, 2 elsewhere.
    assert {
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "model.diffusion_model.output_blocks.5.2.conv.weight",
    } <= keys
    assert "model.diffusion_model.input_blocks.1.1.proj_in.weight" in keys
    assert meta["modelspec.architecture"] == (
        "stable-diffusion-v1" if tiny == TINY_SD15_ID else "stable-diffusion-v2-512"
    )
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"

    pipe = StableDiffusionPipeline.from_single_file(
        str(path), config=str(tiny_dirs[tiny]), safety_checker=None
    )
    inputs = _inputs(run.model)
    torch.testing.assert_close(
        _unet_out(pipe.unet, inputs), _unet_out(run.model.unet, inputs), rtol=1e-3, atol=1e-5
    )
    torch.testing.assert_close(
        _te_out(pipe.text_encoder, pipe.tokenizer), _te_out(run.model.text_encoder, run.model.tokenizer)
    )
    live = run.model.vae.state_dict()
    assert all(torch.equal(pipe.vae.state_dict()[k], v) for k, v in live.items())

    with safe_open(str(run.run_dir / "sd.lora.safetensors"), "pt") as f:
        lora_keys, lora_meta = list(f.keys()), f.metadata()
    assert lora_keys and all(k.startswith(("lora_unet_", "lora_te_")) for k in lora_keys)
    assert lora_meta["modelspec.architecture"].endswith("/lora")
    base = StableDiffusionPipeline.from_pretrained(tiny_dirs[tiny], safety_checker=None)
    before = _unet_out(base.unet, inputs)
    base.load_lora_weights(str(run.run_dir / "sd.lora.safetensors"))
    assert (_unet_out(base.unet, inputs) - before).abs().max() > 1e-5


# ---------------------------------------------------------------- full-size key names, on the meta device


def test_kohya_and_single_file_keys_cover_a_full_size_sd15():
    """Every LoRA target of a full-size SD 1.5 UNet and CLIP-L gets a kohya key that diffusers' kohya reader
    maps back to that module (none left over), and the single-file keys convert back to every weight."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    from loratk.adapters.lora_layers import resolve_unet_targets
    from loratk.export.extract import target_weights
    from loratk.export.formats import diffusers_to_sgm_unet_name, peft_to_kohya
    from loratk.models.base_configs import SD15_CLIP_L_CONFIG, SD15_UNET_CONFIG, SD15_UNET_PARAMETERS
    from loratk.models.sd import SD1, up_blocks_with_attention

    with init_empty_weights():
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_CLIP_L_CONFIG))
    assert sum(p.numel() for p in unet.parameters()) == SD15_UNET_PARAMETERS
    targets = {
        "unet": target_weights(unet, resolve_unet_targets("all-linear")),
        "text_encoder": target_weights(
            text_encoder, SD1.text_encoder_lora_targets("text_encoder", text_encoder)
        ),
    }
    assert len(targets["unet"]) == 16 * 10 + 32 and len(targets["text_encoder"]) == 12 * 4
    rank = 2
    peft = {
        part: {
            key: torch.zeros(shape)
            for name, weight in weights.items()
            for key, shape in (
                (f"{name}.lora_A.weight", (rank, weight.shape[1])),
                (f"{name}.lora_B.weight", (weight.shape[0], rank)),
            )
        }
        for part, weights in targets.items()
    }
    kohya = peft_to_kohya(peft, rank, family=SD1, unet_config=unet.config, dtype=torch.float32)
    assert len(kohya) == 3 * sum(len(w) for w in targets.values())
    converted, _ = _convert_non_diffusers_lora_to_diffusers(dict(kohya))

    def module_of(part: str, key: str) -> str:  # diffusers' reader gives attention LoRA its legacy names
        m = re.fullmatch(
            r"(.+?)(?:(?:\.processor)?\.(to_[qkv]|to_out)_lora|\.lora(?:_linear_layer)?)\.(?:down|up)\.weight",
            key,
        )
        assert m, key
        if m[2] is None:
            return m[1]
        legacy = {
            "unet": {"to_out": "to_out.0"},
            "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"},
        }
        return f"{m[1]}.{legacy[part].get(m[2], m[2])}"

    back = {
        part: {module_of(part, k.removeprefix(f"{part}.")) for k in converted if k.startswith(f"{part}.")}
        for part in ("unet", "text_encoder")
    }
    assert back["unet"] == set(targets["unet"])
    assert back["text_encoder"] == {f"text_model.{name}" for name in targets["text_encoder"]}

    meta_sd = {
        "unet": {k: torch.empty(v.shape, device="meta") for k, v in unet.state_dict().items()},
        "te": {k: torch.empty(v.shape, device="meta") for k, v in text_encoder.state_dict().items()},
    }
    ldm = SD1.convert_parts(meta_sd["unet"], {}, meta_sd["te"], unet_config=unet.config, num_vae_up_blocks=4)
    unet_back = convert_ldm_unet_checkpoint(ldm, unet.config)
    assert set(unet_back) == set(meta_sd["unet"])
    # A1111 resolves a kohya SD 1.x name (`lora_unet_down_blocks_0_attentions_0_...`) to the original module
    # (`input_blocks.1.1....`) it patches: each LoRA target has one in the checkpoint layout.
    originals = {k.removesuffix(".weight") for k in ldm if k.startswith("model.diffusion_model.")}
    as_original = {
        "model.diffusion_model." + diffusers_to_sgm_unet_name(name, 2, up_blocks_with_attention(unet.config))
        for name in targets["unet"]
    }
    assert len(as_original) == len(targets["unet"]) and as_original <= originals
    te_back = convert_ldm_clip_checkpoint(ldm)
    assert {k.removeprefix("text_model.") for k in te_back} == {
        k for k in meta_sd["te"] if "position_ids" not in k
    }


def test_check_a_recipe_on_an_sd_model_uses_the_models_side(tmp_path, tiny_dirs, capsys, monkeypatch):
    """`loratk check` on a recipe without data.resolution checks for the model's own side (no weights load)."""
    from loratk.cli import main as cli_main

    recipe = tmp_path / "r.toml"
    recipe.write_text(
        f'name = "r"\noutput_dir = "{tmp_path}"\n[model]\npath = "{tiny_dirs[TINY_SD2_V_ID]}"\n'
        f'[data]\ndir = "examples/quickstart"\nmanifest = "captions/quickstart.jsonl"\nbucket_step = 16\n'
    )
    monkeypatch.chdir(REPO)
    assert cli_main(["check", str(recipe), "--no-duplicates"]) == 0
    assert "area 96x96" in capsys.readouterr().out


def test_sd_run_resumed_after_an_epoch_ends_as_the_uninterrupted_one(tmp_path, tiny_dirs, few_images):
    from safetensors.torch import load_file

    def train(name: str, epochs: int) -> TrainingRun:
        recipe = _recipe(tmp_path, tiny_dirs[TINY_SD15_ID], few_images, "lora", train={"epochs": epochs})
        run = TrainingRun(recipe.model_copy(update={"name": name}))
        run.setup()
        starts.append(run.state.global_step)
        run.train()
        run.cleanup()
        return run

    starts: list[int] = []
    whole = train("whole", 2)
    train("resumed", 1)
    resumed = train("resumed", 2)  # the same run folder: resumes from the state after epoch 1
    assert starts == [0, 0, 1]
    got, want = (load_file(str(r.run_dir / "epoch2.safetensors")) for r in (resumed, whole))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_a_single_file_without_config_keeps_the_prediction_its_metadata_states(
    tmp_path, tiny_dirs, monkeypatch
):
    """diffusers takes any SD 2.x file for the 768-v model when no config is given; an SD 2.x 512 file that
    says so in `modelspec.architecture` trains and samples with epsilon."""
    from diffusers import StableDiffusionPipeline

    from loratk.models.family import load_model
    from loratk.models.sd import SD2

    model = _load(tiny_dirs[TINY_SD2_ID])
    single = tmp_path / "sd2-512.safetensors"
    save_file(
        model.family.single_file_state_dict(model, torch.float32), str(single), SD2.checkpoint_metadata(model)
    )
    as_768_v = StableDiffusionPipeline.from_pretrained(tiny_dirs[TINY_SD2_V_ID], safety_checker=None)
    seen = {}

    def from_single_file(cls, path, **kwargs):  # what diffusers gives for an SD 2.x file, offline-free
        seen.update(kwargs)
        return as_768_v

    monkeypatch.setattr(StableDiffusionPipeline, "from_single_file", classmethod(from_single_file))
    assert load_model(SD2, str(single)).noise_scheduler.config.prediction_type == "epsilon"
    assert "config" not in seen
    given = load_model(SD2, str(single), single_file_config=str(tiny_dirs[TINY_SD2_V_ID]))
    assert given.noise_scheduler.config.prediction_type == "v_prediction"  # an explicit config wins
