"""Applying LoRA files to loaded models for inference: hooked (multiplier changeable) or merged into the weights."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from library.formats.control_lora import is_control_lora, read_control_lora
from library.formats.lycoris_weights import is_lycoris
from library.formats.safetensors_io import load_tensors, read_header
from library.memory.gguf_linear import GGUFLinear
from library.lora.control import DEFAULT_STRENGTH, ControlLoRA
from library.memory.quantized_base import dequantize_for_merge
from networks import lora_flux
from networks.lycoris_flux import LycorisFileNetwork

logger = logging.getLogger(__name__)


def parse_lora_spec(spec: str) -> tuple[Path, float]:
    """`path` or `path;multiplier` (sd-scripts' --lora_weights syntax)."""
    path, sep, mult = spec.rpartition(";") if ";" in spec else (spec, "", "")
    try:
        multiplier = float(mult) if sep else 1.0
    except ValueError:
        raise ValueError(f"--lora_weights {spec!r}: the multiplier after ';' must be a number") from None
    return Path(path), multiplier


def apply_loras(specs: list[str], flux: torch.nn.Module, clip_l, t5xxl, merge: bool,
                device: torch.device | str, dequantize: bool = False) -> list:
    """Load each LoRA file and either merge it into the base weights (`merge`) or hook it into the models.
    Merging into an nf4/int8 base is refused unless `dequantize` (the layers it changes are dequantized first).

    Returns the hooked networks (empty when merged), whose `set_multiplier` changes their strength later."""
    networks = []
    text_encoders = [clip_l, t5xxl]
    for spec in specs:
        path, multiplier = parse_lora_spec(spec)
        keys = read_header(path).keys
        if is_control_lora(keys):  # BFL Canny/Depth LoRA: img_in widened, bias, norm scales (library/lora/control.py)
            multiplier = multiplier if ";" in spec else DEFAULT_STRENGTH
            network = ControlLoRA(flux, multiplier=multiplier, weights=read_control_lora(load_tensors(path), str(path)),
                                  source=str(path))
            if merge:
                _refuse_merge_into_gguf(path, flux)
                network.merge_to(flux)
                logger.info("merged control LoRA %s x %s", path, multiplier)
            else:
                network.to(device).eval().apply_to(flux)
                networks.append(network)
                logger.info("applied control LoRA %s x %s (%d Linears, %d norm scales replaced)", path, multiplier,
                            len(network.loras), len(network.norms))
            continue
        if is_lycoris(keys):  # LoKr / LoHa / DoRA: applied by their own formulas
            network = LycorisFileNetwork(load_tensors(path), text_encoders, flux, multiplier, source=str(path))
            if merge:
                _refuse_merge_into_gguf(path, flux)
                network.merge_to(device)
                logger.info("merged LyCORIS %s x %s", path, multiplier)
            else:
                network.apply_to()
                networks.append(network.to(device).eval())
            continue
        network, weights = lora_flux.create_network_from_weights(multiplier, path, None, text_encoders, flux,
                                                                 for_inference=True)
        has_te = any(k.startswith(("lora_te1", "lora_te3")) for k in weights)
        has_unet = any(k.startswith("lora_unet") for k in weights)
        if not (has_te or has_unet):
            raise ValueError(f"{path}: no kohya LoRA keys (lora_unet_* / lora_te1_* / lora_te3_*) found")
        if merge:
            if has_unet:
                _refuse_merge_into_gguf(path, flux)
            dequantize_for_merge(network.unet_loras, dequantize, "--dequantize_merged_layers",
                                 f"--merge_lora_weights {path}")
            network.merge_to(text_encoders, flux, weights, None, device)
            logger.info("merged LoRA %s x %s", path, multiplier)
            continue
        network.apply_to(text_encoders, flux, has_te, has_unet)
        missing, unexpected = network.load_state_dict(weights, strict=False)
        if unexpected:
            raise ValueError(f"{path}: {len(unexpected)} LoRA tensors match no module of these models "
                             f"(e.g. {unexpected[0]}); is it a LoRA for FLUX.1?")
        network.to(device).eval()
        networks.append(network)
        logger.info("applied LoRA %s x %s (%d modules)", path, multiplier, len(weights) // 3)
    return networks


def _refuse_merge_into_gguf(path, flux: torch.nn.Module) -> None:
    if any(isinstance(m, GGUFLinear) for m in flux.modules()):
        raise ValueError(f"--merge_lora_weights: {path} cannot be merged into a GGUF (quantized) transformer; "
                         "leave out --merge_lora_weights to apply it unmerged")
