"""LyCORIS files (LoKr, LoHa, LoCon, DoRA; what `--network_module lycoris.kohya` saves) applied to our models for
inference, without the lycoris package: hooked (multiplier changeable) or merged into the weights.

Each module's update comes from library/formats/lycoris_weights.py (the formulas ComfyUI's loader uses). Hooked, a
Linear computes y = org(x) + F.linear(x, W' - W), W' the updated weight at the current multiplier; W' - W is
computed once per multiplier and kept (the size of the Linear's weight, so merging is the lighter choice for big
models). Training such files goes through lycoris itself (`--network_module lycoris.kohya`).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from library.formats.lycoris_weights import LycorisWeights, read_lycoris
from networks.lora_flux import kohya_named_linears

logger = logging.getLogger(__name__)


class LycorisDeltaModule(nn.Module):
    """One file module hooked into its Linear (the original forward is kept and restored)."""

    def __init__(self, weights: LycorisWeights, org_module: nn.Linear, multiplier: float):
        super().__init__()
        self.lora_name, self.weights, self.multiplier = weights.name, weights, multiplier
        self.__dict__["org_module"] = org_module  # not a child: the network must not own the base weights
        self.__dict__["org_forward"] = None
        self._cache: tuple[float, torch.Tensor] | None = None

    def weight_delta(self) -> torch.Tensor:
        """W' - W at the current multiplier, float32 on the base weight's device."""
        if self._cache is None or self._cache[0] != self.multiplier:
            w = self.org_module.weight.detach()
            self._cache = (self.multiplier, self.weights.updated(w, self.multiplier) - w.float())
        return self._cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.org_forward(x) + F.linear(x, self.weight_delta().to(x.device, x.dtype))

    def apply_to(self) -> None:
        org = self.org_module
        self.__dict__["org_forward"] = org.forward
        org.forward = self.forward

    def restore(self) -> None:
        del self.org_module.forward
        self.__dict__["org_forward"] = None

    @torch.no_grad()
    def merge_to(self, device: torch.device | str | None = None) -> None:
        """W = W' in fp32 on `device`, stored back in the weight's own dtype and device."""
        weight = self.org_module.weight
        device = torch.device(device) if device is not None else weight.device
        weight.copy_(self.weights.updated(weight.to(device), self.multiplier).to(weight.device, weight.dtype))


class LycorisFileNetwork(nn.Module):
    """The modules of one LyCORIS file over FLUX, CLIP-L and T5 (`lora_unet_*`, `lora_te1_*`, `lora_te3_*`)."""

    def __init__(self, weights_sd: dict[str, torch.Tensor], text_encoders, flux: nn.Module, multiplier: float = 1.0,
                 source: str = "LyCORIS file"):
        super().__init__()
        linears = kohya_named_linears(text_encoders, flux)
        modules = read_lycoris(weights_sd)
        unknown = sorted(set(modules) - set(linears))
        if unknown:
            raise ValueError(f"{source}: {len(unknown)} module(s) match no layer of these models, e.g. {unknown[0]}")
        self.loras = [LycorisDeltaModule(w, linears[name], multiplier) for name, w in modules.items()]
        algos = sorted({w.algo + ("+dora" if "dora_scale" in w.tensors else "") for w in modules.values()})
        logger.info("%s: %d LyCORIS modules (%s)", source, len(self.loras), ", ".join(algos))

    def apply_to(self) -> None:
        for lora in self.loras:
            lora.apply_to()

    def restore(self) -> None:
        for lora in self.loras:
            lora.restore()

    def merge_to(self, device: torch.device | str | None = None) -> None:
        for lora in self.loras:
            lora.merge_to(device)

    def set_multiplier(self, multiplier: float) -> None:
        for lora in self.loras:
            lora.multiplier = multiplier
