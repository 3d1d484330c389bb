"""The input gradient of a finalized layer: frozen quantized weights under trainable adapters.

Contract: ``attach_input_grad(layer, x2)`` returns the layer's kernel output for the 2-D input
`x2`, carrying a gradient to `x2` of ``grad_x = (grad_y.float() @ W).to(x2.dtype)`` where W is the
float32 [N, K] weight the kernel's ``reference`` multiplies by (``Candidate.dequantize``): the
straight-through gradient of the reference's math (rounding of activations has derivative zero
almost everywhere; a frozen base under LoRA wants the linear map's). The weights are buffers, not
parameters: they never get a gradient, and asking for one (a buffer set to ``requires_grad``)
raises a ValueError saying what to do instead.

Why here and not on the ops: an autograd formula registered on an op is a Python kernel that every
call crosses, grad mode on or off; this costs nothing where no gradient is needed (inference), and
torch.compile traces the autograd.Function like any other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .base import QuantizedLinear

__all__ = ["attach_input_grad", "wants_weight_grad"]

_is_compiling = torch.compiler.is_compiling


def wants_weight_grad(layer: QuantizedLinear) -> bool:
    """Whether any of the layer's tensors (packed weight, scales, bias) requires a gradient."""
    return any(t is not None and t.requires_grad for t in layer._buffers.values())


class _InputGrad(torch.autograd.Function):
    """The layer's kernel on x (autograd off inside forward, as for any Function); backward gives
    x its gradient only. The output is the kernel's own fresh tensor (not a view of an input), so
    in-place ops on it (``y += lora(x)``) are allowed."""

    @staticmethod
    def forward(x2: Tensor, w: Tensor, layer: QuantizedLinear) -> Tensor:  # type: ignore[override]
        y = layer._kernel(x2)
        # Traced: hand back a detached alias (no copy). torch 2.11's dynamo, tracing a Function
        # whose forward output was last written in place (the kernels' ``.mul_``/``.add_(bias)``),
        # gives the backward a zero grad_y, so the input gradient came out all zeros (2.13 and
        # 2.14 are right either way). Eager keeps the kernel's tensor itself.
        return y.detach() if _is_compiling() else y

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor, Any], output: Tensor) -> None:
        x2, w, _ = inputs
        ctx.save_for_backward(w)
        ctx.x_dtype = x2.dtype

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, None, None]:  # type: ignore[override]
        (w,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return (grad_y.float() @ w).to(ctx.x_dtype), None, None


def attach_input_grad(layer: QuantizedLinear, x2: Tensor) -> Tensor:
    if wants_weight_grad(layer):
        names = [n for n, t in layer._buffers.items() if t is not None and t.requires_grad]
        raise ValueError(
            f"{layer._who()}: a gradient was asked for its {', '.join(names)}, but a finalized "
            "layer's weights are frozen (quantized buffers, not parameters). Train an adapter on "
            "top (LoRA) or the float model, or keep this layer float (filter_fn); call "
            f"requires_grad_(False) on those tensors to go on."
        )
    w = layer.dequantized_weight(x2.dtype, layer.kernel_for(x2.shape[0]))
    return _InputGrad.apply(x2, w, layer)
