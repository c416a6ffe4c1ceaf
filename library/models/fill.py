"""FLUX.1 Fill's condition features: what `ExtraChannelsFlux` concatenates to each noisy token (64 features) so that
img_in sees 384 = 64 noisy | 64 masked-image latent | 256 mask.

    features = fill_features(ae, image, mask)      # image (B, 3, H, W) in [-1, 1], mask (B, H, W) in [0, 1]
    ExtraChannelsFlux(flux).bind(features)          # sampling; training passes extra_channels=features

* the mask is 1 (white) where the model generates and 0 where the picture is kept; fractional values are kept as
  they are (BFL; diffusers and DiffSynth binarise at 0.5);
* masked image: `image * (1 - mask)` in [-1, 1] (generated pixels become 0, mid-grey) -> the AE's posterior mean ->
  packed in 2x2 patches (16 channels x 4 = 64 features per token);
* mask: the pixel mask cut into 8x8 blocks, one per latent cell (space-to-depth: the 64 values of a block ordered
  row-in-block, then column-in-block), then packed in 2x2 patches like latents (64 x 4 = 256 features per token).
  This is BFL's `rearrange(mask, "b (h ph) (w pw) -> b (ph pw) h w", ph=8, pw=8)` and diffusers' view/permute in
  `FluxFillPipeline.prepare_mask_latents`.
"""

from __future__ import annotations

import torch

from library.models.packing import PATCH, pack_latents

AE_SCALE = 8  # pixels per latent cell
MASK_FEATURES = AE_SCALE * AE_SCALE * PATCH * PATCH  # 256
FILL_EXTRA_CHANNELS = 16 * PATCH * PATCH + MASK_FEATURES  # 64 + 256 = 320 (img_in: 64 + 320 = 384)


def check_sizes(height: int, width: int) -> None:
    if height % 16 or width % 16 or height <= 0 or width <= 0:
        raise ValueError(f"FLUX.1 Fill needs an image size that is a positive multiple of 16, got {width}x{height}")


def mask_tokens(mask: torch.Tensor) -> torch.Tensor:
    """Pixel masks (B, H, W) or (B, 1, H, W) in [0, 1] -> (B, H/16 * W/16, 256): 8x8 space-to-depth at latent
    resolution, then 2x2 packing."""
    if mask.ndim == 4:
        if mask.shape[1] != 1:
            raise ValueError(f"a mask has one channel, got shape {tuple(mask.shape)}")
        mask = mask[:, 0]
    b, height, width = mask.shape
    check_sizes(height, width)
    h, w = height // AE_SCALE, width // AE_SCALE
    blocks = mask.reshape(b, h, AE_SCALE, w, AE_SCALE).permute(0, 2, 4, 1, 3)  # (B, 8 rows, 8 cols, h, w)
    return pack_latents(blocks.reshape(b, AE_SCALE * AE_SCALE, h, w))


def masked_pixels(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The picture with the area to generate blanked: image (B, 3, H, W) in [-1, 1] times (1 - mask)."""
    if mask.ndim == 3:
        mask = mask[:, None]
    return image * (1 - mask.to(image.dtype))


@torch.no_grad()
def encode_masked_image(ae: torch.nn.Module, image: torch.Tensor, mask: torch.Tensor,
                        tiled: bool = False) -> torch.Tensor:
    """The masked image's scaled latents (B, 16, H/8, W/8), float32, from the AE's posterior mean."""
    pixels = masked_pixels(image.float(), mask.float())
    return torch.nan_to_num(ae.encode(pixels, sample=False, tiled=tiled), 0.0).float()


def condition_tokens(masked_latents: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, N, 320): the packed masked-image latents (64) then the packed mask (256), in the order img_in takes."""
    tokens = pack_latents(masked_latents.float())
    packed_mask = mask_tokens(mask.float().to(tokens.device))
    if packed_mask.shape[:2] != tokens.shape[:2]:
        raise ValueError(f"mask {tuple(mask.shape)} does not fit the masked image's latents "
                         f"{tuple(masked_latents.shape)}")
    return torch.cat((tokens, packed_mask), dim=-1)


def fill_features(ae: torch.nn.Module, image: torch.Tensor, mask: torch.Tensor, tiled: bool = False) -> torch.Tensor:
    """Condition features (B, N, 320) of pictures (B, 3, H, W) in [-1, 1] and masks (B, H, W) in [0, 1]."""
    check_sizes(*image.shape[-2:])
    if mask.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"mask size {tuple(mask.shape[-2:])} differs from the image's {tuple(image.shape[-2:])}")
    return condition_tokens(encode_masked_image(ae, image, mask, tiled), mask)
