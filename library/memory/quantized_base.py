"""A FLUX transformer base stored as nf4 or int8 (library/memory/quantized_linear.py), quantised while it loads.

Every Linear inside the double and single blocks is quantised; the embedders, the final layer, norms and biases stay
in the compute dtype (about 0.5% of FLUX.1's weights, and the first and last layers are the most sensitive). The
file is read one tensor at a time and each block weight is quantised as soon as it is read, so host memory holds
the quantised model plus one tensor in its stored dtype, never the whole model in a float type.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from library.formats.safetensors_io import ModelFileError, assign_weights
from library.memory.quantized_linear import QuantizedLinear, check_quant_type, quantize_parts
from library.models.checkpoint import FluxCheckpointInfo, analyze_checkpoint, build_transformer
from library.models.checkpoint_stream import Readers, transformer_entries
from library.models.transformer import Flux

logger = logging.getLogger(__name__)

def block_linears(flux: nn.Module):
    """(qualified name, Linear) of every Linear inside the transformer's blocks."""
    for stack in ("double_blocks", "single_blocks"):
        for name, module in getattr(flux, stack).named_modules():
            if type(module) is nn.Linear:
                yield f"{stack}.{name}", module


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def quantize_linears(module: nn.Module, quant_type: str, compute_dtype: torch.dtype) -> nn.Module:
    """Replace every plain Linear inside `module` by a QuantizedLinear (`meta` ones stay on `meta`, to be loaded
    into; loaded ones are quantised one by one). Returns `module`."""
    check_quant_type(quant_type)
    for name, linear in [(n, m) for n, m in module.named_modules() if type(m) is nn.Linear]:
        _replace(module, name, QuantizedLinear.from_linear(linear, quant_type, compute_dtype))
    return module


def quantize_blocks(flux: nn.Module, quant_type: str, compute_dtype: torch.dtype) -> nn.Module:
    """quantize_linears on the transformer's blocks; the other floating tensors cast to `compute_dtype`."""
    quantize_linears(flux.double_blocks, quant_type, compute_dtype)
    quantize_linears(flux.single_blocks, quant_type, compute_dtype)
    for m in flux.modules():
        if isinstance(m, QuantizedLinear):
            continue
        for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]:
            if t.is_floating_point() and t.dtype != compute_dtype and not t.is_meta:
                t.data = t.data.to(compute_dtype)
    return flux


def load_quantized_transformer(path: str | os.PathLike, quant_type: str, compute_dtype: torch.dtype,
                               info: FluxCheckpointInfo | None = None,
                               quantize_device: str | torch.device = "cpu") -> Flux:
    """The transformer of `path` (any layout analyze_checkpoint accepts) with its block Linears in `quant_type`,
    on the CPU, quantised tensor by tensor as the file is read. `quantize_device` "cuda" quantises each weight on
    the GPU (bitsandbytes' CUDA kernels; the CPU path takes ~0.1 us per weight and thread, minutes for FLUX.1)."""
    info = info or analyze_checkpoint(path)
    with torch.device("meta"):
        flux = quantize_blocks(build_transformer(info.params), quant_type, compute_dtype)
    quantized = {name for name, m in flux.named_modules() if isinstance(m, QuantizedLinear)}
    readers = Readers()
    state_dict = {}
    try:
        entries, _ = transformer_entries(info.path, readers)
        for entry in entries:
            owner, _, leaf = entry.key.rpartition(".")
            if owner in quantized and leaf == "weight":
                module = flux.get_submodule(owner)
                if tuple(entry.shape) != (module.out_features, module.in_features):
                    raise ModelFileError(f"{info.path}: {entry.key} has shape {tuple(entry.shape)}, the model "
                                         f"{(module.out_features, module.in_features)}")
                # part by part (a diffusers q, k, v, mlp), never the fused weight as stored
                data, scale = quantize_parts(entry.parts(), quant_type, module.out_features, quantize_device)
                state_dict[f"{owner}.qweight"], state_dict[f"{owner}.qscale"] = data.cpu(), scale.cpu()
            else:
                tensor = entry.read()
                state_dict[entry.key] = tensor.to(compute_dtype) if tensor.is_floating_point() else tensor
                del tensor
    finally:
        readers.close()
    assign_weights(flux, state_dict, info.path)
    return flux.eval()


def has_quantized_linears(model: nn.Module) -> bool:
    return any(isinstance(m, QuantizedLinear) for m in model.modules())


def dequantize_for_merge(loras, allowed: bool, option: str, what: str) -> int:
    """Before a LoRA merge: each LoRA module's wrapped QuantizedLinear becomes a plain Linear holding its dequantised
    weight (`allowed`), or the merge is refused, since adding a LoRA to nf4/int8 codes would round most of it
    away. `loras`: the LoRA modules about to be merged (`org_module` each); `option`: the flag that allows it;
    `what`: the merge, for the message. Returns the number of Linears dequantised."""
    targets = [lora for lora in loras if isinstance(lora.org_module, QuantizedLinear)]
    if targets and not allowed:
        kind = targets[0].org_module.quant_type
        raise ValueError(f"{what}: the base is stored in {kind}, which a merged LoRA would be rounded into; hook the "
                         f"LoRA instead, or add {option} to dequantize the {len(targets)} Linear(s) it changes to "
                         "the compute dtype first (more memory)")
    for lora in targets:
        lora.org_module.dequantize_in_place()
    return len(targets)
