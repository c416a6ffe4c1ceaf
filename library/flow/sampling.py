"""Flow-matching sampling for FLUX.1: initial noise, the BFL schedule and the Euler loop (the token layout is
library/models/packing.py).

Plain functions, shared by flux_minimal_inference.py and by sample generation during training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from library.models.packing import (LATENT_CHANNELS, PATCH, PIXELS_PER_TOKEN, pack_latents,  # noqa: F401
                                    packed_grid, prepare_img_ids, prepare_txt_ids, unpack_latents)


def get_noise(batch_size: int, height: int, width: int, seed: int, dtype=torch.float32, device="cpu"):
    """Packed initial noise (B, h*w, 64) drawn on the CPU from `seed`, so a seed gives the same image on any device."""
    h, w = packed_grid(height, width)
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn(batch_size, h * w, LATENT_CHANNELS * PATCH * PATCH, generator=generator)
    return noise.to(device=device, dtype=dtype)


def time_shift(mu: float, sigma: float, t: torch.Tensor) -> torch.Tensor:
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def shift_mu(image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15,
             base_len: int = 256, max_len: int = 4096) -> float:
    """mu interpolated linearly from base_shift at 256 image tokens to max_shift at 4096 (BFL)."""
    return base_shift + (max_shift - base_shift) * (image_seq_len - base_len) / (max_len - base_len)


def get_schedule(num_steps: int, image_seq_len: int, shift: bool = True,
                 base_shift: float = 0.5, max_shift: float = 1.15) -> list[float]:
    """Timesteps from 1 to 0 (num_steps + 1 values); shifted toward noise for larger images unless schnell."""
    t = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    if shift:
        t = time_shift(shift_mu(image_seq_len, base_shift, max_shift), 1.0, t)
    return t.tolist()


@dataclass
class Conditioning:
    """Encoded prompt: T5 tokens, pooled CLIP-L vector, text ids and the optional T5 attention mask."""

    txt: torch.Tensor
    y: torch.Tensor
    txt_ids: torch.Tensor
    txt_mask: torch.Tensor | None = None

    def cat(self, other: "Conditioning") -> "Conditioning":
        mask = None
        if self.txt_mask is not None or other.txt_mask is not None:
            mask = torch.cat([c.txt_mask if c.txt_mask is not None else torch.ones(c.txt.shape[:2], dtype=torch.long,
                                                                                  device=c.txt.device)
                              for c in (self, other)])
        return Conditioning(torch.cat([self.txt, other.txt]), torch.cat([self.y, other.y]),
                            torch.cat([self.txt_ids, other.txt_ids]), mask)


@torch.no_grad()
def denoise(
    model: Callable[..., torch.Tensor],
    img: torch.Tensor,
    img_ids: torch.Tensor,
    cond: Conditioning,
    timesteps: list[float],
    guidance: float = 3.5,
    negative: Conditioning | None = None,
    cfg_scale: float = 1.0,
    progress: bool = False,
) -> torch.Tensor:
    """Euler integration of the predicted velocity from timesteps[0] to timesteps[-1].

    Embedded guidance is always passed (a schnell model ignores it). With a negative prompt and cfg_scale != 1,
    true classifier-free guidance runs [negative, positive] as one batch: pred = neg + cfg * (pos - neg).
    """
    use_cfg = negative is not None and cfg_scale != 1.0
    batch_cond = negative.cat(cond) if use_cfg else cond
    batch_ids = torch.cat([img_ids, img_ids]) if use_cfg else img_ids
    steps = list(zip(timesteps[:-1], timesteps[1:]))
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="denoising", unit="step")
    for t_curr, t_prev in steps:
        x = torch.cat([img, img]) if use_cfg else img
        n = x.shape[0]
        pred = model(
            img=x, img_ids=batch_ids, txt=batch_cond.txt, txt_ids=batch_cond.txt_ids,
            timesteps=torch.full((n,), t_curr, dtype=x.dtype, device=x.device), y=batch_cond.y,
            guidance=torch.full((n,), guidance, dtype=x.dtype, device=x.device), txt_attention_mask=batch_cond.txt_mask,
        )
        if use_cfg:
            pred_neg, pred_pos = pred.chunk(2)
            pred = pred_neg + cfg_scale * (pred_pos - pred_neg)
        img = img + (t_prev - t_curr) * pred
    return img
