"""fp8 weight storage with per-layer upcast: Linear weights live in float8, arithmetic runs in a compute dtype.

Norm scales, biases and embeddings are kept in the compute dtype (fp8 has too little precision for them), which is
what sd-scripts does for T5-XXL and what fp8 FLUX files in the wild already store.

Scaled fp8 (library/formats/fp8_scaled.py): a Linear with a `scale_weight` buffer (loaded from such a file, or made
by `prepare_fp8_scaled`) multiplies its upcast weight by it, ComfyUI's dequantisation exactly. `fp8_matmul=True`
computes frozen fp8 Linears with torch._scaled_mm where the GPU has it (library/memory/fp8_matmul.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from library.formats.dtypes import is_fp8
from library.formats.fp8_scaled import SCALE, dequantize, quantize_weight
from library.memory.fp8_matmul import scaled_mm_linear
from library.memory.frozen_linear import frozen_linear


class Fp8Linear(nn.Linear):
    """A Linear whose weight is stored in fp8 and cast to `compute_dtype` for each call (one layer at a time)."""

    compute_dtype: torch.dtype = torch.bfloat16
    fp8_matmul: bool = False  # try torch._scaled_mm for the frozen product (set by prepare_fp8)

    @property
    def scale(self) -> torch.Tensor | None:
        """The scaled-fp8 scale of the weight (a `scale_weight` buffer), None for plain fp8."""
        return self._buffers.get(SCALE)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.weight, self.scale, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(self.compute_dtype) if self.bias is not None else None
        x = x.to(self.compute_dtype)
        if self.weight.requires_grad or (bias is not None and bias.requires_grad):
            return F.linear(x, self.dequantized_weight(), bias)
        cd = self.compute_dtype
        product = (lambda x, w, s, b: scaled_mm_linear(x, w, s, b, cd)) if self.fp8_matmul else None
        return frozen_linear(x, bias, lambda w, s: dequantize(w, s, cd), self.weight, self.scale, product=product)


def prepare_fp8(model: nn.Module, storage_dtype: torch.dtype = torch.float8_e4m3fn,
                compute_dtype: torch.dtype = torch.bfloat16, fp8_matmul: bool = False,
                scaled: str | None = None) -> nn.Module:
    """Store every Linear weight of `model` in `storage_dtype` (already-fp8 weights are kept as stored, with their
    scales) and every other floating tensor in `compute_dtype`. `scaled` "tensor" / "channel": weights not yet in
    fp8 are quantised with a scale per tensor / per output channel (scaled fp8, float8_e4m3fn only) instead of
    cast. `fp8_matmul`: frozen Linears try torch._scaled_mm. Works in place and returns the model."""
    if scaled is not None and storage_dtype != torch.float8_e4m3fn:
        raise ValueError(f"scaled fp8 stores float8_e4m3fn weights, got {storage_dtype}")
    if not is_fp8(storage_dtype):
        raise ValueError(f"prepare_fp8 needs an fp8 storage dtype, got {storage_dtype}")
    if is_fp8(compute_dtype):
        raise ValueError("the compute dtype of fp8 weights must be a float type such as bfloat16")
    fp8_weights = set()
    for module in model.modules():
        if isinstance(module, nn.Linear):
            w = module.weight
            if not is_fp8(w.dtype) and scaled is not None:
                w.data, scale = quantize_weight(w.data, scaled)
                module.register_buffer(SCALE, scale.to(w.device), persistent=False)
            elif not is_fp8(w.dtype):
                w.data = w.data.to(storage_dtype)
            fp8_weights.add(id(w))
            if SCALE in module._buffers:  # scales stay float32 (torch._scaled_mm takes them so)
                fp8_weights.add(id(module._buffers[SCALE]))
            module.__class__ = Fp8Linear
            module.compute_dtype = compute_dtype
            module.fp8_matmul = fp8_matmul
    for p in [*model.parameters(), *model.buffers()]:
        if id(p) not in fp8_weights and p.is_floating_point() and p.dtype != compute_dtype:
            p.data = p.data.to(compute_dtype)
    return model


def prepare_fp8_scaled(model: nn.Module, mode: str = "tensor", compute_dtype: torch.dtype = torch.bfloat16,
                       fp8_matmul: bool = False) -> nn.Module:
    """Scaled fp8 in memory: every Linear weight quantised to float8_e4m3fn with a scale per tensor (`mode`
    "tensor") or per output channel ("channel"), weights already in fp8 kept as stored. The entry point for a base
    model loaded in bf16/fp32 and used as fp8_scaled."""
    return prepare_fp8(model, torch.float8_e4m3fn, compute_dtype, fp8_matmul=fp8_matmul, scaled=mode)


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
