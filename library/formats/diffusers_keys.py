"""Explicit mapping between the BFL and diffusers key layouts of the FLUX.1 transformer (reference 5.10).

One table serves both directions. A BFL tensor is either renamed, concatenated from several diffusers tensors
along dim 0 (fused qkv, single-block linear1), or has its two halves swapped (the final adaLN: diffusers stores
scale then shift, BFL shift then scale).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch

GLOBAL_MAP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
SWAPPED_HALVES = {"final_layer.adaLN_modulation.1"}

DOUBLE_BLOCK_MAP = {
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
}
DOUBLE_BLOCK_NORMS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
SINGLE_BLOCK_MAP = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}
SINGLE_BLOCK_NORMS = {
    "norm.query_norm.scale": "attn.norm_q.weight",
    "norm.key_norm.scale": "attn.norm_k.weight",
}
# Chroma: its approximator (the same names in both layouts but for each layer's MLP and norm scale); its blocks and
# final layer are FLUX's without the modulation Linears, whose rules then find nothing
APPROXIMATOR = "distilled_guidance_layer"
APPROXIMATOR_LAYER_MAP = {"in_layer": "linear_1", "out_layer": "linear_2"}


@dataclass(frozen=True)
class KeyRule:
    bfl: str
    diffusers: tuple[str, ...]  # several = concatenated along dim 0 in this order
    swap_halves: bool = False


def key_rules(num_double: int, num_single: int, num_approximator: int = 0) -> list[KeyRule]:
    """Every BFL <-> diffusers rule for a model with the given block counts (weights, biases and norm scales);
    `num_approximator`: the layers of Chroma's approximator (0: none)."""
    rules: list[KeyRule] = []

    def linear(bfl: str, diff: Iterable[str], swap: bool = False):
        diff = tuple(diff)
        for suffix in (".weight", ".bias"):
            rules.append(KeyRule(bfl + suffix, tuple(d + suffix for d in diff), swap))

    for bfl, diff in GLOBAL_MAP.items():
        linear(bfl, (diff,), bfl in SWAPPED_HALVES)
    for i in range(num_double):
        for bfl, diff in DOUBLE_BLOCK_MAP.items():
            linear(f"double_blocks.{i}.{bfl}", (f"transformer_blocks.{i}.{d}" for d in diff))
        for bfl, diff in DOUBLE_BLOCK_NORMS.items():
            rules.append(KeyRule(f"double_blocks.{i}.{bfl}", (f"transformer_blocks.{i}.{diff}",)))
    for i in range(num_single):
        for bfl, diff in SINGLE_BLOCK_MAP.items():
            linear(f"single_blocks.{i}.{bfl}", (f"single_transformer_blocks.{i}.{d}" for d in diff))
        for bfl, diff in SINGLE_BLOCK_NORMS.items():
            rules.append(KeyRule(f"single_blocks.{i}.{bfl}", (f"single_transformer_blocks.{i}.{diff}",)))
    if num_approximator:
        for name in ("in_proj", "out_proj"):
            linear(f"{APPROXIMATOR}.{name}", (f"{APPROXIMATOR}.{name}",))
    for i in range(num_approximator):
        for bfl, diff in APPROXIMATOR_LAYER_MAP.items():
            linear(f"{APPROXIMATOR}.layers.{i}.{bfl}", (f"{APPROXIMATOR}.layers.{i}.{diff}",))
        rules.append(KeyRule(f"{APPROXIMATOR}.norms.{i}.scale", (f"{APPROXIMATOR}.norms.{i}.weight",)))
    return rules


def count_approximator_layers(keys: Iterable[str]) -> int:
    """Layers of Chroma's approximator in either layout (0 for FLUX.1)."""
    idx = {int(m.group(1)) for k in keys if (m := re.match(rf"{APPROXIMATOR}\.layers\.(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def count_diffusers_blocks(keys: Iterable[str]) -> tuple[int, int]:
    double, single = set(), set()
    for k in keys:
        if m := re.match(r"transformer_blocks\.(\d+)\.", k):
            double.add(int(m.group(1)))
        elif m := re.match(r"single_transformer_blocks\.(\d+)\.", k):
            single.add(int(m.group(1)))
    return (max(double) + 1 if double else 0), (max(single) + 1 if single else 0)


def _swap(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat((b, a), dim=0)


class UnknownKeysError(KeyError):
    def __init__(self, keys: list[str]):
        super().__init__(keys)
        self.keys = keys


def diffusers_to_bfl(keys: Iterable[str], get: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a diffusers-layout transformer to BFL keys. `get(key)` returns one tensor, so a caller can read
    them lazily from a file and peak memory stays near one model. Unknown diffusers keys raise UnknownKeysError."""
    keys = set(keys)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for rule in key_rules(*count_diffusers_blocks(keys), count_approximator_layers(keys)):
        if not all(d in keys for d in rule.diffusers):
            continue
        parts = [get(d) for d in rule.diffusers]
        t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        out[rule.bfl] = _swap(t) if rule.swap_halves else t
        used.update(rule.diffusers)
    if unknown := sorted(keys - used):
        raise UnknownKeysError(unknown)
    return out


def diffusers_shapes_to_bfl(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The BFL key -> shape table of a diffusers file, from its header alone (for detection before loading)."""
    converted = diffusers_to_bfl(shapes, lambda k: torch.empty(shapes[k], device="meta"))
    return {k: tuple(v.shape) for k, v in converted.items()}


def bfl_to_diffusers(state_dict: Mapping[str, torch.Tensor], hidden_size: int) -> dict[str, torch.Tensor]:
    """Convert BFL keys to the diffusers layout (the inverse of diffusers_to_bfl)."""
    num_double = len({k.split(".")[1] for k in state_dict if k.startswith("double_blocks.")})
    num_single = len({k.split(".")[1] for k in state_dict if k.startswith("single_blocks.")})
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for rule in key_rules(num_double, num_single, count_approximator_layers(state_dict)):
        if rule.bfl not in state_dict:
            continue
        t = state_dict[rule.bfl]
        if rule.swap_halves:
            t = _swap(t)
        if len(rule.diffusers) == 1:
            out[rule.diffusers[0]] = t
        else:  # q, k, v (and the single blocks' MLP input, which takes the rest)
            sizes = [hidden_size] * 3 + ([t.shape[0] - 3 * hidden_size] if len(rule.diffusers) == 4 else [])
            out.update(zip(rule.diffusers, t.split(sizes, dim=0)))
        used.add(rule.bfl)
    if unknown := sorted(set(state_dict) - used):
        raise UnknownKeysError(unknown)
    return out
