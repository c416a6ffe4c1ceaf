"""F.linear on a frozen weight kept in a stored form (fp8, scaled fp8, GGUF bytes, bitsandbytes NF4/int8), shared
by every quantized Linear and the memory planner's stand-in.

Through plain F.linear, autograd would keep the dequantised weight -- as large as the layer in the compute dtype
(132 MiB for a single block's linear1 in bf16) -- alive from the forward to the backward; with checkpointing that is
every Linear of the block being recomputed. Here only the stored tensors are kept, and the weight is dequantised
again for the input gradient: the same product F.linear's backward computes (grad @ W), so the values are unchanged.

The output is a tensor of its own, never a view: F.linear returns a 3-D input's product as a view of a 2-D one, and
the LoRA wrapping the layer adds into its output in place, which autograd refuses on a custom function's view.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def frozen_linear(x: torch.Tensor, bias: torch.Tensor | None, dequantize: Callable[..., torch.Tensor],
                  *stored: torch.Tensor | None, product: Callable | None = None) -> torch.Tensor:
    """x @ dequantize(*stored).T + bias, keeping only `stored` for backward. `product(x, *stored, bias)`, when
    given, computes the forward from the stored form directly (fp8 matmul) or returns None to fall back."""
    return _FrozenLinear.apply(x, bias, dequantize, product, *stored)


class _FrozenLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, dequantize, product, *stored):
        ctx.save_for_backward(*stored)
        ctx.dequantize = dequantize
        out = product(x, *stored, bias) if product is not None else None
        if out is None:
            out = F.linear(x, dequantize(*stored), bias)
        return torch.ops.aten._unsafe_view(out._base, out.shape) if out._base is not None else out

    @staticmethod
    def backward(ctx, grad):
        stored = ctx.saved_tensors
        grad_x = torch.matmul(grad, ctx.dequantize(*stored).to(grad.dtype))
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return (grad_x, grad_bias, None, None, *([None] * len(stored)))
