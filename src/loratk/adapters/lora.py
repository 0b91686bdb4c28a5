"""The LoRA adapter: low-rank layers on the UNet (and optionally the text encoders), the base frozen;
exported in the kohya layout that diffusers, A1111/Forge, ComfyUI and kohya load (optionally diffusers')."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from loratk.adapters.lora_layers import LORA_INITS, inject_lora, resolve_unet_targets
from loratk.core.precision import resolve_dtype
from loratk.export.formats import peft_to_kohya
from loratk.files import save_safetensors_atomic
from loratk.models.family import save_diffusers_lora


class LoraAdapter:
    """Low-rank adapters on the UNet (and optionally the text encoders); the base stays frozen."""

    def fp32_parts(self, model: Any) -> tuple[str, ...]:
        return ()  # the base stays in the mixed-precision dtype; the injected layers are made fp32 in `apply`

    def __init__(
        self,
        *,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        init: str = "kaiming",
        targets: str | list[str] = "all-linear",
        train_text_encoders: bool = False,
        text_encoder_lr: float | None = None,
        export_dtype: str = "fp16",
        export_diffusers: bool = False,
    ):
        self.rank = rank
        self.alpha = alpha
        self.dropout = dropout
        if init not in LORA_INITS:
            raise ValueError(f"init must be one of {', '.join(LORA_INITS)}, got {init!r}")
        self.init = init
        self.targets = targets
        self.train_text_encoders = train_text_encoders
        self.text_encoder_lr = text_encoder_lr
        self.export_dtype = resolve_dtype(export_dtype)
        self.export_diffusers = export_diffusers

    def _config(self, target_modules: str | list[str]):
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            init_lora_weights=LORA_INITS[self.init],
            target_modules=target_modules,
        )

    def apply(self, model: Any) -> None:
        inject_lora(model.unet, self._config(resolve_unet_targets(self.targets)))
        if self.train_text_encoders:
            for name, encoder in model.text_encoders.items():
                inject_lora(encoder, self._config(model.family.text_encoder_lora_targets(name, encoder)))
        for module in self.trainable_modules(model).values():
            for param in module.parameters():
                if param.requires_grad:  # only the injected lora_A / lora_B
                    param.data = param.data.float()
        if not any(p.requires_grad for p in model.unet.parameters()):
            raise ValueError(
                f"lora.targets = {self.targets!r} matched no UNet module; check the module names"
            )

    def trainable_modules(self, model: Any) -> dict[str, torch.nn.Module]:
        return {"unet": model.unet, **(model.text_encoders if self.train_text_encoders else {})}

    def param_groups(self, model: Any, lr: float) -> list[dict[str, Any]]:
        groups = [
            {"name": "unet", "params": [p for p in model.unet.parameters() if p.requires_grad], "lr": lr}
        ]
        if self.train_text_encoders:
            params = [p for e in model.text_encoders.values() for p in e.parameters() if p.requires_grad]
            groups.append({"name": "text_encoders", "params": params, "lr": self.text_encoder_lr or lr})
        return groups

    def export_metadata(self) -> dict[str, str]:
        """The kohya network keys (rank and alpha, stored once per file)."""
        return {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(self.rank),
            "ss_network_alpha": str(float(self.alpha)),
        }

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
        tensors = peft_to_kohya(
            state_dicts,
            self.alpha,
            family=model.family,
            unet_config=model.unet.config,
            dtype=self.export_dtype,
        )
        metadata = {**metadata, **model.family.lora_metadata(model), **self.export_metadata()}
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
        # PEFT keys as they are: diffusers' `convert_state_dict_to_diffusers` renames attention keys to a
        # legacy form that its own loader then drops (measured with diffusers 0.42).
        layers = {
            part: {k: v.to(self.export_dtype) for k, v in sd.items()} for part, sd in state_dicts.items()
        }
        configs = {part: model.part(part).peft_config["default"].to_dict() for part in state_dicts}
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            save_diffusers_lora(model.family, tmp, layers, configs)
            if folder.exists():
                shutil.rmtree(folder)
            tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder
