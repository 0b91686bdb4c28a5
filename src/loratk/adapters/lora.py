"""LoRA adapter: peft injection into the UNet (and optionally both text encoders), kohya-layout export."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from loratk.core.checkpoint import save_safetensors_atomic
from loratk.export.formats import peft_to_kohya

# Every Linear inside the UNet's transformer blocks (kohya's default LoRA targets), as one peft regex.
_ALL_LINEAR = (
    r".*attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\."
    r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))"
)
_ATTENTION = r".*attentions\.\d+\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def text_encoder_targets(num_layers: int, uses_last_layer: bool) -> str:
    """A peft regex over the attention projections of the layers whose output SDXL reads.

    All four of q, k, v and out per layer: A1111 applies CLIP-G attention LoRA only when all are present.
    SDXL conditions on the penultimate hidden state, so CLIP-L's last layer never gets a gradient; CLIP-G's
    last layer still feeds the pooled embedding.
    """
    last = num_layers if uses_last_layer else num_layers - 1
    layers = "|".join(str(i) for i in range(last))
    return rf".*encoder\.layers\.({layers})\.self_attn\.(q_proj|k_proj|v_proj|out_proj)"


_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_unet_targets(targets: str | list[str]) -> str | list[str]:
    """A preset name -> a peft regex; an explicit list of module-name suffixes passes through."""
    if targets == "all-linear":
        return _ALL_LINEAR
    if targets == "attention":
        return _ATTENTION
    if isinstance(targets, str):
        raise ValueError(f"lora.targets must be 'all-linear', 'attention' or a list, got {targets!r}")
    return list(targets)


class LoraAdapter:
    """Low-rank adapters on the UNet (and optionally the text encoders); the base stays frozen."""

    fp32_parts: tuple[str, ...] = ()  # the base stays in the mixed-precision dtype

    def __init__(
        self,
        *,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        targets: str | list[str] = "all-linear",
        train_text_encoders: bool = False,
        text_encoder_lr: float | None = None,
        export_dtype: str = "fp16",
        export_diffusers: bool = False,
    ):
        self.rank = rank
        self.alpha = alpha
        self.dropout = dropout
        self.targets = targets
        self.train_text_encoders = train_text_encoders
        self.text_encoder_lr = text_encoder_lr
        self.export_dtype = _DTYPES[export_dtype]
        self.export_diffusers = export_diffusers

    def _config(self, target_modules: str | list[str]):
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            init_lora_weights="gaussian",
            target_modules=target_modules,
        )

    def apply(self, model: Any) -> None:
        model.unet.add_adapter(self._config(resolve_unet_targets(self.targets)))
        if self.train_text_encoders:
            for name in TEXT_ENCODERS:
                encoder = getattr(model, name)
                # Only CLIPTextModelWithProjection (CLIP-G) feeds its last layer into the pooled embedding.
                uses_last = hasattr(encoder, "text_projection")
                targets = text_encoder_targets(encoder.config.num_hidden_layers, uses_last)
                encoder.add_adapter(self._config(targets))
        for module in self.trainable_modules(model).values():
            for param in module.parameters():
                if param.requires_grad:  # only the injected lora_A / lora_B
                    param.data = param.data.float()
        if not any(p.requires_grad for p in model.unet.parameters()):
            raise ValueError(
                f"lora.targets = {self.targets!r} matched no UNet module; check the module names"
            )

    def trainable_modules(self, model: Any) -> dict[str, torch.nn.Module]:
        names = ("unet", *TEXT_ENCODERS) if self.train_text_encoders else ("unet",)
        return {name: getattr(model, name) for name in names}

    def param_groups(self, model: Any, lr: float) -> list[dict[str, Any]]:
        groups = [
            {"name": "unet", "params": [p for p in model.unet.parameters() if p.requires_grad], "lr": lr}
        ]
        if self.train_text_encoders:
            params = [p for n in TEXT_ENCODERS for p in getattr(model, n).parameters() if p.requires_grad]
            groups.append({"name": "text_encoders", "params": params, "lr": self.text_encoder_lr or lr})
        return groups

    def state_dicts(
        self, model: Any, weights: dict[str, dict[str, torch.Tensor]] | None = None
    ) -> dict[str, dict[str, torch.Tensor]]:
        """PEFT-layout LoRA weights per model part, read from `weights` (full state dicts gathered across
        processes, see `EpochExporter`) when given, else from the live modules."""
        from peft.utils import get_peft_model_state_dict

        return {
            name: get_peft_model_state_dict(
                module, state_dict=weights[name] if weights else None, save_embedding_layers=False
            )
            for name, module in self.trainable_modules(model).items()
        }

    def export(
        self,
        model: Any,
        path: Path,
        metadata: dict[str, str],
        weights: dict[str, dict[str, torch.Tensor]] | None = None,
    ) -> list[Path]:
        """Write `path` in the kohya/SGM layout (and the diffusers layout beside it when asked)."""
        state_dicts = self.state_dicts(model, weights)
        self._check_finite(state_dicts, path)
        config = model.unet.config
        with_attention = sum(1 for t in config.up_block_types if "CrossAttn" in t)
        tensors = peft_to_kohya(
            state_dicts,
            self.alpha,
            layers_per_block=config.layers_per_block,
            up_blocks_with_attention=with_attention,
            dtype=self.export_dtype,
        )
        save_safetensors_atomic(tensors, path, metadata)
        written = [path]
        if self.export_diffusers:
            written.append(
                self._export_diffusers(model, state_dicts, path.with_name(path.stem + "_diffusers"))
            )
        return written

    @staticmethod
    def _check_finite(state_dicts: dict[str, dict[str, torch.Tensor]], path: Path) -> None:
        """A non-finite adapter is never exported."""
        for part, sd in state_dicts.items():
            bad = [k for k, v in sd.items() if not torch.isfinite(v).all()]
            if bad:
                raise FloatingPointError(
                    f"{part} LoRA weight {bad[0]} is not finite; refusing to export {path}"
                )

    def _export_diffusers(
        self, model: Any, state_dicts: dict[str, dict[str, torch.Tensor]], folder: Path
    ) -> Path:
        from diffusers import StableDiffusionXLPipeline

        def layers(part: str) -> dict[str, torch.Tensor] | None:
            # PEFT keys as they are: diffusers' `convert_state_dict_to_diffusers` renames attention keys to a
            # legacy form that its own loader then drops (measured with diffusers 0.42).
            sd = state_dicts.get(part)
            return {k: v.to(self.export_dtype) for k, v in sd.items()} if sd else None

        def adapter_metadata(part: str) -> dict[str, Any] | None:
            module = getattr(model, part)
            return module.peft_config["default"].to_dict() if part in state_dicts else None

        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            StableDiffusionXLPipeline.save_lora_weights(
                tmp,
                unet_lora_layers=layers("unet"),
                text_encoder_lora_layers=layers("text_encoder"),
                text_encoder_2_lora_layers=layers("text_encoder_2"),
                unet_lora_adapter_metadata=adapter_metadata("unet"),
                text_encoder_lora_adapter_metadata=adapter_metadata("text_encoder"),
                text_encoder_2_lora_adapter_metadata=adapter_metadata("text_encoder_2"),
            )
            if folder.exists():
                shutil.rmtree(folder)
            tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder
