"""LoRA adapter: peft injection into the UNet (and optionally both text encoders), kohya-layout export."""

from __future__ import annotations

import re
import shutil
import tempfile
import warnings
from collections import Counter
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
# Down-projection init -> peft's `init_lora_weights` (the up-projection always starts at zero).
# "kaiming": kaiming-uniform with a = sqrt(5), kohya's and PEFT's default, so kohya learning rates carry
# over; "gaussian": std 1 / rank, the diffusers examples' choice.
LORA_INITS = {"kaiming": True, "gaussian": "gaussian"}


def resolve_unet_targets(targets: str | list[str]) -> str | list[str]:
    """A preset name -> a peft regex; an explicit list of module-name suffixes passes through."""
    if targets == "all-linear":
        return _ALL_LINEAR
    if targets == "attention":
        return _ATTENTION
    if isinstance(targets, str):
        raise ValueError(f"lora.targets must be 'all-linear', 'attention' or a list, got {targets!r}")
    return list(targets)


def count_lora_parameters(unet: torch.nn.Module, targets: str | list[str], rank: int) -> tuple[int, int]:
    """(modules, parameters) of a rank-`rank` LoRA on `unet`'s `targets`; works on the meta device, so the
    size of a full-size SDXL LoRA file (2 bytes per parameter in fp16) is known without any weights."""
    from loratk.export.extract import target_weights

    weights = target_weights(unet, resolve_unet_targets(targets))
    return len(weights), sum(rank * (w.shape[0] + w.shape[1]) for w in weights.values())


def inject_lora(module: torch.nn.Module, config: Any, adapter_name: str = "default") -> None:
    """Add LoRA layers to `module` in place through PEFT's own injection API.

    Not through the integration layers (`add_adapter` / `load_adapter` of transformers and diffusers): each
    checks the installed PEFT against its own minimum version, and transformers 5.24 refuses every PEFT that
    has been released (it asks for 0.22). PEFT itself records `module.peft_config`, which saving reads.
    """
    from peft import inject_adapter_in_model

    with warnings.catch_warnings():
        # Expected when a second adapter goes into the same module (`loratk sample` with several files).
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(config, module, adapter_name=adapter_name)


def load_text_encoder_lora(
    encoder: torch.nn.Module,
    state_dict: dict[str, torch.Tensor],
    *,
    prefix: str,
    adapter_name: str,
    network_alphas: dict[str, float] | None = None,
    config: dict[str, Any] | None = None,
) -> int:
    """Load the `prefix.*` text-encoder LoRA weights of a diffusers-converted state dict into `encoder`.

    `state_dict` and `network_alphas` are what a diffusers pipeline's `lora_state_dict` returns (kohya files
    converted, keys prefixed `text_encoder.` / `text_encoder_2.`); `config` is the file's own LoRA config for
    this part, where it has one (diffusers-layout files). The adapter goes in through PEFT directly
    (`inject_lora`), not through transformers' `load_adapter`, which refuses PEFT releases older than its own
    minimum. Returns the number of modules adapted (0 when the file has no weights for this encoder).
    """
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    mine = {k[len(prefix) + 1 :]: v for k, v in state_dict.items() if k.startswith(prefix + ".")}
    if not mine:
        return 0
    strip_root = not hasattr(encoder, "text_model")  # transformers 5 dropped CLIPTextModel.text_model
    peft_sd: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    # Rename the keys as diffusers does (legacy / kohya-converted names -> PEFT names), on index tensors, so
    # each new name can be traced to its original key: a file's alphas are keyed by the original names.
    keys = list(mine)
    indexed = {key: torch.tensor(i) for i, key in enumerate(keys)}
    renamed = convert_state_dict_to_peft(convert_state_dict_to_diffusers(indexed))
    for new, index in renamed.items():
        key = keys[int(index)]
        new = new.removeprefix("text_model.") if strip_root else new
        peft_sd[new] = mine[key]
        alpha = (network_alphas or {}).get(f"{prefix}.{key}.alpha")
        if alpha is not None and ".lora_A." in new:
            alphas[new.split(".lora_A.")[0]] = float(alpha)
    ranks = {k.split(".lora_B.")[0]: v.shape[1] for k, v in peft_sd.items() if ".lora_B." in k}
    if config is None:
        rank = Counter(ranks.values()).most_common(1)[0][0]
        # A module without an alpha in the file has alpha = its rank (scale 1), as every loader reads it.
        per_module = {m: alphas.get(m, float(r)) for m, r in ranks.items()}
        alpha = Counter(per_module.values()).most_common(1)[0][0]
        config = dict(
            r=rank,
            lora_alpha=alpha,
            rank_pattern={re.escape(m): r for m, r in ranks.items() if r != rank},
            alpha_pattern={re.escape(m): a for m, a in per_module.items() if a != alpha},
            target_modules=sorted(ranks),
        )
    inject_lora(encoder, LoraConfig(**config), adapter_name)
    result = set_peft_model_state_dict(encoder, peft_sd, adapter_name=adapter_name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) or [] if "lora_" in k]
    if unexpected:
        raise ValueError(f"{len(unexpected)} {prefix} LoRA weights match no module, e.g. {unexpected[0]}")
    return len(ranks)


class LoraAdapter:
    """Low-rank adapters on the UNet (and optionally the text encoders); the base stays frozen."""

    fp32_parts: tuple[str, ...] = ()  # the base stays in the mixed-precision dtype

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
        self.export_dtype = _DTYPES[export_dtype]
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
            for name in TEXT_ENCODERS:
                encoder = getattr(model, name)
                # Only CLIPTextModelWithProjection (CLIP-G) feeds its last layer into the pooled embedding.
                uses_last = hasattr(encoder, "text_projection")
                targets = text_encoder_targets(encoder.config.num_hidden_layers, uses_last)
                inject_lora(encoder, self._config(targets))
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
