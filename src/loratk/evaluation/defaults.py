"""Names and defaults of the evaluation, importable without torch (the recipe validates against them)."""

from __future__ import annotations

# Evaluator models: a hub id, a local folder, a `builtin:tiny-*` id, or "" to skip the metrics that need it.
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
DEFAULT_DINO = "facebook/dino-vits16"
DEFAULT_DINOV2 = "facebook/dinov2-base"
DEFAULT_INCEPTION = "torch-fidelity"  # torch-fidelity's pt_inception-2015-12-05, as the FID literature uses
EVALUATOR_KINDS = ("clip", "dino", "dinov2", "inception")

# Image metrics, by the evaluator they need (None: pixels only).
IMAGE_METRICS: dict[str, str | None] = {
    "clip_t": "clip",  # prompt fidelity: cosine of CLIP image and prompt embeddings
    "clip_i": "clip",  # likeness: mean pairwise cosine to the training images, CLIP image embeddings
    "dino": "dino",  # likeness in DINO ViT-S/16 class tokens (the DreamBooth paper's preferred metric)
    "kid": "inception",  # kernel inception distance to the training images (unbiased; the small-set headline)
    "fid": "inception",  # Frechet inception distance (biased below thousands of images)
    "fd_dinov2": "dinov2",  # Frechet distance in DINOv2 space
    "kid_dinov2": "dinov2",  # kernel distance in DINOv2 space
    "is": "inception",  # Inception Score of the generated images
    "psnr": None,  # leak: same prompt and seed by the base model and the epoch, prompts without the subject
    "ssim": None,
}

DEFAULT_LEAK_PROMPTS = (
    "a photo of a city street in the rain",
    "a bowl of fruit on a wooden table",
)
