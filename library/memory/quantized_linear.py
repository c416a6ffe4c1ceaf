"""NF4 and int8 weight storage through bitsandbytes: a frozen Linear kept quantized and dequantised per call.

The bytes and their scales are bitsandbytes' own (`quantize_4bit` / `int8_vectorwise_quant`), and every use
dequantises them with bitsandbytes' own `dequantize_4bit` / `int8_vectorwise_dequant`, then multiplies in torch in
the compute dtype. bitsandbytes 0.50 has all four functions on the CPU as well as on CUDA, so tests and GPU runs
take the same path. The matmul is torch's rather than bitsandbytes' Linear4bit / Linear8bitLt kernels: int8 here is
weight-only (Linear8bitLt would also quantise the activations), and one path for both formats lets the frozen
backward keep the packed bytes (library/memory/frozen_linear.py).

The packed bytes and the scales are parameters without gradient, not buffers: block swapping moves a block's
parameters and keeps buffers resident, and every block's Linears quantise to the same shapes and dtypes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from library.memory.frozen_linear import frozen_linear

QUANT_TYPES = ("nf4", "int8")
NF4_BLOCKSIZE = 64  # bitsandbytes' default: one float32 absmax per 64 weights
_DEQUANT_CHUNK = 1 << 24  # int8 weights dequantised at once per call (a 64 MiB float32 temporary; few launches)
_CHUNK = 1 << 18  # weights quantised at once: small temporaries (bnb's CPU nf4 takes ~20 bytes per weight), and faster


def _bnb():
    try:  # imported on first use: bitsandbytes logs at import, torch loads faster
        import bitsandbytes.functional as bf
    except ImportError as e:
        raise ValueError(f"nf4/int8 weights need bitsandbytes ({e}): pip install bitsandbytes "
                         "(listed in requirements-extras.txt)") from None
    return bf


def check_quant_type(quant_type: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"unknown weight quantization {quant_type!r}: use one of {', '.join(QUANT_TYPES)}")


def quantized_shapes(quant_type: str, out_features: int, in_features: int):
    """((data shape, data dtype), (scale shape, scale dtype)) of an out x in weight, as bitsandbytes stores it."""
    check_quant_type(quant_type)
    n = out_features * in_features
    if quant_type == "nf4":  # two 4-bit codes per byte; a last partial block gets its own absmax
        return ((-(-n // 2), 1), torch.uint8), ((-(-n // NF4_BLOCKSIZE),), torch.float32)
    return ((out_features, in_features), torch.int8), ((out_features,), torch.float32)


def bytes_per_parameter(quant_type: str, in_features: int) -> float:
    """Stored bytes per weight, scales included (nf4: 0.5 + 4/64; int8: 1 + 4/in_features)."""
    (data, ddt), (scale, sdt) = quantized_shapes(quant_type, 1, in_features)
    return (torch.Size(data).numel() * ddt.itemsize + torch.Size(scale).numel() * sdt.itemsize) / in_features


def quantize(weight: torch.Tensor, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(data, scale) of a 2-D weight, on its device: the same bytes as bitsandbytes' call on the whole tensor."""
    return quantize_parts([weight], quant_type, weight.shape[0], weight.device)


