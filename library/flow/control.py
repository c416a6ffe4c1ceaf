"""ControlNet conditions for sampling (inference and training samples): picture -> what each ControlNet reads.

sd-scripts' ControlNets read the picture itself ((1, 3, H, W) in [-1, 1]); diffusers-layout ones read its packed AE
latents (the posterior mean, as every FLUX conditioning encode here; diffusers' pipelines draw a sample instead).
alimama's inpainting ControlNets (68 condition features) read the picture with the area to generate set to black
(-1) -- the mask binarised at > 0.5 on [0, 1], alimama's rule (DiffSynth thresholds the [-1, 1] mean at 0) -- and
the keep-mask (1 - mask) resized to the latent size (nearest): 16 + 1 channels, packed to 64 + 4 features.
Each condition is a function (width, height) -> tensor, made again only when the output size changes.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from library.data.images import load_image
from library.data.tensors import control_image_source, prepare_control_image
from library.models.controlled import ControlledFlux, ControlUnit
from library.models.controlnet_files import load_any_controlnet
from library.models.packing import pack_latents

MASK_THRESHOLD = 0.5


def inpaint_mask(mask: np.ndarray, width: int, height: int) -> torch.Tensor:
    """An HxW(x3) mask picture (white = generate) fitted as the control picture is -> (1, 1, H, W) of 0/1."""
    rgb = np.repeat(mask[..., None], 3, axis=2) if mask.ndim == 2 else mask
    fitted = (prepare_control_image(rgb, width, height).mean(1, keepdim=True) + 1) / 2
    return (fitted > MASK_THRESHOLD).float()


def latent_condition(picture: np.ndarray, ae: torch.nn.Module, placement, mask: np.ndarray | None = None,
                     channels: int = 64) -> Callable[[int, int], torch.Tensor]:
    """(width, height) -> packed condition latents (1, N, channels) for a diffusers-layout ControlNet."""
    if channels == 68 and mask is None:
        raise ValueError("this inpainting ControlNet (68 condition features) needs --mask_image (white = generate)")
    if channels not in (64, 68):
        raise ValueError(f"ControlNet condition of {channels} features: only 64 (AE latents) and 68 (alimama "
                         "inpainting) are known")

    def condition(width: int, height: int) -> torch.Tensor:
        pixels = prepare_control_image(picture, width, height)
        with placement.use(ae):
            return condition_latents(ae, pixels, inpaint_mask(mask, width, height) if channels == 68 else None)

    return condition


def controlled_flux(flux: torch.nn.Module, specs: Sequence, base_params, dtype: torch.dtype, device, ae, placement,
                    mask_image: str | None = None) -> tuple[ControlledFlux, list[str]]:
    """`flux` steered by the ControlNet passes of `specs` (library/cli/controlnet_options.py `ControlSpec`), each
    ControlNet file loaded once; returns the model and one log line per pass."""
    nets, units, lines = {}, [], []
    mask = load_image(mask_image)[0] if mask_image else None
    for spec in specs:
        if spec.controlnet not in nets:
            nets[spec.controlnet] = load_any_controlnet(spec.controlnet, base_params, dtype, device).eval()
        net = nets[spec.controlnet]
        picture = load_image(spec.image)[0]
        shape = getattr(net, "shape", None)
        if shape is None:  # sd-scripts: the picture itself
            control = control_image_source(picture)
        else:
            control = latent_condition(picture, ae, placement, mask, shape.condition_channels)
            if shape.num_mode and spec.mode is None:
                raise ValueError(f"{spec.controlnet} is a Union ControlNet ({shape.num_mode} modes): give "
                                 "--control_mode for each --control_image")
            if not shape.num_mode and spec.mode is not None:
                raise ValueError(f"--control_mode {spec.mode}: {spec.controlnet} is not a Union ControlNet")
        units.append(ControlUnit(net, control, spec.scale, spec.start, spec.end, spec.mode))
        depth, single = net.depths
        lines.append(f"ControlNet {spec.controlnet} ({getattr(net, 'residual_mapping', 'repeat')} mapping, {depth} "
                     f"double / {single} single blocks) x {spec.scale}, steps {spec.start}-{spec.end}"
                     f"{'' if spec.mode is None else f', mode {spec.mode}'}, control image {spec.image}")
    return ControlledFlux(flux, units=units), lines


def inpainting_controlnet(paths: Sequence[str]) -> bool:
    """Whether any of these ControlNet files takes an inpainting condition (68 features), from headers only."""
    from library.formats.safetensors_io import read_header
    from library.models.diffusers_controlnet import is_diffusers_controlnet, weights_file

    for path in dict.fromkeys(paths):
        t = read_header(weights_file(path)).tensors
        if is_diffusers_controlnet(t) and t["controlnet_x_embedder.weight"].shape[1] == 68:
            return True
    return False


def control_png_text(specs: Sequence) -> dict[str, str]:
    if not specs:
        return {}
    join = lambda values: ";".join(str(v) for v in values)  # noqa: E731
    text = {"controlnet": join(s.controlnet for s in specs), "control_image": join(s.image for s in specs),
            "controlnet_scale": join(s.scale for s in specs), "controlnet_start": join(s.start for s in specs),
            "controlnet_end": join(s.end for s in specs)}
    if any(s.mode is not None for s in specs):
        text["control_mode"] = join("" if s.mode is None else s.mode for s in specs)
    return text


def condition_latents(ae: torch.nn.Module, pixels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Packed condition latents of pictures (B, 3, H, W) in [-1, 1] where the AE is: with `mask` (B, 1, H, W) of
    0/1 (1 = generate), alimama's inpainting condition (that area black, the keep-mask appended): (B, N, 68)."""
    param = next(ae.parameters())
    if mask is not None:
        mask = mask.to(pixels.device, pixels.dtype)
        pixels = torch.where(mask > 0, -1.0, pixels)
    with torch.no_grad():
        latents = ae.encode(pixels.to(param.device, param.dtype)).float()
    if mask is not None:
        keep = 1 - torch.nn.functional.interpolate(mask.float(), size=latents.shape[-2:], mode="nearest")
        latents = torch.cat((latents, keep.to(latents.device)), dim=1)
    return pack_latents(latents)


def picture_size(path: str) -> tuple[int, int]:
    """An inpainting picture's (width, height) floored to multiples of 16: the output size when none is given."""
    from library.data.images import probe_image

    width, height = probe_image(path).size
    return max(16, width // 16 * 16), max(16, height // 16 * 16)
