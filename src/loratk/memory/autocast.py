"""CUDA's autocast rules, applied on the CPU: which ops run in the mixed dtype and which in fp32.

The estimate runs on (fake) CPU tensors, whose own autocast follows the CPU's lists; a GPU run follows CUDA's,
where norms, softmax, exp, pow and losses run in fp32 (their outputs are twice the size). A function mode sits
above autograd, as autocast does, so the casts it makes are what autograd saves for backward.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

T = torch.Tensor
# torch/csrc/autocast_mode.cpp, CUDA: "lower_precision_fp" (run in the mixed dtype).
LOWER_PRECISION = {
    F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
    F.prelu, F.scaled_dot_product_attention, F.bilinear,
    torch.matmul, torch.mm, torch.bmm, torch.baddbmm, torch.addmm, torch.addbmm, torch.addmv, torch.mv,
    torch.chain_matmul, torch.addr,
    T.matmul, T.__matmul__, T.mm, T.bmm, T.baddbmm, T.addmm, T.mv,
}  # fmt: skip
# CUDA "fp32" and "fp32_set_opt_dtype" (lower-precision inputs are cast up to fp32).
FP32 = {
    F.layer_norm, F.group_norm, F.softmax, F.log_softmax, F.softmin, F.softplus, F.mse_loss, F.l1_loss,
    F.smooth_l1_loss, F.huber_loss, F.cross_entropy, F.nll_loss, F.kl_div, F.binary_cross_entropy_with_logits,
    F.cosine_similarity, F.normalize,
    torch.exp, torch.expm1, torch.log, torch.log2, torch.log10, torch.log1p, torch.pow, torch.rsqrt,
    torch.reciprocal, torch.softmax, torch.log_softmax, torch.cumsum, torch.cumprod, torch.sum, torch.prod,
    torch.norm, torch.logsumexp, torch.acos, torch.asin, torch.cosh, torch.sinh, torch.tan, torch.erfinv,
    torch.cdist, torch.dist,
    T.exp, T.expm1, T.log, T.log2, T.log10, T.log1p, T.pow, T.__pow__, T.__rpow__, T.rsqrt, T.reciprocal,
    T.softmax, T.log_softmax, T.cumsum, T.cumprod, T.sum, T.prod, T.norm, T.logsumexp,
}  # fmt: skip
_LOW = (torch.float16, torch.bfloat16)


class CudaAutocastRules(TorchFunctionMode):
    """Within it, the listed ops cast their floating-point tensor arguments as CUDA's autocast would.

    As autocast does, casts of trainable leaf weights are cached until the mode exits (one copy per forward).
    """

    def __init__(self, dtype: torch.dtype, *, cache: bool = True):
        super().__init__()
        self.dtype = dtype
        self.cache = cache
        self._casts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __exit__(self, *exc: Any) -> Any:
        self._casts.clear()
        return super().__exit__(*exc)

    def _cast(self, value: Any, dtype: torch.dtype, only_from_low: bool) -> Any:
        if type(value) in (list, tuple):
            return type(value)(self._cast(v, dtype, only_from_low) for v in value)
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dtype == dtype:
            return value
        if only_from_low and value.dtype not in _LOW:
            return value
        if self.cache and value.is_leaf and value.requires_grad:
            hit = self._casts.get(id(value))
            if hit is not None and hit[0] is value:
                return hit[1]
            cast = value.to(dtype)
            self._casts[id(value)] = (value, cast)
            return cast
        return value.to(dtype)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in LOWER_PRECISION:
            args = self._cast(args, self.dtype, only_from_low=False)
            kwargs = {k: self._cast(v, self.dtype, only_from_low=False) for k, v in kwargs.items()}
        elif func in FP32:
            args = self._cast(args, torch.float32, only_from_low=True)
            kwargs = {k: self._cast(v, torch.float32, only_from_low=True) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def checkpoint_under_rules(dtype: torch.dtype) -> Any:
    """diffusers' default checkpointing (non-reentrant), with the CUDA autocast rules in the recompute."""
    from torch.utils.checkpoint import checkpoint

    def contexts() -> tuple[Any, Any]:
        return contextlib.nullcontext(), CudaAutocastRules(dtype, cache=False)

    def run(module: torch.nn.Module, *args: Any) -> Any:
        return checkpoint(module.__call__, *args, use_reentrant=False, context_fn=contexts)

    return run
