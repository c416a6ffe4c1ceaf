"""Quantized base weights as the memory planner sees them: bytes per weight, and a stand-in Linear for `meta`.

The planner runs the trainer's step on `meta` tensors, where bitsandbytes' kernels and the dequantisers of quantized
files do not run. What the step's memory depends on is the same for every format and is what the stand-in keeps:
the stored bytes of each Linear weight (resident, or one flat block in the swapper's slots), one dequantised weight
in the compute dtype while a layer computes (forward, and again for the input gradient in backward), and nothing
of the weight kept for backward beyond the stored bytes (the frozen-weight autograd functions of
library/memory/fp8.py and the quantized Linears keep only those).

Bytes per weight, from each format's block layout (norms, biases and embeddings stay in the compute dtype):

* fp8 (float8_e4m3fn): 1 byte. fp8_scaled adds one float32 scale per output channel (ComfyUI/musubi also write
  per-tensor scales: less).
* int8 (bitsandbytes LLM.int8 vector-wise): 1 byte plus one float32 scale per output row.
* nf4 (bitsandbytes 4-bit, block size 64, as library/memory/quantized_linear.py stores it: no double quantisation
  of the block scales): 4 bits plus a float32 scale per block of 64.
* GGUF (ggml block quantisation): bytes per block / weights per block, from library/formats/gguf_quants.py
  (Q8_0 34/32, Q6_K 210/256, Q5_K 176/256, Q4_K 144/256, Q2_K 84/256, ...). A file's type is the one most of its
  block weights use (city96's _S/_M files mix types per tensor; the others are counted at that type).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from library.formats.gguf_quants import GGUF_TYPES
from library.memory.frozen_linear import frozen_linear

_GGUF_QUANTIZED = {name: t for name, t in GGUF_TYPES.items() if t.quantized}
BASE_QUANTIZATIONS = ("fp8", "fp8_scaled", "int8", "nf4", *(f"gguf_{name.lower()}" for name in _GGUF_QUANTIZED))


def weight_bytes(kind: str, rows: int, cols: int) -> int:
    """Stored bytes of a (rows, cols) Linear weight quantized as `kind` (one of BASE_QUANTIZATIONS)."""
    numel = rows * cols
    if kind == "fp8":
        return numel
    if kind == "fp8_scaled":
        return numel + 4 * rows
    if kind == "int8":
        return numel + 4 * rows
    if kind == "nf4":
        return math.ceil(numel / 2) + 4 * math.ceil(numel / 64)
    if kind.startswith("gguf_") and kind[5:].upper() in _GGUF_QUANTIZED:
        t = _GGUF_QUANTIZED[kind[5:].upper()]
        return math.ceil(numel / t.block_size) * t.type_size
    raise ValueError(f"base quantization {kind!r}: expected one of {', '.join(BASE_QUANTIZATIONS)}")


class PlannedQuantizedLinear(nn.Linear):
    """A frozen Linear whose weight is `weight_bytes` of uint8 (the stored format) and is dequantised per call."""

    compute_dtype: torch.dtype = torch.bfloat16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(self.compute_dtype) if self.bias is not None else None
        shape, dtype = self.shape, self.compute_dtype
        # what a dequantiser allocates: one weight in the compute dtype per call (values do not matter on meta)
        return frozen_linear(x.to(dtype), bias, lambda stored: torch.empty(shape, dtype=dtype, device=stored.device),
                             self.weight)


def prepare_planned_quantization(model: nn.Module, kind: str, compute_dtype: torch.dtype) -> nn.Module:
    """Every Linear of `model` stored as `kind` (its bytes, no values), everything else in `compute_dtype`."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            rows, cols = module.weight.shape
            stored = torch.empty(weight_bytes(kind, rows, cols), dtype=torch.uint8, device=module.weight.device)
            module.shape = (rows, cols)
            module.weight = nn.Parameter(stored, requires_grad=False)
            module.__class__ = PlannedQuantizedLinear
            module.compute_dtype = compute_dtype
    for p in [*model.parameters(), *model.buffers()]:
        if p.is_floating_point() and p.dtype != compute_dtype:
            p.data = p.data.to(compute_dtype)
    return model


def gguf_base_quantization(path) -> str:
    """The planner's name for a GGUF transformer file: the type most of its block weights use ("" when they are
    F16/BF16/F32: planned as a float base). Reads the header only."""
    from library.formats.gguf_io import read_gguf_header

    types = [t.qtype.name for k, t in read_gguf_header(path).tensors.items()
             if "_blocks." in k and k.endswith(".weight") and len(t.shape) == 2]
    quantized = [t for t in types if t in _GGUF_QUANTIZED]
    return f"gguf_{max(set(quantized), key=quantized.count).lower()}" if quantized else ""
