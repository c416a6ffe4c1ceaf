"""FLUX.1's token layout: 2x2 patches of latents as tokens, their position ids, and the token grid of an image size."""

from __future__ import annotations

import math

import torch

LATENT_CHANNELS = 16
PATCH = 2  # latents are packed in 2x2 patches: 16 channels -> 64 per token
PIXELS_PER_TOKEN = 16  # 8x AE downsampling times the 2x2 patch


def packed_grid(height: int, width: int) -> tuple[int, int]:
    """Token grid for an image size; sizes that are not multiples of 16 round up (as sd-scripts does)."""
    return math.ceil(height / PIXELS_PER_TOKEN), math.ceil(width / PIXELS_PER_TOKEN)


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents -> (B, H/2 * W/2, C*4) tokens, each token a 2x2 patch in (c, ph, pw) order."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // PATCH, PATCH, w // PATCH, PATCH)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack_latents(x: torch.Tensor, packed_height: int, packed_width: int) -> torch.Tensor:
    """Inverse of pack_latents: (B, h*w, C*4) -> (B, C, 2h, 2w)."""
    b, _, d = x.shape
    c = d // (PATCH * PATCH)
    x = x.view(b, packed_height, packed_width, c, PATCH, PATCH)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, c, packed_height * PATCH, packed_width * PATCH)


def prepare_img_ids(batch_size: int, packed_height: int, packed_width: int, index: int = 0) -> torch.Tensor:
    """Image position ids (B, h*w, 3): (index, row, column); index > 0 marks appended reference images."""
    ids = torch.zeros(packed_height, packed_width, 3)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(packed_height)[:, None]
    ids[..., 2] = torch.arange(packed_width)[None, :]
    return ids.reshape(1, packed_height * packed_width, 3).expand(batch_size, -1, -1).contiguous()


def prepare_txt_ids(batch_size: int, length: int) -> torch.Tensor:
    return torch.zeros(batch_size, length, 3)
