"""What a ControlNet reads during training and sample images, for the ControlNet trainer (trained ControlNet) and the
LoRA trainer (`--controlnet_model_name_or_path`: a frozen ControlNet): one batch's condition, each item's Union mode,
a sample prompt's `--cn` condition. sd-scripts' ControlNets read the conditioning pixels; diffusers-layout ones the
packed AE latents of them (alimama-style inpainting: the target with the masked area black, and the keep-mask; the
conditioning images are then the masks, white = generate).
"""

from __future__ import annotations

import torch

from library.data.images import load_image
from library.data.tensors import control_image_source
from library.flow.control import condition_latents, latent_condition
from library.flow.generation import Placement
from library.formats.control_modes import control_mode
from library.models.controlled import ControlledFlux, ControlUnit
from library.training.errors import TrainingError


def is_diffusers_layout(controlnet) -> bool:
    return getattr(controlnet, "shape", None) is not None


def is_inpainting(controlnet) -> bool:
    return is_diffusers_layout(controlnet) and controlnet.shape.condition_channels == 68


def num_modes(controlnet) -> int:
    return (controlnet.shape.num_mode or 0) if is_diffusers_layout(controlnet) else 0


def item_mode(controlnet, attributes: dict | None, default) -> int:
    """A Union item's mode: its subset's custom_attributes.control_mode, else `default` (--control_mode)."""
    value = (attributes or {}).get("control_mode", default)
    if value is None:
        raise TrainingError("a Union ControlNet needs a mode per item: --control_mode, or control_mode in the "
                            "subset's custom_attributes")
    try:
        mode = control_mode(value)
    except Exception as e:
        raise TrainingError(f"custom_attributes.control_mode {value!r}: {e}") from None
    if mode is None or mode >= num_modes(controlnet):
        raise TrainingError(f"control_mode {value!r}: the ControlNet has {num_modes(controlnet)} modes")
    return mode


def batch_control_inputs(controlnet, batch, ae, device, default_mode=None) -> dict:
    """The denoiser's keyword inputs for `ControlledFlux` from one batch."""
    control = batch.conditioning_images
    if control is None:
        raise TrainingError("a ControlNet needs batches with conditioning images (ControlNet subsets: "
                            "conditioning_data_dir)")
    if not is_diffusers_layout(controlnet):
        return {"controlnet_cond": control}
    if ae.device != torch.device(device):  # encodes every step's conditions: kept on the accelerator (moved once)
        ae.to(device)
    if is_inpainting(controlnet):
        if batch.images is None:
            raise TrainingError("an inpainting ControlNet needs the targets' pixels (no --cache_latents)")
        cond = condition_latents(ae, batch.images, ((control.mean(1, keepdim=True) + 1) / 2 > 0.5).float())
    else:
        cond = condition_latents(ae, control)
    inputs = {"controlnet_cond": cond}
    if num_modes(controlnet):
        inputs["controlnet_mode"] = torch.tensor([item_mode(controlnet, a, default_mode)
                                                  for a in batch.custom_attributes], device=device)
    return inputs


def sampling_controlled(flux, controlnet, prompt, ae, device, default_mode=None, scale: float = 1.0, log=None):
    """`flux` steered by `controlnet` with a sample prompt's `--cn` image, or `flux` itself (with a warning through
    `log`) when the prompt has none or the ControlNet needs a mask."""
    if not prompt.controlnet_image:
        if log:
            log.warning("sample %d has no --cn control image: rendered without the ControlNet", prompt.index)
        return flux
    if is_inpainting(controlnet):
        if log:
            log.warning("sample %d: sample prompts have no mask option, so the inpainting ControlNet is not used",
                        prompt.index)
        return flux
    picture = load_image(prompt.controlnet_image)[0]
    if is_diffusers_layout(controlnet):
        control = latent_condition(picture, ae, Placement(device, False))
    else:
        control = control_image_source(picture)
    mode = item_mode(controlnet, {}, default_mode) if num_modes(controlnet) else None
    return ControlledFlux(flux, units=[ControlUnit(controlnet, control, scale, mode=mode)])
