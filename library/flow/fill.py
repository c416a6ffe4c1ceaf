"""FLUX.1 Fill inputs for sampling: a picture and a mask (files) -> canvas (outpainting) -> the 320 condition features
per token, bound to an `ExtraChannelsFlux`. One path for flux_minimal_inference.py and sample images in training.

    canvas = load_fill_canvas("photo.png", "mask.png", outpaint=(0, 0, 256, 0))
    features = fill_features(ae, canvas.image, canvas.mask)          # library/models/fill.py
    flux = bind_fill(flux, features)                                 # the sampler is unchanged

Rules (documented in README "FLUX.1 Fill"):
* mask: read as grey (PIL "L") / 255: white (1) = generate, black (0) = keep, grey kept as a fraction (BFL); a mask of
  another size than the picture is resized to it (bilinear);
* `--outpaint L,T,R,B` adds that many pixels on each side; the added canvas is filled with mid-grey (0 in [-1, 1],
  which the mask blanks anyway) and masked 1;
* the output has the canvas's size floored to multiples of 16 (diffusers' rule): canvas and mask are resized to it
  (picture: Lanczos, as diffusers; mask: bilinear, clamped to [0, 1]); a canvas under 16 pixels is refused;
* no picture (sample images without one): pure generation, as a fully masked picture is for BFL's model: all-ones
  mask and the AE encoding of an all-zero (mid-grey) picture at the requested size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from library.data.images import BadImageError, load_image
from library.data.tensors import to_tensor
from library.models.conditioned import ExtraChannelsFlux

PAD_VALUE = 0.0  # outpainting canvas in [-1, 1] pixels (mid-grey); masked 1, so the model never sees it


@dataclass(frozen=True)
class FillCanvas:
    """A picture to repaint: `image` (1, 3, H, W) in [-1, 1] and `mask` (1, H, W) in [0, 1], H and W multiples of 16,
    with what they came from (for the PNG's text records)."""

    image: torch.Tensor
    mask: torch.Tensor
    image_path: str | None
    mask_path: str | None
    outpaint: tuple[int, int, int, int] | None
    source_size: tuple[int, int]  # (width, height) of the picture file
    canvas_size: tuple[int, int]  # (width, height) after outpainting, before flooring to 16

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the output."""
        return self.image.shape[-1], self.image.shape[-2]

    def png_text(self) -> dict[str, str]:
        text = {"image": self.image_path or "", "mask_image": self.mask_path or ""}
        if self.outpaint is not None:
            text["outpaint"] = ",".join(str(v) for v in self.outpaint)
        if self.canvas_size != self.size:
            text["canvas_size"] = f"{self.canvas_size[0]}x{self.canvas_size[1]}"
        return text


def floor16(width: int, height: int) -> tuple[int, int]:
    if width < 16 or height < 16:
        raise ValueError(f"a {width}x{height} canvas is smaller than 16x16: FLUX.1 Fill needs at least 16 pixels a "
                         f"side")
    return width // 16 * 16, height // 16 * 16


def read_mask(path: str, size: tuple[int, int]) -> np.ndarray:
    """A mask file as float32 (H, W) in [0, 1] at `size` (width, height): grey / 255, resized bilinearly if needed."""
    try:
        rgb, _ = load_image(path)
    except BadImageError as e:
        raise ValueError(f"--mask_image {e}") from None
    grey = Image.fromarray(rgb).convert("L")
    if grey.size != tuple(size):
        grey = Image.fromarray(np.asarray(grey, np.float32) / 255.0, mode="F").resize(size, Image.Resampling.BILINEAR)
        return np.clip(np.asarray(grey, np.float32), 0.0, 1.0)
    return np.asarray(grey, np.float32) / 255.0


def outpaint_canvas(image: torch.Tensor, mask: torch.Tensor, margins: tuple[int, int, int, int]):
    """Pad (1, 3, H, W) pixels with PAD_VALUE and (1, H, W) masks with 1 by (left, top, right, bottom) pixels."""
    left, top, right, bottom = margins
    image = torch.nn.functional.pad(image, (left, right, top, bottom), value=PAD_VALUE)
    mask = torch.nn.functional.pad(mask, (left, right, top, bottom), value=1.0)
    return image, mask


def fit_to(image: torch.Tensor, mask: torch.Tensor, size: tuple[int, int]):
    """Resize a canvas to `size` (width, height): the picture with Lanczos (PIL, uint8 as diffusers), the mask
    bilinearly as floats clamped to [0, 1]."""
    if (image.shape[-1], image.shape[-2]) == size:
        return image, mask
    rgb = ((image[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    resized = Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS)
    m = Image.fromarray(mask[0].numpy().astype(np.float32), mode="F").resize(size, Image.Resampling.BILINEAR)
    return to_tensor(np.array(resized))[None], torch.from_numpy(np.clip(np.asarray(m, np.float32), 0, 1))[None]


def load_fill_canvas(image_path: str, mask_path: str | None = None,
                     outpaint: tuple[int, int, int, int] | None = None) -> FillCanvas:
    """The picture and mask files made into the canvas the model repaints (see the module's rules). No mask: only
    the outpainted border is generated (nothing at all without --outpaint: the picture comes back re-rendered)."""
    try:
        rgb, _ = load_image(image_path)
    except BadImageError as e:
        raise ValueError(f"--image {e}") from None
    source = (rgb.shape[1], rgb.shape[0])
    image = to_tensor(np.array(rgb))[None]
    mask = (torch.from_numpy(read_mask(mask_path, source)) if mask_path is not None
            else torch.zeros(source[1], source[0]))[None]
    if outpaint is not None:
        image, mask = outpaint_canvas(image, mask, outpaint)
    canvas = (image.shape[-1], image.shape[-2])
    image, mask = fit_to(image, mask, floor16(*canvas))
    return FillCanvas(image, mask, image_path, mask_path, tuple(outpaint) if outpaint else None, source, canvas)


def blank_canvas(width: int, height: int) -> FillCanvas:
    """Pure generation: an all-zero (mid-grey) picture entirely masked, at (width, height) (multiples of 16)."""
    width, height = floor16(width, height)
    return FillCanvas(torch.zeros(1, 3, height, width), torch.ones(1, height, width), None, None, None,
                      (width, height), (width, height))


def bind_fill(flux: torch.nn.Module, features: torch.Tensor | None) -> ExtraChannelsFlux:
    """`flux` (or the ExtraChannelsFlux around it) bound to Fill's condition features (1, N, 320); None unbinds."""
    model = flux if isinstance(flux, ExtraChannelsFlux) else ExtraChannelsFlux(flux)
    return model.bind(features)


def check_fill_arguments(args, variant) -> None:
    """One-line refusals of inference options a FLUX.1 Fill run cannot honour."""
    if not getattr(args, "image", None):
        raise ValueError(f"{variant.name} (FLUX.1 Fill) repaints a picture: give --image IMG and --mask_image MASK "
                         f"(white = generate) or --outpaint L,T,R,B")
    sizes = [f"--{k}" for k in ("width", "height") if getattr(args, k, None) is not None]
    if sizes:
        raise ValueError(f"{' and '.join(sizes)}: FLUX.1 Fill renders at --image's size (after --outpaint, floored to "
                         f"multiples of 16); resize the picture instead")
    if getattr(args, "controlnet", None):
        raise ValueError("--controlnet with FLUX.1 Fill is not supported (the ControlNet takes 64 features per token)")


def encode_fill(flux: torch.nn.Module, ae: torch.nn.Module, canvas: FillCanvas, placement=None,
                tiled: bool = False) -> ExtraChannelsFlux:
    """`flux` bound to the canvas's condition features (the AE runs once, on `placement`'s device)."""
    from library.models.fill import fill_features

    from contextlib import nullcontext

    device = placement.device if placement is not None else next(ae.parameters()).device
    with placement.use(ae) if placement is not None else nullcontext():
        features = fill_features(ae, canvas.image.to(device), canvas.mask.to(device), tiled)
    return bind_fill(flux, features)
