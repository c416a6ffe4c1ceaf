"""GGUF-quantized transformer blocks: Linear weights kept as their stored bytes, dequantized per layer on the fly.

A block Linear whose weight a .gguf file stores quantized (Q8_0, Q4_K, ...) becomes a `GGUFLinear`: its weight is a
frozen uint8 Parameter holding the file's bytes (so block swapping moves it as flat bytes like any other
parameter), dequantized to the compute dtype for each call. Everything else (norm scales, biases, the embedders and
the final layer, all small) is dequantized once at load into the compute dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from library.formats.gguf_io import GGUFTensorReader, read_gguf_header
from library.formats.gguf_quants import dequantize, gguf_type, raw_shape
from library.formats.safetensors_io import ModelFileError, assign_weights
from library.models.checkpoint import FluxCheckpointInfo, analyze_checkpoint, build_transformer
from library.memory.frozen_linear import frozen_linear
from library.models.transformer import Flux

_BLOCKS = ("double_blocks.", "single_blocks.")


class GGUFLinear(nn.Linear):
    """A frozen Linear whose weight is GGUF-quantized bytes, dequantized to `compute_dtype` for each call."""

    qtype: str = "Q8_0"
    compute_dtype: torch.dtype = torch.bfloat16

    @classmethod
    def convert(cls, linear: nn.Linear, qtype: str, compute_dtype: torch.dtype) -> "GGUFLinear":
        """Turn `linear` (in place) into a GGUFLinear with an empty uint8 weight on its device, to be assigned."""
        shape = raw_shape((linear.out_features, linear.in_features), gguf_type(qtype))
        linear.__class__ = cls
        linear.qtype, linear.compute_dtype = qtype, compute_dtype
        linear.weight = nn.Parameter(torch.empty(shape, dtype=torch.uint8, device=linear.weight.device),
                                     requires_grad=False)
        return linear

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.weight, self.qtype, (self.out_features, self.in_features), dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(self.compute_dtype) if self.bias is not None else None
        shape, qtype, cd = (self.out_features, self.in_features), self.qtype, self.compute_dtype
        return frozen_linear(x.to(cd), bias, lambda raw: dequantize(raw, qtype, shape, cd), self.weight)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, qtype={self.qtype}"


def load_gguf_transformer(path, compute_dtype: torch.dtype, device: str | torch.device = "cpu",
                          info: FluxCheckpointInfo | None = None) -> Flux:
    """A FLUX transformer from a .gguf file: quantized block Linears as GGUFLinear, the rest in `compute_dtype`.
    Built on `meta` and filled one tensor at a time, so the load holds the file's bytes once."""
    info = info or analyze_checkpoint(path)
    if info.layout != "gguf":
        raise ModelFileError(f"{info.path}: not a GGUF file")
    header = read_gguf_header(info.path)
    with torch.device("meta"):
        model = build_transformer(info.params)
    modules = dict(model.named_modules())
    state_dict = {}
    with GGUFTensorReader(header) as reader:
        for key in info.file_keys[info.path]:
            name, t = key[len(info.prefix):], header.tensors[key]
            owner, _, leaf = name.rpartition(".")
            linear = modules.get(owner)
            if (leaf == "weight" and t.qtype.quantized and name.startswith(_BLOCKS) and isinstance(linear, nn.Linear)
                    and t.shape == tuple(linear.weight.shape)):
                GGUFLinear.convert(linear, t.qtype.name, compute_dtype)
                state_dict[name] = reader.raw(key)
            else:  # small tensors; a mis-shaped one is reported by assign_weights with the file's shape
                state_dict[name] = reader.dequantized(key, compute_dtype)
    assign_weights(model, state_dict, info.path)
    del state_dict
    return model.to(device).eval()


def check_swappable_gguf(info: FluxCheckpointInfo) -> None:
    """Block swapping gives every block of a stack the same flat layout: refuse, naming a tensor, a GGUF file whose
    blocks of one stack store a weight in different types (ComfyUI-GGUF's files choose types by tensor name, so
    theirs are alike)."""
    if info.layout != "gguf":
        return
    header = read_gguf_header(info.path)
    first: dict[tuple[str, str], tuple[str, str]] = {}  # (stack, name inside the block) -> (name, type) seen first
    for key in info.file_keys[info.path]:
        name = key[len(info.prefix):]
        stack, _, rest = name.partition(".")
        if stack + "." not in _BLOCKS:
            continue
        qtype = header.tensors[key].qtype.name
        seen, seen_type = first.setdefault((stack, rest.partition(".")[2]), (name, qtype))
        if seen_type != qtype:
            raise ModelFileError(f"{info.path}: --blocks_to_swap needs the blocks of each stack stored alike, but "
                                 f"{seen} is {seen_type} and {name} is {qtype}")


def gguf_linears(model: nn.Module) -> list[GGUFLinear]:
    return [m for m in model.modules() if isinstance(m, GGUFLinear)]
