"""ostris Flex.2 inputs for sampling: a control picture and/or a picture with a mask (files) -> AE latents -> the
time-dependent condition bound to an `ExtraChannelsFlux` (library/models/flex2.py). One path for
flux_minimal_inference.py and sample images during Flex.2 training.

    inputs = Flex2Inputs.load(control_image="depth.png", image="photo.png", mask_image="mask.png")
    encoded = inputs.encode(ae, width, height, placement)          # the AE runs once per size
    model = bind_flex2(flux, encoded.condition(schedule, strength=0.5, stop=0.5))

Rules (README "Flex.2"):
* `--image` (+ `--mask_image`, white = generate; `--outpaint L,T,R,B`) makes the canvas as for FLUX.1 Fill
  (library/flow/fill.py: outpainted border masked 1, floored to multiples of 16) and fixes the output size; its
  latent is the AE's posterior mean, zeroed in latent space where the mask (resized bilinearly to the latent grid) is
  1. No --image: zeros and an all-ones mask (text-to-image).
* `--control_image` is scaled to cover the output size and centre-cropped (as ControlNet control images are), encoded
  with the AE's posterior mean and multiplied by the control strength; it is used by the first steps only
  (`control_stop`). Without --image or a size, the output takes the control picture's size (floored to 16).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from library.data.images import BadImageError, load_image
from library.data.tensors import prepare_control_image
from library.flow.fill import FillCanvas, fit_to, load_fill_canvas
from library.flow.sampling import get_schedule, packed_grid
from library.models.flex2 import (DEFAULT_CONTROL_STOP, DEFAULT_CONTROL_STRENGTH, Flex2Condition, Flex2Model,
                                  sampling_condition)


@dataclass(frozen=True)
class EncodedFlex2:
    """The AE latents of one render's inputs (None where there is no such input) at its latent size."""

    inpaint_latents: torch.Tensor | None  # (1, 16, h, w)
    mask: torch.Tensor | None  # (1, 1, H, W) in [0, 1], 1 = generate
    control_latents: torch.Tensor | None  # (1, 16, h, w), before the strength
    latent_shape: tuple[int, int, int, int]

    def condition(self, schedule: Sequence[float], strength: float = DEFAULT_CONTROL_STRENGTH,
                  stop: float = DEFAULT_CONTROL_STOP) -> Flex2Condition:
        return sampling_condition(self.inpaint_latents, self.mask, self.control_latents, self.latent_shape,
                                  strength=strength, stop=stop, schedule=schedule)


@dataclass(frozen=True)
class Flex2Inputs:
    """The files of one render: a control picture (HxWx3 uint8) and/or an inpainting canvas."""

    control_path: str | None = None
    control: object | None = None  # the decoded control picture (numpy HxWx3 uint8)
    canvas: FillCanvas | None = None

    @classmethod
    def load(cls, control_image: str | None = None, image: str | None = None, mask_image: str | None = None,
             outpaint: tuple[int, int, int, int] | None = None) -> "Flex2Inputs":
        control = None
        if control_image:
            try:
                control, _ = load_image(control_image)
            except BadImageError as e:
                raise ValueError(f"--control_image {e}") from None
        canvas = load_fill_canvas(image, mask_image, outpaint) if image else None
        return cls(control_image, control, canvas)

    def size(self, width: int | None, height: int | None) -> tuple[int | None, int | None]:
        """The output's (width, height): the canvas's; else as given; else the control picture's (floored to 16)."""
        if self.canvas is not None:
            return self.canvas.size
        if width is None and height is None and self.control is not None:
            h, w = self.control.shape[:2]
            return max(16, w // 16 * 16), max(16, h // 16 * 16)
        return width, height

    @torch.no_grad()
    def encode(self, ae: torch.nn.Module, width: int, height: int, placement=None) -> EncodedFlex2:
        """AE posterior means of the canvas and the control picture at the output size (width, height)."""
        param = next(ae.parameters())
        device = placement.device if placement is not None else param.device
        inpaint = mask = control = None
        with placement.use(ae) if placement is not None else nullcontext():
            if self.canvas is not None:
                image, pixel_mask = fit_to(self.canvas.image, self.canvas.mask, (width, height))
                inpaint = ae.encode(image.to(device, param.dtype)).float()
                mask = pixel_mask[:, None].float()
            if self.control is not None:
                pixels = prepare_control_image(self.control, width, height)
                control = ae.encode(pixels.to(device, param.dtype)).float()
        return EncodedFlex2(inpaint, mask, control, (1, 16, height // 8, width // 8))

    def png_text(self, strength: float, stop: float, bypass_guidance: bool) -> dict[str, str]:
        text = self.canvas.png_text() if self.canvas is not None else {}
        if self.control_path:
            text.update(control_image=self.control_path, control_strength=f"{strength:g}",
                        control_stop=f"{stop:g}")
        if bypass_guidance:
            text["bypass_guidance_embedding"] = "true"
        return text


def bind_flex2(flux: torch.nn.Module, condition: Flex2Condition, bypass_guidance: bool | None = None) -> Flex2Model:
    """`flux` (or the Flex2Model around it) bound to one render's condition."""
    model = flux if isinstance(flux, Flex2Model) else Flex2Model(flux)
    if bypass_guidance is not None:
        model.bypass_guidance = bypass_guidance
    return model.bind(condition)


def bind_for_render(flux: torch.nn.Module, ae: torch.nn.Module, variant, settings, inputs: Flex2Inputs,
                    placement=None, strength: float | None = None, stop: float | None = None,
                    bypass_guidance: bool = False):
    """One render's Flex.2 condition bound to `flux` (made a Flex2Model): the output size (the canvas's, else given,
    else the control picture's), the inputs encoded at it, the control stop placed on the schedule the sampler will
    run for `variant`. Returns (model, settings with the size, PNG text records)."""
    strength = DEFAULT_CONTROL_STRENGTH if strength is None else strength
    stop = DEFAULT_CONTROL_STOP if stop is None else stop
    width, height = inputs.size(settings.width, settings.height)
    settings = replace(settings, width=width or 1360, height=height or 768)
    width, height = settings.output_size()
    h, w = packed_grid(height, width)
    schedule = get_schedule(settings.resolved_steps(variant), h * w, shift=variant.shift)
    encoded = inputs.encode(ae, width, height, placement)
    model = bind_flex2(flux, encoded.condition(schedule, strength, stop), bypass_guidance)
    return model, replace(settings, width=width, height=height), inputs.png_text(strength, stop, bypass_guidance)


def bind_with_defaults(models, settings, inputs: Flex2Inputs, placement=None, strength: float | None = None,
                       stop: float | None = None, bypass_guidance: bool = False):
    """`bind_for_render` on a FluxModels (its transformer becomes the bound Flex2Model); returns (settings, text)."""
    models.flux, settings, text = bind_for_render(models.flux, models.ae, models.variant, settings, inputs,
                                                  placement, strength, stop, bypass_guidance)
    return settings, text