def quantize_parts(parts, quant_type: str, out_features: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(data, scale) of the weight whose rows are the concatenation of `parts` (an iterable of 2-D tensors, taken one
    at a time), quantised in row chunks straight into the result: the same bytes as bitsandbytes' call on the whole
    tensor (nf4 blocks never straddle a chunk, int8 scales are per row), with small temporaries and no whole copy.
    Collecting chunks and concatenating them instead held the result twice and fragmented the host allocator
    (+50% RSS over a whole load). A part on another device is quantised on `device`."""
    check_quant_type(quant_type)
    bf = _bnb()
    data = scale = None
    row = 0
    for part in parts:
        if not part.is_floating_point() or part.dtype.itemsize == 1:  # fp8 files: bitsandbytes takes 16/32-bit
            part = part.to(torch.float32)
        part = part.to(device) if device is not None else part
        in_features = part.shape[1]
        if data is None:
            (dshape, ddtype), (sshape, sdtype) = quantized_shapes(quant_type, out_features, in_features)
            data = torch.empty(dshape, dtype=ddtype, device=part.device)
            scale = torch.empty(sshape, dtype=sdtype, device=part.device)
        rows = max(1, _CHUNK // in_features)
        if quant_type == "nf4":
            while rows < part.shape[0] and (rows * in_features) % NF4_BLOCKSIZE:
                rows += 1
            if (row * in_features) % NF4_BLOCKSIZE:
                raise ValueError(f"nf4: a part starting at row {row} of a {in_features}-wide weight splits a block "
                                 f"of {NF4_BLOCKSIZE}")
        for start in range(0, part.shape[0], rows):
            chunk = part[start:start + rows].contiguous()
            first = row + start
            if quant_type == "nf4":
                q, state = bf.quantize_4bit(chunk, blocksize=NF4_BLOCKSIZE, quant_type="nf4")
                s = state.absmax
                at, scale_at = first * in_features // 2, first * in_features // NF4_BLOCKSIZE
            else:
                q, s, _ = bf.int8_vectorwise_quant(chunk)
                at = scale_at = first
            data[at:at + q.shape[0]].copy_(q)
            scale[scale_at:scale_at + s.shape[0]].copy_(s)
            del q, s
        row += part.shape[0]
        del part
    if row != out_features:
        raise ValueError(f"the parts hold {row} rows, not {out_features}")
    return data, scale


def dequantize(data: torch.Tensor, scale: torch.Tensor, quant_type: str, shape, dtype: torch.dtype) -> torch.Tensor:
    """The weight in `dtype`, through bitsandbytes' own dequantization."""
    bf = _bnb()
    if quant_type == "nf4":
        state = bf.QuantState(absmax=scale, shape=torch.Size(shape), dtype=dtype, blocksize=NF4_BLOCKSIZE,
                              quant_type="nf4")
        return bf.dequantize_4bit(data, state)
    # bitsandbytes dequantises int8 to float32: in row chunks into the result, so that the float32 copy of a large
    # weight (264 MB for a single block's linear1) never exists whole beside it (row-wise, so the same values)
    out = torch.empty(tuple(shape), dtype=dtype, device=data.device)
    rows = max(1, _DEQUANT_CHUNK // shape[1])
    for start in range(0, shape[0], rows):
        out[start:start + rows] = bf.int8_vectorwise_dequant(data[start:start + rows], scale[start:start + rows])
    return out


class QuantizedLinear(nn.Linear):
    """A frozen Linear stored as bitsandbytes nf4 or int8 (`qweight`, `qscale`), computed in `compute_dtype`.

    A subclass of nn.Linear without a `weight`, so that code finding Linears (LoRA) finds it and code that would
    change its weight in place (a merge) fails instead of silently writing into a temporary."""

    def __init__(self, in_features: int, out_features: int, bias: bool, quant_type: str,
                 compute_dtype: torch.dtype = torch.bfloat16, device=None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.compute_dtype = quant_type, compute_dtype
        (dshape, ddtype), (sshape, sdtype) = quantized_shapes(quant_type, out_features, in_features)
        self.qweight = nn.Parameter(torch.empty(dshape, dtype=ddtype, device=device), requires_grad=False)
        self.qscale = nn.Parameter(torch.empty(sshape, dtype=sdtype, device=device), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str, compute_dtype: torch.dtype) -> QuantizedLinear:
        """A quantised copy of `linear` (a `meta` Linear gives a `meta` one, to be filled by loading)."""
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, quant_type, compute_dtype,
                device=linear.weight.device)
        if not linear.weight.is_meta:
            data, scale = quantize(linear.weight.detach(), quant_type)
            q.qweight.data, q.qscale.data = data, scale
            if linear.bias is not None:
                q.bias.data = linear.bias.detach().to(compute_dtype)
        return q

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.qweight, self.qscale, self.quant_type, (self.out_features, self.in_features),
                          dtype or self.compute_dtype)

    @torch.no_grad()
    def dequantize_in_place(self) -> None:
        """Become a plain nn.Linear holding the dequantised weight in the compute dtype (for merging a LoRA into it).
        In place, so that the model and a LoRA wrapping this layer keep referring to the same module."""
        weight = self.dequantized_weight()
        del self.qweight, self.qscale
        self.__class__ = nn.Linear
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(self.compute_dtype) if self.bias is not None else None
        x = x.to(self.compute_dtype)
        if bias is not None and bias.requires_grad:
            return F.linear(x, self.dequantized_weight(), bias)
        spec = (self.quant_type, (self.out_features, self.in_features), self.compute_dtype)
        return frozen_linear(x, bias, lambda data, scale: dequantize(data, scale, *spec), self.qweight, self.qscale)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.quant_type}, compute_dtype={self.compute_dtype}")
