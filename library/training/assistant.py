"""`--assistant_lora`: a de-distillation LoRA for FLUX.1-schnell, hooked onto the frozen transformer while a LoRA
trains, switched off for sample images and never saved (ai-toolkit's `assistant_lora_path`, e.g.
ostris/FLUX.1-schnell-training-adapter).

schnell is timestep-distilled: it jumps to an image in 1-4 steps. Training a LoRA on it directly teaches the LoRA to
undo that distillation along with the subject, and the few-step ability erodes. With the assistant in the forward
pass the model the LoRA trains against is already "de-distilled", so the LoRA learns only the subject; at inference
the assistant is left out and the LoRA sits on plain schnell, which keeps its 4-step sampling.

Hooked, not merged (as ai-toolkit does for FLUX): the base weights stay untouched, so an fp8, nf4/int8 or GGUF base
and block swapping work unchanged (a merge would round the delta into fp8 or need a dequantised copy), and the
assistant switches off for sample images without a second copy of any weight. It is applied after the trained
network, outermost, so the trained LoRA (DoRA included) sees the base Linear as without it.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import torch

from library.formats.lycoris_weights import is_lycoris
from library.formats.safetensors_io import read_header
from library.models.variants import ModelVariant
from library.training.errors import TrainingError
from networks import lora_flux

logger = logging.getLogger(__name__)

OPTION = "--assistant_lora"


def check_assistant_lora(path: str, variant: ModelVariant) -> None:
    """Before the models load: the assistant is for schnell, and its file must be a LoRA file we read."""
    if variant.name != "schnell":
        raise TrainingError(f"{OPTION} is for FLUX.1-schnell, but this base is FLUX.1 {variant.name}: a "
                            "de-distillation adapter would distort a model that is not step-distilled; drop the option")
    if not Path(path).is_file():
        raise TrainingError(f"{OPTION} {path}: no such file (download e.g. ostris/FLUX.1-schnell-training-adapter's "
                            "pytorch_lora_weights.safetensors)")
    if is_lycoris(read_header(path).keys):
        raise TrainingError(f"{OPTION} {path}: a LyCORIS file; the assistant must be a LoRA (any LoRA layout)")


class AssistantLoRA:
    """The assistant hooked into `flux`'s Linears (frozen), on `device` in `dtype`."""

    def __init__(self, path: str, flux: torch.nn.Module, device: torch.device, dtype: torch.dtype):
        try:
            network, weights = lora_flux.create_network_from_weights(1.0, path, None, None, flux, for_inference=True)
        except ValueError as e:
            raise TrainingError(f"{OPTION} {path}: {e}") from None
        if any(k.startswith(("lora_te1", "lora_te3")) for k in weights):
            raise TrainingError(f"{OPTION} {path}: it has text-encoder tensors; an assistant adapts the transformer "
                                "only")
        if not any(k.startswith("lora_unet") for k in weights):
            raise TrainingError(f"{OPTION} {path}: no FLUX transformer LoRA tensors found")
        network.apply_to(None, flux, apply_text_encoder=False, apply_unet=True)
        _, unexpected = network.load_state_dict(weights, strict=False)
        if unexpected:
            network.restore()
            raise TrainingError(f"{OPTION} {path}: {len(unexpected)} tensors match no module of this transformer "
                                f"(e.g. {unexpected[0]}); is it a FLUX.1 LoRA?")
        network.requires_grad_(False)
        self.network = network.to(device, dtype).eval()
        self.path = path
        logger.info("%s %s hooked onto the transformer (%d modules; left out of samples and saved files)", OPTION,
                    path, len(network.unet_loras))

    @property
    def enabled(self) -> bool:
        return all(lora.enabled for lora in self.network.unet_loras)

    @contextmanager
    def switched_off(self):
        """The transformer without the assistant (sample images): plain schnell plus the trained LoRA."""
        self.network.set_enabled(False)
        try:
            yield
        finally:
            self.network.set_enabled(True)
