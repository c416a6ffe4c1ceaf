"""`--network_module networks.control_lora_flux`: train a BFL control LoRA (FLUX.1 Canny / Depth on dev) with
flux_train_network.py; `--network_args control=canny` (default) or `control=depth` names what it learns.

The network is library/lora/control.py's `ControlLoRA` with sd-scripts' network API: img_in widened from 64 to 128
features (the new half zero), a LoRA with a bias on every Linear (embedders and final layer included) and trained
QK-norm scales; saved in BFL's control-LoRA layout, which BFL's CLI, diffusers' FluxControlPipeline and ComfyUI load.
The scale is B A (BFL's format has no alpha: --network_alpha is ignored); --network_dim is the rank (BFL: 128,
clipped to each layer's size). Trained at strength 1; inference applies BFL's default 0.85 unless told otherwise.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from library.formats.control_lora import CONTROL_LORA_ARCHITECTURES, read_control_lora, write_control_lora
from library.formats.safetensors_io import load_tensors, save_file_atomic
from library.lora.control import ControlLoRA

logger = logging.getLogger(__name__)
DEFAULT_RANK = 128


def control_kind(kwargs: dict) -> str:
    kind = str(kwargs.get("control") or "canny").strip().lower()
    if kind not in CONTROL_LORA_ARCHITECTURES:
        raise ValueError(f"network_args control={kind}: expected canny or depth")
    return kind


class ControlLoRANetwork(ControlLoRA):
    """ControlLoRA with the calls flux_train_network.py makes on a network."""

    def __init__(self, flux: nn.Module, rank: int, multiplier: float, kind: str, weights=None, source: str = ""):
        super().__init__(flux, rank=rank, multiplier=multiplier, weights=weights, source=source or "network")
        self.kind = kind

    def apply_to(self, text_encoders, flux, apply_text_encoder: bool = True, apply_unet: bool = True) -> None:
        super().apply_to(flux)

    def prepare_optimizer_params_with_multiple_te_lrs(self, text_encoder_lr, unet_lr, default_lr):
        lr = unet_lr if unet_lr is not None else default_lr
        return [{"params": list(self.parameters()), "lr": lr}], ["unet"]

    def load_weights(self, file: str | os.PathLike) -> str:
        weights = read_control_lora(load_tensors(file), str(file))
        with torch.no_grad():
            for module in self.loras:
                if module.name not in weights.loras:
                    raise ValueError(f"{file}: no control LoRA for {module.name}")
                a, b, bias = weights.loras[module.name]
                if a.shape != module.lora_A.shape:
                    raise ValueError(f"{file}: {module.name} has rank {a.shape[0]}, this network "
                                     f"{module.lora_A.shape[0]} (give the same --network_dim)")
                module.lora_A.copy_(a)
                module.lora_B.copy_(b)
                module.bias.copy_(bias if bias is not None else torch.zeros_like(module.bias))
            for name, param in zip(self.norm_names, self.norms):
                param.copy_(weights.norms[name])
        return f"{len(self.loras)} Linears and {len(self.norms)} norm scales"

    def save_weights(self, file: str | os.PathLike, dtype: torch.dtype | None, metadata: dict[str, str] | None
                     ) -> None:
        metadata = dict(metadata or {})
        if metadata:  # what loaders read to tell Canny from Depth (BFL's own files carry no metadata)
            metadata["modelspec.architecture"] = CONTROL_LORA_ARCHITECTURES[self.kind]
        save_file_atomic(write_control_lora(self.to_weights(dtype)), file, metadata or None)

    def apply_max_norm_regularization(self, max_norm_value, device):
        raise ValueError("--scale_weight_norms is not supported for control LoRAs")

    def set_enabled(self, is_enabled: bool) -> None:
        self.set_multiplier(1.0 if is_enabled else 0.0)


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, ae, text_encoders,
                   flux: nn.Module, neuron_dropout: float | None = None, **kwargs) -> ControlLoRANetwork:
    kind = control_kind(kwargs)
    rank = DEFAULT_RANK if network_dim is None else int(network_dim)
    if neuron_dropout:
        logger.warning("--network_dropout is not used by control LoRAs")
    return ControlLoRANetwork(flux, rank, multiplier, kind)


def create_network_from_weights(multiplier: float, file, ae, text_encoders, flux: nn.Module,
                                weights_sd: dict | None = None, for_inference: bool = False, **kwargs):
    weights_sd = weights_sd if weights_sd is not None else load_tensors(file)
    weights = read_control_lora(weights_sd, str(file))
    return ControlLoRANetwork(flux, 1, multiplier, control_kind(kwargs), weights, str(file)), weights_sd
