"""What a ControlNet reads during training and sample images, for the ControlNet trainer (trained ControlNet) and the
LoRA trainer (`--controlnet_model_name_or_path`: a frozen ControlNet): one batch's condition, each item's Union mode,
a sample prompt's `--cn` condition. sd-scripts' ControlNets read the conditioning pixels; diffusers-layout ones the
packed AE latents of them (alimama-style inpainting: the target with the masked area black, and the keep-mask; the
conditioning images are then the masks, white = generate).

Control latents (`control_latents`) are the one piece Flex.2, FLUX.1 Canny/Depth and the diffusers-layout ControlNets
share: with --cache_latents the recipe sets `DatasetKinds.control_latents`, each conditioning image becomes a
`ControlItem` the latent cache encodes (its target's geometry, posterior mean, provenance with content hashes) and
batches carry them; otherwise the conditioning images (the same pixels: library/data/datasets.py
`_conditioning_pixels`) are encoded now. alimama-style inpainting ControlNets are not cached: their condition is
the target with the masked area black, encoded per step (they need the targets' pixels: no --cache_latents).
"""

from __future__ import annotations

import torch

from library.data.images import load_image
from library.data.tensors import control_image_source
from library.flow.control import condition_latents, latent_condition
from library.flow.generation import Placement
from library.formats.control_modes import control_mode
from library.formats.safetensors_io import read_header
from library.models.controlled import ControlledFlux, ControlUnit
from library.models.controlnet_files import controlnet_layout
from library.models.diffusers_controlnet import weights_file
from library.models.packing import pack_latents
from library.training.errors import TrainingError


@torch.no_grad()
def encode_mean(ae, images: torch.Tensor) -> torch.Tensor:
    """Pixels (B, 3, H, W) in [-1, 1] -> AE posterior means (B, 16, H/8, W/8) float32, on the AE's device."""
    param = next(ae.parameters())
    return torch.nan_to_num(ae.encode(images.to(param.device, param.dtype), sample=False), 0.0).float()


def control_latents(batch, device, live) -> torch.Tensor | None:
    """A batch's control latents (B, 16, h, w) float32 on `device`: the latent cache's (its ControlItems, when the
    recipe's DatasetKinds.control_latents is set and latents are cached), else the batch's conditioning images
    encoded now by `live` (pixels (B, 3, H, W) -> (B, 16, H/8, W/8) posterior means); None without either."""
    if batch.control_latents is not None:
        return batch.control_latents.to(device)
    if batch.conditioning_images is None:
        return None
    return live(batch.conditioning_images).to(device)


def diffusers_latent_condition(args) -> bool:
    """Whether the run's ControlNet (trained: --controlnet_format diffusers or the file given; frozen: the file)
    reads AE latents of the conditioning images, cacheable as control latents: diffusers' layout, not inpainting
    (68 condition features). Read from the command line and the file's header: datasets are built before models."""
    path = getattr(args, "controlnet_model_name_or_path", None)
    if path:
        try:
            if controlnet_layout(path) != "diffusers":
                return False
            embedder = read_header(weights_file(path)).tensors.get("controlnet_x_embedder.weight")
        except (OSError, ValueError):
            return False
        return embedder is not None and embedder.shape[1] != 68
    return getattr(args, "controlnet_format", None) == "diffusers" and not getattr(args, "controlnet_inpainting", False)


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
    if control is None and (batch.control_latents is None or not is_diffusers_layout(controlnet)):
        raise TrainingError("a ControlNet needs batches with conditioning images (ControlNet subsets: "
                            "conditioning_data_dir)")
    if not is_diffusers_layout(controlnet):
        return {"controlnet_cond": control}

    def live(pixels):  # encodes every step's conditions: the AE kept on the accelerator (moved once)
        if ae.device != torch.device(device):
            ae.to(device)
        return encode_mean(ae, pixels)

    if is_inpainting(controlnet):
        if batch.images is None:
            raise TrainingError("an inpainting ControlNet needs the targets' pixels (no --cache_latents)")
        if ae.device != torch.device(device):
            ae.to(device)
        cond = condition_latents(ae, batch.images, ((control.mean(1, keepdim=True) + 1) / 2 > 0.5).float())
    else:
        cond = pack_latents(control_latents(batch, device, live))
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
