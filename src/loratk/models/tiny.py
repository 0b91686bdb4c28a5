"""Deterministic tiny random SDXL, SD 1.5, SD 2.x (`tiny_sd`) and BLIP (with their tokenizers), built offline
from configs.

Tests and the quickstart use them through the same `from_pretrained` path as a hub id: a model is saved
once with `save_pretrained` into a cache folder and loaded back from there.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from loratk.files import default_cache_dir

TINY_SDXL_ID = "builtin:tiny-sdxl"
TINY_BLIP_ID = "builtin:tiny-blip"
_TINY_VERSION = "2"  # bump when the tiny configs change, so stale cache folders are rebuilt

# The UNet keeps SDXL's block structure (3 levels, 2 layers per block, cross-attention in the two lower
# levels) so that SGM key names and diffusers' converters behave exactly as on the real model.
TINY_UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(16, 32, 32),
    layers_per_block=2,
    transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(2, 4, 4),
    norm_num_groups=8,
    cross_attention_dim=80,  # = te1 hidden (32) + te2 hidden (48), as 768 + 1280 = 2048 in SDXL
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 48,  # 6 time ids x 8 + pooled te2 (48)
)
# The two encoders differ in width, as CLIP-L (768) and OpenCLIP-G (1280) do: single-file loaders tell them
# apart by that width, and equal widths made diffusers load CLIP-L's weights into the second encoder.
TINY_TE1_WIDTH, TINY_TE2_WIDTH = 32, 48

# SDXL base's own scheduler settings.
TINY_SCHEDULER_CONFIG = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    steps_offset=1,
    timestep_spacing="leading",
    prediction_type="epsilon",
)

TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 16, 16),  # 4 levels: same 8x downscale as the SDXL VAE
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=128,
    scaling_factor=0.13025,
)


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (GPT-2 / CLIP)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_tiny_tokenizer():
    """A CLIP tokenizer over single bytes: every text tokenizes, no download needed."""
    from transformers import CLIPTokenizer

    chars = sorted(set(_bytes_to_unicode().values()))
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _text_config(tokenizer, width: int, hidden_act: str = "quick_gelu"):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=width,
        hidden_act=hidden_act,  # CLIP-L's quick_gelu; OpenCLIP-H (SD 2.x) uses gelu
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_sdxl_configs() -> dict[str, dict]:
    """The config of every part of the tiny SDXL (and its scheduler), as its folder would hold them."""
    tokenizer = build_tiny_tokenizer()
    return {
        "unet": dict(TINY_UNET_CONFIG),
        "vae": dict(TINY_VAE_CONFIG),
        "text_encoder": _text_config(tokenizer, TINY_TE1_WIDTH).to_dict(),
        "text_encoder_2": _text_config(tokenizer, TINY_TE2_WIDTH).to_dict(),
        "scheduler": dict(TINY_SCHEDULER_CONFIG),
    }


def build_tiny_sdxl_pipeline(seed: int = 0):
    """Build a tiny random `StableDiffusionXLPipeline`, identical for a given seed."""
    with torch.random.fork_rng(devices=[]):  # building leaves the caller's RNG as it was
        return _build_tiny_sdxl_pipeline(seed)


def _build_tiny_sdxl_pipeline(seed: int):
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = build_tiny_tokenizer()
    tokenizer_2 = build_tiny_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_text_config(tokenizer, TINY_TE1_WIDTH))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, TINY_TE2_WIDTH))
    scheduler = EulerDiscreteScheduler(**TINY_SCHEDULER_CONFIG)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
    )


def save_tiny_sdxl(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny SDXL diffusers folder (model_index.json + subfolders) and return its path."""
    folder = Path(folder)
    build_tiny_sdxl_pipeline(seed).save_pretrained(folder, safe_serialization=True)
    return folder


def materialise_folder(
    name: str, marker: str, save: Callable[[Path], object], cache_dir: str | os.PathLike | None
) -> Path:
    """Return `<cache>/<name>`, building it once with `save(folder)` (atomically) if it is not there yet.

    `marker` is a file that `save` writes; its presence means the folder is there (it appears whole, by one
    rename). The builtin models here and in `evaluation.tiny` are all cached this way; `name` carries a
    version tag, so a changed builder gets a fresh folder.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / name
    if (target / marker).is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir))
    try:
        save(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished first; its folder is as good as ours.
            if not (target / marker).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def materialise_builtin(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder of a `builtin:` model, built once; ValueError naming the known ones otherwise."""
    from loratk.models.tiny_sd import TINY_SD_MODELS, materialise_tiny_sd

    builders = {TINY_SDXL_ID: materialise_tiny_sdxl, TINY_BLIP_ID: materialise_tiny_blip}
    for tiny_id in TINY_SD_MODELS:
        builders[tiny_id] = lambda cache, tiny_id=tiny_id: materialise_tiny_sd(tiny_id, cache)
    if name not in builders:
        raise ValueError(f"unknown built-in model {name!r}; built-in models: {', '.join(builders)}")
    return builders[name](cache_dir)


