"""The Inception evaluator for FID, KID and IS: torch-fidelity's Inception v3 (the weights of the original
TensorFlow FID code), or a `TinyInception` folder for tests, behind one input contract.

Images are resized here, with PIL bicubic to 299 x 299 (`evaluators.INCEPTION_RESIZE`), not inside a
library, because the resize alone moves FID by several points (clean-fid). Record `INCEPTION_RESIZE` beside
every number computed from these features: numbers from another resize or library do not compare.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from loratk.evaluation.evaluators import (
    INCEPTION_RESIZE,
    PREPROCESSING_VERSION,
    Evaluator,
    EvaluatorError,
    compute_digest,
    list_weight_files,
    resolve_source,
)
from loratk.evaluation.tiny import TinyInception

INCEPTION_SIZE = 299  # INCEPTION_RESIZE (in evaluators) names this resize
TORCH_FIDELITY = "torch-fidelity"
_POOL, _LOGITS = "2048", "logits_unbiased"  # torch-fidelity's names: pool features, logits without the bias


def inception_input(images: Sequence[Image.Image]) -> Tensor:
    """uint8 [N, 3, 299, 299]: each image in RGB, resized (not cropped) with PIL bicubic."""
    arrays = [
        np.asarray(im.convert("RGB").resize((INCEPTION_SIZE,) * 2, Image.Resampling.BICUBIC)) for im in images
    ]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # [N, H, W, 3] -> [N, 3, H, W]


class InceptionEvaluator(Evaluator):
    """`image_features` gives the pool features [N, D] (2048 for Inception v3) for FID and KID;
    `features_and_logits` gives them with the class logits [N, K] (1008, bias-free as torch-fidelity's
    IS uses them) from one forward pass."""

    resize = INCEPTION_RESIZE

    def __init__(self, *args: Any, num_classes: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.num_classes = num_classes

    def _encode_images(self, images: list[Image.Image]) -> Tensor:
        return self._forward(images)[0]

    def _forward(self, images: list[Image.Image]) -> tuple[Tensor, Tensor]:
        features, logits = self.model(inception_input(images).to(self.device))
        return features, logits

    def features_and_logits(self, images: Sequence[Image.Image]) -> tuple[Tensor, Tensor]:
        features, logits = self._batched(images, self._forward, (self.feature_dim, self.num_classes))
        return features, logits


def _trap_advice() -> str:
    """How to install torch-fidelity without replacing this torch (REFERENCE.md §6, the torchvision trap)."""
    major, minor = (int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    torchvision = (
        f"0.{minor + 15}.*" if major == 2 else "<the release for your torch>"
    )  # 2.13 pairs with 0.28
    index = "cpu" if torch.version.cuda is None else "cu" + torch.version.cuda.replace(".", "")
    return (
        "torch-fidelity needs torchvision, and the torchvision wheels on PyPI are CUDA builds that replace a "
        "CPU torch (or fail at import with `operator torchvision::nms does not exist`). Install the torchvision "
        f"built for your torch {torch.__version__} first, `pip install torchvision=={torchvision} --index-url "
        f"https://download.pytorch.org/whl/{index}`, then `pip install torch-fidelity`; or set "
        'eval.inception = "" to skip the Inception metrics (FID, KID, IS)'
    )


def _import_torch_fidelity():
    try:
        import torch_fidelity
    except (ImportError, RuntimeError, OSError) as err:  # torchvision missing, or built for another torch
        raise EvaluatorError(
            f"eval.inception: cannot import torch-fidelity ({err}). {_trap_advice()}"
        ) from err
    return torch_fidelity


def _torch_fidelity_inception(name: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """torch-fidelity's Inception v3, with its released weights or those of the local file `name`."""
    weights = None if name == TORCH_FIDELITY else Path(name).expanduser()
    if weights is not None and not weights.is_file():
        raise EvaluatorError(
            f"eval.inception: {name!r}: no such file; give torch-fidelity's Inception weights "
            f"(weights-inception-2015-12-05-*.pth) or {TORCH_FIDELITY!r} to download them"
        )
    fidelity = _import_torch_fidelity()
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    try:
        # A local file is unpickled by torch-fidelity (torch.load, weights_only=False): only give one you trust.
        model = fidelity.FeatureExtractorInceptionV3(
            "inception-v3-compat",
            [_POOL, _LOGITS],
            feature_extractor_weights_path=None if weights is None else str(weights),
        )
    except OSError as err:
        if weights is not None:
            raise EvaluatorError(f"eval.inception: cannot read {name!r}: {err}") from err
        raise EvaluatorError(  # the download failed (offline, firewall)
            f"eval.inception: cannot get the Inception weights ({err}); download {URL_INCEPTION_V3} once and "
            f'set eval.inception to the file\'s path, or set eval.inception = "" to skip FID, KID and IS'
        ) from err
    except (RuntimeError, ValueError, pickle.UnpicklingError) as err:  # not Inception weights
        raise EvaluatorError(
            f"eval.inception: {name!r} does not hold torch-fidelity's Inception v3 weights ({err})"
        ) from err
    if weights is None:
        source: Any = URL_INCEPTION_V3
    else:
        stat = weights.stat()
        source = [str(weights.resolve()), stat.st_size, stat.st_mtime_ns]
    return model, {"extractor": "torch-fidelity", "version": fidelity.__version__, "weights": source}


def _tiny_inception(name: str, folder: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A `TinyInception` saved with `save_pretrained` (config.json + model.safetensors)."""
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
        if not isinstance(config, dict) or not set(config) <= {"num_features", "num_classes", "width"}:
            raise ValueError(f"{config_path} is not a TinyInception config")
        with contextlib.redirect_stdout(io.StringIO()):  # the hub mixin prints "Loading weights from ..."
            model = TinyInception.from_pretrained(folder, strict=True)
    except (OSError, ValueError, TypeError, RuntimeError) as err:
        raise EvaluatorError(
            f"eval.inception: cannot load {name!r} as a TinyInception folder ({err}); give "
            f"{TORCH_FIDELITY!r}, a torch-fidelity weights file or builtin:tiny-inception"
        ) from err
    return model, {"extractor": "TinyInception", "config": config, "weights": list_weight_files(folder)}


def load_inception(
    name: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int,
    cache_dir: str | os.PathLike | None = None,
) -> InceptionEvaluator:
    """Inception from "torch-fidelity", a local torch-fidelity `.pth`, `builtin:tiny-inception` or a
    TinyInception folder. torch-fidelity is imported only here; `dtype` is ignored (Inception runs in
    float32, as torch-fidelity does by default)."""
    if name == TORCH_FIDELITY or name.endswith((".pth", ".pt")):
        model, parts = _torch_fidelity_inception(name)
    else:
        folder = Path(resolve_source("inception", name, cache_dir))
        if not folder.is_dir():
            raise EvaluatorError(
                f"eval.inception: {name!r}: expected {TORCH_FIDELITY!r}, a torch-fidelity weights file (.pth), "
                "builtin:tiny-inception or a TinyInception folder"
            )
        model, parts = _tiny_inception(name, folder)
    digest = compute_digest(
        {
            "kind": "inception",
            "name": name,
            **parts,
            "resize": INCEPTION_RESIZE,
            "preprocessing": PREPROCESSING_VERSION,
        }
    )
    tiny = isinstance(model, TinyInception)
    return InceptionEvaluator(
        "inception",
        name,
        model,
        digest=digest,
        feature_dim=model.num_features if tiny else 2048,
        num_classes=model.num_classes if tiny else 1008,
        device=device,
        dtype=torch.float32,
        batch_size=batch_size,
    )
