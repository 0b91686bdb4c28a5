"""The `[performance]` options on the UNet: attention backend, TF32, channels_last, torch.compile. None of them
changes what is trained, only how fast and in how much memory."""

from __future__ import annotations

import torch

ATTENTION_BACKENDS = ("sdpa", "xformers")
XFORMERS_HINT = "pip install 'loratk[xformers]'"


def require_attention_backend(attention: str) -> None:
    """Fail before any model is loaded when the attention backend cannot run here."""
    import importlib.util

    if attention not in ATTENTION_BACKENDS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_BACKENDS)}, got {attention!r}")
    if attention == "xformers" and importlib.util.find_spec("xformers") is None:
        raise ImportError(
            f"performance.attention = 'xformers' needs xformers: {XFORMERS_HINT} "
            "(or use attention = 'sdpa', PyTorch's own memory-efficient attention)"
        )


def set_tf32(enabled: bool) -> None:
    """TF32 for fp32 matmuls and cuDNN convolutions (Ampere and newer); no effect on CPUs or older GPUs."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def apply_performance_options(
    unet: torch.nn.Module,
    *,
    attention: str = "sdpa",
    tf32: bool = True,
    channels_last: bool = False,
    compile_unet: bool = False,
) -> None:
    """Apply the `[performance]` options to the UNet, in place. Call after the adapter is injected.

    `compile_unet` uses `Module.compile`, which keeps the module (and so its state-dict keys) as it is and
    compiles on the first forward pass.
    """
    require_attention_backend(attention)
    set_tf32(tf32)
    if attention == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    else:
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    if compile_unet:
        unet.compile()