def materialise_tiny_sdxl(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the folder of the tiny SDXL, building it once (atomically) if it is not there yet."""
    return materialise_folder(f"tiny-sdxl-v{_TINY_VERSION}", "model_index.json", save_tiny_sdxl, cache_dir)


# --- BLIP -------------------------------------------------------------------------------------------------

# Real caption words, so that tiny captions read like (nonsense) captions and exercise word-piece decoding.
_TINY_BLIP_WORDS = (
    "a an the of on in with and at by , . photo painting drawing picture man woman dog cat boat sun moon "
    "hill tree pine mountain river sea sky night red green blue white black small large old young standing "
    "sitting"
)

# Same layout as BLIP-large (ViT + BERT-style decoder), about 70k parameters. The wider init (BLIP's
# vision default is 1e-10) makes captions depend on the image, so tests can tell images apart.
TINY_BLIP_TEXT_CONFIG = dict(
    hidden_size=32,
    intermediate_size=64,
    projection_dim=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=512,  # as BLIP: room for any --max-length a user gives
    initializer_range=0.2,
)
TINY_BLIP_VISION_CONFIG = dict(
    hidden_size=32,
    intermediate_size=64,
    projection_dim=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    initializer_range=0.2,
)
_TINY_BLIP_SEP_BIAS = 3.0  # raises the end-of-caption logit: random captions end after a few words


def build_blip_tokenizer(vocab_size: int | None = None):
    """A BERT word-piece tokenizer with BLIP's special tokens, from an in-memory vocabulary.

    Ids follow BLIP's layout: `[PAD]` = 0, ..., then words, then `[DEC]` (decoder start) and `[ENC]` last.
    `vocab_size` pads the word list with `w<N>` entries to a full-size vocabulary (for benchmarks).
    """
    from transformers import BertTokenizer

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_TINY_BLIP_WORDS.split()]
    if vocab_size is not None:
        tokens += [f"w{i}" for i in range(vocab_size - 2 - len(tokens))]
    tokens += ["[DEC]", "[ENC]"]
    vocab = {token: i for i, token in enumerate(tokens)}
    return BertTokenizer(vocab=vocab, bos_token="[DEC]", extra_special_tokens=["[ENC]"], model_max_length=512)


def build_blip(
    text_config: dict,
    vision_config: dict,
    *,
    vocab_size: int | None = None,
    seed: int = 0,
    sep_bias: float = 0.0,
):
    """A random `BlipForConditionalGeneration` and its `BlipProcessor`, identical for a given seed."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    tokenizer = build_blip_tokenizer(vocab_size)
    config = BlipConfig(
        text_config=dict(
            text_config,
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.sep_token_id,
            sep_token_id=tokenizer.sep_token_id,  # generation stops here
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=vision_config,
        projection_dim=text_config["projection_dim"],
        image_text_hidden_size=text_config["hidden_size"],
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    if sep_bias:
        with torch.no_grad():
            model.text_decoder.cls.predictions.bias[tokenizer.sep_token_id] += sep_bias
    size = vision_config["image_size"]
    image_processor = BlipImageProcessorPil(size={"height": size, "width": size})
    return model, BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_tiny_blip(seed: int = 0):
    """A tiny random BLIP captioner (32x32 input) and its processor, identical for a given seed."""
    return build_blip(TINY_BLIP_TEXT_CONFIG, TINY_BLIP_VISION_CONFIG, seed=seed, sep_bias=_TINY_BLIP_SEP_BIAS)


def save_tiny_blip(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny BLIP folder (model and processor, as on the hub) and return its path."""
    folder = Path(folder)
    model, processor = build_tiny_blip(seed)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def materialise_tiny_blip(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the folder of the tiny BLIP, building it once (atomically) if it is not there yet."""
    return materialise_folder(
        f"tiny-blip-v{_TINY_VERSION}", "processor_config.json", save_tiny_blip, cache_dir
    )
