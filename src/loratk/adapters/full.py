"""Full adapter (method 'dreambooth'): the whole UNet trains (optionally the text encoders), in fp32.

Export: one single-file checkpoint in the family's original layout (A1111, ComfyUI, `from_single_file`), a
diffusers folder beside it, and optionally a LoRA extracted by SVD of (tuned - base) for the LoRA trainer's
targets.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from loratk.adapters.lora_layers import resolve_unet_targets
from loratk.core.precision import resolve_dtype
from loratk.export.extract import extract_lora, target_weights
from loratk.export.formats import peft_to_kohya
from loratk.files import save_safetensors_atomic
from loratk.models.family import build_pipeline


def extracted_lora_metadata(metadata: dict[str, str], model: Any, rank: int, name: str) -> dict[str, str]:
    """The run's metadata for a LoRA extracted from the full weights: the family's LoRA keys, its rank."""
    return {
        **metadata,
        **model.family.lora_metadata(model),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(rank)),
        "ss_output_name": name,
        "modelspec.title": name,
        "loratk.extracted_from": "full fine-tuning (SVD of tuned - base)",
    }


def with_weights(model: Any, weights: dict[str, dict[str, torch.Tensor]]) -> Any:
    """`model` with the parts named in `weights` rebuilt on those tensors (assigned, not copied).

    The full state dicts gathered from every process (`EpochExporter`) stand in for the live modules, which
    under FSDP or DeepSpeed ZeRO-3 hold only this rank's shard.
    """
    from accelerate import init_empty_weights

    parts = {}
    for name, state_dict in weights.items():
        live = model.part(name)
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
        self.export_dtype = resolve_dtype(export_dtype)
        self.extract_lora_rank = extract_lora_rank
        self.lora_targets = lora_targets
        self.base_weights: dict[str, dict[str, torch.Tensor]] = {}

    def fp32_parts(self, model: Any) -> tuple[str, ...]:
        return tuple(self.trainable_modules(model))

    def _extract_targets(self, model: Any) -> dict[str, dict[str, torch.Tensor]]:
        """The weights a LoRA trainer would adapt, per part (live tensors)."""
        found = {"unet": target_weights(model.unet, resolve_unet_targets(self.lora_targets))}
        if self.train_text_encoders:
            for name, encoder in model.text_encoders.items():
                found[name] = target_weights(encoder, model.family.text_encoder_lora_targets(name, encoder))
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
        return {"unet": model.unet, **(model.text_encoders if self.train_text_encoders else {})}

    def param_groups(self, model: Any, lr: float) -> list[dict[str, Any]]:
        groups = [{"name": "unet", "params": list(model.unet.parameters()), "lr": lr}]
        if self.train_text_encoders:
            params = [p for encoder in model.text_encoders.values() for p in encoder.parameters()]
            groups.append({"name": "text_encoders", "params": params, "lr": self.text_encoder_lr or lr})
        return groups

    def export_metadata(self) -> dict[str, str]:
        """Full weights have no network keys: the family's checkpoint keys are added on export."""
        return {}

    def export(
        self,
        model: Any,
        path: Path,
        metadata: dict[str, str],
        weights: dict[str, dict[str, torch.Tensor]] | None = None,
    ) -> list[Path]:
        """`path`: the single-file checkpoint; `<stem>_diffusers/`; `<stem>.lora.safetensors` if asked.

        `weights`: full state dicts of the trained parts, gathered across processes (see `with_weights`)."""
        if weights:
            model = with_weights(model, weights)
        for name, module in self.trainable_modules(model).items():
            bad = [n for n, p in module.named_parameters() if not torch.isfinite(p).all()]
            if bad:
                raise FloatingPointError(f"{name} weight {bad[0]} is not finite; refusing to export {path}")
        family = model.family
        save_safetensors_atomic(
            family.single_file_state_dict(model, self.export_dtype),
            path,
            {**metadata, **family.checkpoint_metadata(model)},
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
        tensors = peft_to_kohya(
            state_dicts,
            float(rank),
            family=model.family,
            unet_config=model.unet.config,
            dtype=self.export_dtype,
        )
        name = path.name.removesuffix(".safetensors")
        save_safetensors_atomic(tensors, path, extracted_lora_metadata(metadata, model, rank, name))
        return path

    @staticmethod
    def _export_diffusers(model: Any, folder: Path) -> Path:
        from diffusers import EulerDiscreteScheduler

        # The folder users load samples with Euler, never DDIM (bad SDXL images).
        pipe = build_pipeline(model, EulerDiscreteScheduler.from_config(model.noise_scheduler.config))
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            pipe.save_pretrained(tmp, safe_serialization=True)
            if folder.exists():
                shutil.rmtree(folder)
            tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder
