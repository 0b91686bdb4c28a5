"""Full adapter (method 'dreambooth'): the whole UNet trains (optionally both text encoders), in fp32.

Export: one SGM-layout SDXL checkpoint (A1111, ComfyUI, `from_single_file`), a diffusers folder beside it,
and optionally a LoRA extracted by SVD of (tuned - base) for the LoRA trainer's targets.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from loratk.adapters.lora import TEXT_ENCODERS, resolve_unet_targets, text_encoder_targets
from loratk.core.checkpoint import save_safetensors_atomic
from loratk.export.extract import extract_lora, target_weights
from loratk.export.formats import peft_to_kohya
from loratk.export.single_file import build_sgm_checkpoint

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def full_checkpoint_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """The run's metadata for a full checkpoint: no LoRA network keys, the base (not /lora) architecture."""
    meta = {k: v for k, v in metadata.items() if not k.startswith("ss_network_")}
    meta["modelspec.architecture"] = "stable-diffusion-xl-v1-base"
    return meta


def extracted_lora_metadata(metadata: dict[str, str], rank: int, name: str) -> dict[str, str]:
    meta = dict(metadata)
    meta.update(
        {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(rank),
            "ss_network_alpha": str(float(rank)),
            "ss_output_name": name,
            "modelspec.title": name,
            "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
            "loratk.extracted_from": "full fine-tuning (SVD of tuned - base)",
        }
    )
    return meta


def with_weights(model: Any, weights: dict[str, dict[str, torch.Tensor]]) -> Any:
    """`model` with the parts named in `weights` rebuilt on those tensors (assigned, not copied).

    The full state dicts gathered from every process (`EpochExporter`) stand in for the live modules, which
    under FSDP or DeepSpeed ZeRO-3 hold only this rank's shard.
    """
    from accelerate import init_empty_weights

    parts = {}
    for name, state_dict in weights.items():
        live = getattr(model, name)
        with init_empty_weights():
            module = (
                type(live).from_config(live.config)
                if hasattr(live, "from_config")
                else type(live)(live.config)
            )
        module.load_state_dict(state_dict, strict=True, assign=True)
        parts[name] = module.eval().requires_grad_(False)
    return model.replace(**parts)


class FullAdapter:
    """Every UNet weight trains (and both text encoders when asked); exports full weights."""

    def __init__(
        self,
        *,
        train_text_encoders: bool = False,
        text_encoder_lr: float | None = None,
        export_dtype: str = "fp16",
        extract_lora_rank: int | None = None,
        lora_targets: str | list[str] = "all-linear",
    ):
        self.train_text_encoders = train_text_encoders
        self.text_encoder_lr = text_encoder_lr
        self.export_dtype = _DTYPES[export_dtype]
        self.extract_lora_rank = extract_lora_rank
        self.lora_targets = lora_targets
        self.base_weights: dict[str, dict[str, torch.Tensor]] = {}

    @property
    def fp32_parts(self) -> tuple[str, ...]:
        return tuple(self.trainable_modules_names())

    def trainable_modules_names(self) -> tuple[str, ...]:
        return ("unet", *TEXT_ENCODERS) if self.train_text_encoders else ("unet",)

    def _extract_targets(self, model: Any) -> dict[str, dict[str, torch.Tensor]]:
        """The weights a LoRA trainer would adapt, per part (live tensors)."""
        found = {"unet": target_weights(model.unet, resolve_unet_targets(self.lora_targets))}
        if self.train_text_encoders:
            for name in TEXT_ENCODERS:
                encoder = getattr(model, name)
                regex = text_encoder_targets(
                    encoder.config.num_hidden_layers, hasattr(encoder, "text_projection")
                )
                found[name] = target_weights(encoder, regex)
        return found

    def apply(self, model: Any) -> None:
        if self.extract_lora_rank:
            # A CPU fp32 copy of the base weights the extracted LoRA is measured against.
            self.base_weights = {
                part: {k: w.detach().to("cpu", torch.float32, copy=True) for k, w in weights.items()}
                for part, weights in self._extract_targets(model).items()
            }
        for module in self.trainable_modules(model).values():
            module.to(dtype=torch.float32)  # trainable weights in fp32; autocast computes in the mixed dtype
            module.requires_grad_(True)

    def trainable_modules(self, model: Any) -> dict[str, torch.nn.Module]:
        return {name: getattr(model, name) for name in self.trainable_modules_names()}

    def param_groups(self, model: Any, lr: float) -> list[dict[str, Any]]:
        groups = [{"name": "unet", "params": list(model.unet.parameters()), "lr": lr}]
        if self.train_text_encoders:
            params = [p for n in TEXT_ENCODERS for p in getattr(model, n).parameters()]
            groups.append({"name": "text_encoders", "params": params, "lr": self.text_encoder_lr or lr})
        return groups

    def export(
        self,
        model: Any,
        path: Path,
        metadata: dict[str, str],
        weights: dict[str, dict[str, torch.Tensor]] | None = None,
    ) -> list[Path]:
        """`path`: single-file SGM checkpoint; `<stem>_diffusers/`; `<stem>.lora.safetensors` if asked.

        `weights`: full state dicts of the trained parts, gathered across processes (see `with_weights`)."""
        if weights:
            model = with_weights(model, weights)
        for name, module in self.trainable_modules(model).items():
            bad = [n for n, p in module.named_parameters() if not torch.isfinite(p).all()]
            if bad:
                raise FloatingPointError(f"{name} weight {bad[0]} is not finite; refusing to export {path}")
        save_safetensors_atomic(
            build_sgm_checkpoint(model, self.export_dtype), path, full_checkpoint_metadata(metadata)
        )
        written = [path, self._export_diffusers(model, path.with_name(path.stem + "_diffusers"))]
        if self.extract_lora_rank:
            written.append(
                self._export_lora(model, path.with_name(path.stem + ".lora.safetensors"), metadata)
            )
        return written

    def _export_lora(self, model: Any, path: Path, metadata: dict[str, str]) -> Path:
        rank = self.extract_lora_rank
        tuned = self._extract_targets(model)
        state_dicts = {
            part: extract_lora(self.base_weights[part], weights, rank, alpha=float(rank))
            for part, weights in tuned.items()
        }
        config = model.unet.config
        tensors = peft_to_kohya(
            state_dicts,
            float(rank),
            layers_per_block=config.layers_per_block,
            up_blocks_with_attention=sum(1 for t in config.up_block_types if "CrossAttn" in t),
            dtype=self.export_dtype,
        )
        name = path.name.removesuffix(".safetensors")
        save_safetensors_atomic(tensors, path, extracted_lora_metadata(metadata, rank, name))
        return path

    @staticmethod
    def _export_diffusers(model: Any, folder: Path) -> Path:
        from loratk.sampling import build_pipeline

        pipe = build_pipeline(model, scheduler="euler")  # the folder users load: Euler, never DDIM
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            pipe.save_pretrained(tmp, safe_serialization=True)
            if folder.exists():
                shutil.rmtree(folder)
            tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder
