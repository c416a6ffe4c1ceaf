"""BFL control LoRAs (FLUX.1-Canny-dev-lora, FLUX.1-Depth-dev-lora and the ones our trainer writes): the file
layout, its detection, and its diffusers names.

Layout (BFL names, no prefix): for every Linear of the transformer (img_in, txt_in, time_in.*, vector_in.*,
guidance_in.*, every block Linear, final_layer.linear, final_layer.adaLN_modulation.1)
`<name>.lora_A.weight` (r, in), `<name>.lora_B.weight` (out, r) and `<name>.lora_B.bias` (out,); plus the full
values of every QK-norm scale (`...query_norm.scale`, `...key_norm.scale`), which replace the base model's.
`img_in.lora_A.weight` takes 128 features: the base img_in is zero-padded from 64 to 128 inputs. Detection is
diffusers' test: LoRA keys together with a `query_norm.scale` key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

from library.formats.diffusers_keys import (DOUBLE_BLOCK_MAP, DOUBLE_BLOCK_NORMS, GLOBAL_MAP, SINGLE_BLOCK_MAP,
                                            SINGLE_BLOCK_NORMS, SWAPPED_HALVES)

PREFIXES = ("model.diffusion_model.", "diffusion_model.")
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_B.bias")
NORM_SUFFIXES = ("query_norm.scale", "key_norm.scale")
CONTROL_LORA_ARCHITECTURES = {"canny": "flux-1-canny-dev/lora", "depth": "flux-1-depth-dev/lora"}


def _strip(key: str) -> str:
    for prefix in PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def is_control_lora(keys: Iterable[str]) -> bool:
    """LoRA (lora_A / lora_B) keys together with a `query_norm.scale` key: a BFL control LoRA."""
    keys = list(keys)
    return any(".lora_A." in k or ".lora_B." in k for k in keys) and any(k.endswith("query_norm.scale") for k in keys)


@dataclass
class ControlLoRAWeights:
    """A control LoRA file read into parts: per Linear (A (r, in), B (out, r), bias (out,) or None), per norm scale
    its replacement value."""

    loras: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
    norms: dict[str, torch.Tensor]

    @property
    def in_channels(self) -> int:
        return self.loras["img_in"][0].shape[1] if "img_in" in self.loras else 0


def read_control_lora(state_dict: Mapping[str, torch.Tensor], source: str = "the control LoRA") -> ControlLoRAWeights:
    """Split a control LoRA state dict into its Linears and norm scales; raises ValueError naming a key the layout
    does not have or a Linear with a missing or mis-shaped half."""
    loras: dict[str, dict[str, torch.Tensor]] = {}
    norms: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name = _strip(key)
        if name.endswith(NORM_SUFFIXES):
            norms[name] = value
            continue
        for suffix in LORA_SUFFIXES:
            if name.endswith(suffix):
                loras.setdefault(name[:-len(suffix)], {})[suffix] = value
                break
        else:
            raise ValueError(f"{source}: key {key} is neither a LoRA half (*.lora_A.weight, *.lora_B.weight, "
                             "*.lora_B.bias) nor a QK-norm scale (*query_norm.scale, *key_norm.scale)")
    out = {}
    for module, parts in loras.items():
        a, b = parts.get(".lora_A.weight"), parts.get(".lora_B.weight")
        if a is None or b is None:
            raise ValueError(f"{source}: {module} has {'no lora_A' if a is None else 'no lora_B'}.weight")
        bias = parts.get(".lora_B.bias")
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"{source}: {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not "
                             "chain (expected (r, in) and (out, r))")
        if bias is not None and tuple(bias.shape) != (b.shape[0],):
            raise ValueError(f"{source}: {module}.lora_B.bias {tuple(bias.shape)}: expected ({b.shape[0]},)")
        out[module] = (a, b, bias)
    if not out or not norms:
        raise ValueError(f"{source}: not a control LoRA (expected lora_A/lora_B keys and QK-norm scales)")
    return ControlLoRAWeights(out, norms)


def write_control_lora(weights: ControlLoRAWeights) -> dict[str, torch.Tensor]:
    """The file's state dict (BFL names) of `weights`."""
    sd = {}
    for module, (a, b, bias) in weights.loras.items():
        sd[f"{module}.lora_A.weight"], sd[f"{module}.lora_B.weight"] = a, b
        if bias is not None:
            sd[f"{module}.lora_B.bias"] = bias
    sd.update(weights.norms)
    return sd


def _diffusers_names(module: str) -> tuple[str, ...]:
    if module in GLOBAL_MAP:
        return (GLOBAL_MAP[module],)
    kind, index, rest = module.split(".", 2)
    table, prefix = ((DOUBLE_BLOCK_MAP, "transformer_blocks") if kind == "double_blocks"
                     else (SINGLE_BLOCK_MAP, "single_transformer_blocks"))
    if rest not in table:
        raise ValueError(f"control LoRA: {module} is no Linear of the FLUX.1 transformer")
    return tuple(f"{prefix}.{index}.{d}" for d in table[rest])


def _diffusers_norm(name: str) -> str:
    kind, index, rest = name.split(".", 2)
    table, prefix = ((DOUBLE_BLOCK_NORMS, "transformer_blocks") if kind == "double_blocks"
                     else (SINGLE_BLOCK_NORMS, "single_transformer_blocks"))
    return f"{prefix}.{index}.{table[rest]}"


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat((b, a), dim=0)


def control_lora_to_diffusers(weights: ControlLoRAWeights, hidden_size: int) -> dict[str, torch.Tensor]:
    """diffusers' PEFT names (`transformer.<module>.lora_A.weight`, `.lora_B.weight`, `.lora_B.bias`, norm weights)
    of a control LoRA: fused q/k/v (and the single blocks' MLP input) share A and split B and its bias; the final
    adaLN's B and bias have their halves swapped (diffusers: scale then shift). For FluxControlPipeline's
    `load_lora_weights` on models of any size (diffusers' own converter assumes FLUX.1's 19/38 blocks and 3072)."""
    out = {}
    for module, (a, b, bias) in weights.loras.items():
        names = _diffusers_names(module)
        if module in SWAPPED_HALVES:
            b, bias = _swap_halves(b), None if bias is None else _swap_halves(bias)
        if len(names) == 1:
            bs, biases = [b], [bias]
        else:
            sizes = [hidden_size] * 3 + ([b.shape[0] - 3 * hidden_size] if len(names) == 4 else [])
            bs = list(b.split(sizes))
            biases = list(bias.split(sizes)) if bias is not None else [None] * len(names)
        for name, part_b, part_bias in zip(names, bs, biases):
            out[f"transformer.{name}.lora_A.weight"] = a
            out[f"transformer.{name}.lora_B.weight"] = part_b
            if part_bias is not None:
                out[f"transformer.{name}.lora_B.bias"] = part_bias
    for name, value in weights.norms.items():
        out[f"transformer.{_diffusers_norm(name)}"] = value
    return out
