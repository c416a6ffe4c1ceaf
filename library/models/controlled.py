"""The transformer steered by one or more ControlNets (`ControlledFlux`): training, sample images, inference and
the memory planner use this one wrapper, for sd-scripts' ControlNets and for diffusers-layout ones.

Each `ControlUnit` is one ControlNet pass: a ControlNet, its condition, scale, active range and (Union) mode. One
Union model with several control images is several units sharing the model. Every unit's residuals are spread over
the base's blocks by its model's convention and summed (flux-family.md 1.8):

- interval (diffusers, InstantX, alimama, jasperai): with n residuals for D blocks, block b <- r[b // ceil(D / n)];
  the same for single blocks. With n = 6 and D = 19 the step is 4, so r[5] is never used (alimama's 6 blocks).
- repeat (sd-scripts / XLabs): block b <- r[b % n].

Residuals enter the image tokens only; on a Kontext base (`KontextFlux` inside) only the target tokens, which come
first (library/models/transformer.py adds a residual shorter than the image stream to its first tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import torch
from torch import nn

from library.models.transformer import FluxWrapper

# the condition of one unit: a tensor, or a function (width, height) -> tensor for sampling at any size; sd-scripts'
# ControlNets take (B, 3, H, W) pixels in [-1, 1], diffusers-layout ones (B, N, 64 or 68) packed latents
Control = Union[torch.Tensor, Callable[[int, int], torch.Tensor]]


def residual_index(block: int, num_blocks: int, num_residuals: int, mapping: str) -> int:
    """Which residual base block `block` (of `num_blocks`) receives from `num_residuals`."""
    if mapping == "repeat":
        return block % num_residuals
    if mapping == "interval":
        return block // math.ceil(num_blocks / num_residuals)
    raise ValueError(f"unknown residual mapping {mapping!r} (interval or repeat)")


def residual_map(num_blocks: int, num_residuals: int, mapping: str) -> list[int]:
    return [residual_index(b, num_blocks, num_residuals, mapping) for b in range(num_blocks)]


def spread_residuals(units: Sequence[tuple[Sequence[torch.Tensor], str]], num_blocks: int) -> list[torch.Tensor]:
    """One residual per base block: the sum over units of (residuals, mapping). Blocks fed by the same residuals
    share one tensor (no per-block copies)."""
    out, made = [], {}
    for b in range(num_blocks):
        picks = tuple((u, residual_index(b, num_blocks, len(rs), m)) for u, (rs, m) in enumerate(units) if rs)
        if picks not in made:
            parts = [units[u][0][j] for u, j in picks]
            made[picks] = parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)
        out.append(made[picks])
    return out


def active_at(step: int, num_steps: int, start: float, end: float) -> bool:
    """diffusers' rule: a ControlNet acts at step i of N iff i / N >= start and (i + 1) / N <= end."""
    return step / num_steps >= start and (step + 1) / num_steps <= end


@dataclass
class ControlUnit:
    controlnet: nn.Module
    control: Control | None = None
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: int | None = None  # Union models

    @property
    def mapping(self) -> str:
        return getattr(self.controlnet, "residual_mapping", "repeat")


class ControlledFlux(FluxWrapper):
    """The transformer with ControlNet residuals added, with the transformer's call signature.

    `ControlledFlux(flux, controlnet, control, scale)` is one unit; `ControlledFlux(flux, units=[...])` several.
    Per call, `controlnet_cond` (training: each batch's condition, for the first unit) and `controlnet_mode`
    override the bound ones. `bind_schedule(timesteps)` (sampling) makes each unit's start/end range count steps
    of that schedule; without one every unit acts at every call (training)."""

    def __init__(self, flux: nn.Module, controlnet: nn.Module | None = None, control: Control | None = None,
                 scale: float = 1.0, *, units: Sequence[ControlUnit] | None = None):
        super().__init__(flux)
        if (controlnet is None) == (units is None):
            raise ValueError("ControlledFlux: give one controlnet or a list of units")
        self.units = list(units) if units is not None else [ControlUnit(controlnet, control, scale)]
        # registered once each, so .to() / .eval() reach every ControlNet (a Union model used twice is one module)
        self.controlnets = nn.ModuleList(dict.fromkeys(u.controlnet for u in self.units))
        self._prepared: dict[tuple[int, int, int], torch.Tensor] = {}
        self._schedule: list[float] | None = None

    # the one-unit attributes of the sd-scripts wrapper
    @property
    def controlnet(self) -> nn.Module:
        return self.units[0].controlnet

    @property
    def scale(self) -> float:
        return self.units[0].scale

    def bind_schedule(self, timesteps: Sequence[float] | None) -> "ControlledFlux":
        """The sampling schedule (N + 1 values from 1 to 0), so that start/end know which step a call is."""
        self._schedule = list(timesteps) if timesteps is not None else None
        return self

    def step_of(self, t: float) -> tuple[int, int] | None:
        if self._schedule is None:
            return None
        steps = self._schedule[:-1]
        return min(range(len(steps)), key=lambda i: abs(steps[i] - t)), len(steps)

    def control_tensor(self, index: int, width: int, height: int) -> torch.Tensor:
        control = self.units[index].control
        if control is None:
            raise ValueError("ControlledFlux: no conditioning image (pass controlnet_cond or give a control)")
        if torch.is_tensor(control):
            return control
        key = (index, width, height)
        if key not in self._prepared:
            self._prepared = {k: v for k, v in self._prepared.items() if k[1:] == (width, height)}
            self._prepared[key] = control(width, height)
        return self._prepared[key]

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, txt_attention_mask=None, *,
                controlnet_cond: torch.Tensor | None = None, controlnet_mode=None, **kwargs):
        step = None if self._schedule is None else self.step_of(float(timesteps[0]))  # no sync in training
        spread = {"double": [], "single": []}
        for i, unit in enumerate(self.units):
            if unit.scale == 0 or (step is not None and not active_at(*step, unit.start, unit.end)):
                continue
            cond = controlnet_cond if i == 0 and controlnet_cond is not None else None
            if cond is None:
                rows, cols = (int(v) + 1 for v in img_ids[0, -1, 1:].tolist())  # last token: the bottom-right one
                cond = self.control_tensor(i, cols * 16, rows * 16)
                cond = cond.expand(img.shape[0], *cond.shape[1:])
            mode = controlnet_mode if i == 0 and controlnet_mode is not None else unit.mode
            extra = {} if mode is None else {"mode": mode}
            double, single = unit.controlnet(img, img_ids, cond.to(img.device, img.dtype), txt, txt_ids, timesteps,
                                             y, guidance, txt_attention_mask, **extra)
            if unit.scale != 1.0:
                double, single = [r * unit.scale for r in double], [r * unit.scale for r in single]
            spread["double"].append((double, unit.mapping))
            spread["single"].append((single, unit.mapping))
        p = self.flux.params
        double = spread_residuals(spread["double"], p.depth) if any(r for r, _ in spread["double"]) else None
        single = (spread_residuals(spread["single"], p.depth_single_blocks)
                  if any(r for r, _ in spread["single"]) else None)
        return self.flux(img, img_ids, txt, txt_ids, timesteps, y, guidance, txt_attention_mask,
                         double_block_residuals=double, single_block_residuals=single, **kwargs)
