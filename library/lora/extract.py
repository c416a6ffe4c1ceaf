"""Extracting a LoRA from a fine-tuned FLUX transformer and its base: the difference of each block Linear's weight,
factorised by SVD (networks/flux_extract_lora.py). Both checkpoints are read one tensor at a time (any layout the
loader accepts), so memory stays near two tensors plus the extracted LoRA.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from library.models.checkpoint_stream import Readers, transformer_entries
from library.models.variants import ModelVariant, resolve_variant
from library.formats.lora_formats import UNET, LoRAWeights
from library.lora.merge import lora_name_for_weight, svd_factor

logger = logging.getLogger(__name__)


@dataclass
class ExtractResult:
    modules: dict[str, LoRAWeights]
    errors: dict[str, float]  # relative reconstruction error per extracted module
    unchanged: list[str]  # block Linears whose weight is identical in both files (no module written)
    variant: ModelVariant  # the base model's, as its keys and metadata name it (what the saved metadata says)

    @property
    def is_schnell(self) -> bool:
        return self.variant.name == "schnell"


def extractable(key: str) -> bool:
    """sd-scripts' rule: block Linear weights, no biases, no norms."""
    return ("single_block" in key or "double_block" in key) and key.endswith(".weight") and "norm" not in key


def extract_lora(model_org: str | Path, model_tuned: str | Path, dim: int = 4, clamp_quantile: float | None = 0.99,
                 device: str | torch.device = "cpu") -> ExtractResult:
    readers = Readers()
    try:
        org, info = transformer_entries(model_org, readers)
        tuned, _ = transformer_entries(model_tuned, readers)
        tuned_by_key = {e.key: e for e in tuned}
        modules, errors, unchanged = {}, {}, []
        for e in org:
            if not extractable(e.key):
                continue
            t = tuned_by_key.get(e.key)
            if t is None or t.shape != e.shape:
                raise ValueError(f"{model_tuned}: {e.key} is {'missing' if t is None else t.shape}, "
                                 f"{model_org} has {e.shape}: not the same model architecture")
            delta = t.read().to(device, torch.float32) - e.read().to(device, torch.float32)
            name = lora_name_for_weight(UNET, e.key)
            if not torch.any(delta):
                unchanged.append(name)
                continue
            modules[name], errors[name] = svd_factor(delta, dim, clamp_quantile, device)
    finally:
        readers.close()
    variant = resolve_variant(None, has_guidance_input=info.params.guidance_embed, family=info.family,
                              in_channels=info.params.in_channels, metadata=info.metadata, source=str(model_org))
    return ExtractResult(modules, errors, unchanged, variant)
