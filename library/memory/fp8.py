"""fp8 weight storage with per-layer upcast: Linear weights live in float8, arithmetic runs in a compute dtype.

Norm scales, biases and embeddings are kept in the compute dtype (fp8 has too little precision for them), which is
what sd-scripts does for T5-XXL and what fp8 FLUX files in the wild already store.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from library.formats.dtypes import is_fp8


class Fp8Linear(nn.Linear):
    """A Linear whose weight is stored in fp8 and cast to `compute_dtype` for each call (one layer at a time)."""

    compute_dtype: torch.dtype = torch.bfloat16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(self.compute_dtype) if self.bias is not None else None
        x = x.to(self.compute_dtype)
        if self.weight.requires_grad or (bias is not None and bias.requires_grad):
            return F.linear(x, self.weight.to(self.compute_dtype), bias)
        return _FrozenFp8Linear.apply(x, self.weight, bias, self.compute_dtype)


class _FrozenFp8Linear(torch.autograd.Function):
    """F.linear on a frozen fp8 weight that keeps the fp8 weight for backward and upcasts it again there.

    Through plain F.linear autograd would keep the upcast copy, as large as the layer in the compute dtype (132 MiB
    for a single block's linear1), alive from the forward to the backward: with checkpointing that is every Linear
    of the block being recomputed, ~650 MiB for a double block at FLUX.1's width. The input gradient is the same
    product F.linear's backward computes (grad @ W), so results are unchanged bit for bit."""

    @staticmethod
    def forward(ctx, x, weight, bias, compute_dtype):
        ctx.save_for_backward(weight)
        ctx.compute_dtype = compute_dtype
        out = F.linear(x, weight.to(compute_dtype), bias)
        # F.linear returns a 3-D input's product as a view of a 2-D one; an output that is a view could not be
        # added to in place (the LoRA wrapping this layer does), so it is handed out as a tensor of its own
        return torch.ops.aten._unsafe_view(out._base, out.shape) if out._base is not None else out

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        grad_x = torch.matmul(grad, weight.to(ctx.compute_dtype))
        return grad_x, None, None, None


def prepare_fp8(model: nn.Module, storage_dtype: torch.dtype = torch.float8_e4m3fn,
                compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Store every Linear weight of `model` in `storage_dtype` (already-fp8 weights are kept as stored) and every
    other floating tensor in `compute_dtype`. Works in place and returns the model."""
    if not is_fp8(storage_dtype):
        raise ValueError(f"prepare_fp8 needs an fp8 storage dtype, got {storage_dtype}")
    if is_fp8(compute_dtype):
        raise ValueError("the compute dtype of fp8 weights must be a float type such as bfloat16")
    fp8_weights = set()
    for module in model.modules():
        if isinstance(module, nn.Linear):
            w = module.weight
            if not is_fp8(w.dtype):
                w.data = w.data.to(storage_dtype)
            fp8_weights.add(id(w))
            module.__class__ = Fp8Linear
            module.compute_dtype = compute_dtype
    for p in [*model.parameters(), *model.buffers()]:
        if id(p) not in fp8_weights and p.is_floating_point() and p.dtype != compute_dtype:
            p.data = p.data.to(compute_dtype)
    return model


def _t5_gated_ff_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    # transformers casts the activations to wo's dtype before wo (to keep wo in fp32 for int8 T5); with an fp8
    # wo that cast would round the activations to fp8, so this forward leaves the casting to Fp8Linear.
    hidden = self.act(self.wi_0(hidden_states)) * self.wi_1(hidden_states)
    return self.wo(self.dropout(hidden))


def prepare_t5xxl_fp8(t5: nn.Module, storage_dtype: torch.dtype = torch.float8_e4m3fn,
                      compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """prepare_fp8 for a transformers T5 encoder, without its activation cast to the weight dtype."""
    import types

    prepare_fp8(t5, storage_dtype, compute_dtype)
    t5.keeps_ff_output_in_fp32 = False  # every Linear now computes in compute_dtype
    for module in t5.modules():
        if hasattr(module, "wi_0") and hasattr(module, "wo"):
            module.forward = types.MethodType(_t5_gated_ff_forward, module)
    return t5
