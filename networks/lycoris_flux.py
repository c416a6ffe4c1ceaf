"""LyCORIS files (LoKr, LoHa, LoCon, DoRA; what `--network_module lycoris.kohya` saves) applied to our models for
inference, without the lycoris package: hooked (multiplier changeable) or merged into the weights.

Each module's update comes from library/formats/lycoris_weights.py (the formulas ComfyUI's loader uses). Hooked, a
Linear computes y = org(x) + ΔW' x, ΔW' = W' - W at the current multiplier, rebuilt on each call and dropped after
it (one layer's worth at a time, so a hooked file costs only its own tensors); a LoKr without DoRA never builds ΔW
(the Kronecker identity in `LycorisWeights.lokr_product`). Training such files goes through lycoris itself
(`--network_module lycoris.kohya`).
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
    """One file module hooked into its Linear (the original forward is kept and restored). Its tensors are buffers,
    so `.to(device)` moves them with the network."""

    def __init__(self, weights: LycorisWeights, org_module: nn.Linear, multiplier: float):
        super().__init__()
        self.lora_name, self.multiplier = weights.name, multiplier
        self.leaves = list(weights.tensors)
        for leaf, tensor in weights.tensors.items():
            self.register_buffer(leaf.replace(".", "_"), tensor)
        self.__dict__["org_module"] = org_module  # not a child: the network must not own the base weights
        self.__dict__["org_forward"] = None

    @property
    def weights(self) -> LycorisWeights:
        return LycorisWeights(self.lora_name, {leaf: getattr(self, leaf.replace(".", "_")) for leaf in self.leaves})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.org_forward(x)
        w = self.weights
        if w.algo == "lokr" and not w.has_dora:
            return out + self.multiplier * w.lokr_product(x)
        base = self.org_module.weight.detach()
        delta = w.updated(base, self.multiplier) - base.float()
        return out + F.linear(x, delta.to(x.dtype))

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
        self.loras = nn.ModuleList(LycorisDeltaModule(w, linears[name], multiplier) for name, w in modules.items())
        algos = sorted({w.algo + ("+dora" if w.has_dora else "") for w in modules.values()})
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
