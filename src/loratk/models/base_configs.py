"""The architecture of the standard base models, known offline: build them on the meta device (sizes,
parameter counts, FLOPs) without downloading anything."""

from __future__ import annotations

from typing import Any

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (the keys that shape the network).
SDXL_BASE_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),  # diffusers' name for the number of heads in SDXL's config
    norm_num_groups=32,
    cross_attention_dim=2048,  # CLIP-L 768 + CLIP-G 1280
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + pooled CLIP-G 1280
)
SDXL_BASE_UNET_PARAMETERS = 2_567_463_684

# stabilityai/stable-diffusion-xl-base-1.0, vae/config.json: 8x down, 4 latent channels.
SDXL_BASE_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=True,
)
SDXL_BASE_VAE_PARAMETERS = 83_653_863

# text_encoder/config.json (CLIP ViT-L/14's text tower) and text_encoder_2/config.json (OpenCLIP ViT-bigG/14's,
# with its projection); token ids come from the tokenizer.
SDXL_BASE_TEXT_ENCODER_CONFIG: dict[str, Any] = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)
SDXL_BASE_TEXT_ENCODER_2_CONFIG: dict[str, Any] = dict(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=1280,
)
SDXL_BASE_TEXT_ENCODER_PARAMETERS = 123_060_480
SDXL_BASE_TEXT_ENCODER_2_PARAMETERS = 694_659_840

# stable-diffusion-v1-5/stable-diffusion-v1-5, unet/config.json: four levels, cross-attention in the first
# three down blocks and the last three up blocks, 8 heads, CLIP-L's 768-wide hidden states, 1x1-conv proj_in.
SD15_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    attention_head_dim=8,
    norm_num_groups=32,
    cross_attention_dim=768,
    use_linear_projection=False,
)
SD15_UNET_PARAMETERS = 859_520_964
# stable-diffusion-v1-5, text_encoder/config.json (openai/clip-vit-large-patch14's text tower).
SD15_CLIP_L_CONFIG: dict[str, Any] = SDXL_BASE_TEXT_ENCODER_CONFIG  # the same CLIP ViT-L/14 text tower
