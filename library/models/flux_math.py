"""Pure functions of the FLUX.1 transformer: rotary position embedding, attention, timestep embedding."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rope(pos: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    """Rotation matrices for positions `pos` (B, L) on one axis: (B, L, dim/2, 2, 2), computed in float64."""
    if dim % 2:
        raise ValueError(f"rope axis dimension must be even, got {dim}")
    # MPS has no float64; elsewhere float64 keeps large positions exact.
    work = torch.float32 if pos.device.type == "mps" else torch.float64
    omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=work, device=pos.device) / dim)
    angles = pos.to(work).unsqueeze(-1) * omega
    cos, sin = torch.cos(angles), torch.sin(angles)
    return torch.stack([cos, -sin, sin, cos], dim=-1).view(*angles.shape, 2, 2).float()


def position_embedding(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: float) -> torch.Tensor:
    """RoPE for 3-axis position ids (B, L, n_axes) -> (B, 1, L, head_dim/2, 2, 2), one head axis to broadcast."""
    return torch.cat([rope(ids[..., i], d, theta) for i, d in enumerate(axes_dim)], dim=-3).unsqueeze(1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate consecutive pairs of q and k (B, H, L, D) by `pe`, in fp32, returning the input dtype."""

    def rotate(x: torch.Tensor) -> torch.Tensor:
        pairs = x.float().reshape(*x.shape[:-1], -1, 1, 2)
        out = pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]
        return out.reshape(x.shape).type_as(x)

    return rotate(q), rotate(k)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pe: torch.Tensor,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Joint attention with RoPE: (B, H, L, D) each -> (B, L, H*D). `mask` is boolean (True = attend) or additive."""
    q, k = apply_rope(q, k, pe)
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    b, h, l, d = x.shape
    return x.transpose(1, 2).reshape(b, l, h * d)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, time_factor: float = 1000.0):
    """Sinusoidal embedding of t (B,) in [0, 1] (scaled by 1000 as BFL does): [cos, sin] halves, t's dtype."""
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb.to(t.dtype) if torch.is_floating_point(t) else emb


def joint_attention_mask(txt_mask: torch.Tensor | None, n_img: int,
                         extra: torch.Tensor | None = None) -> torch.Tensor | None:
    """Key mask over the joint sequence [txt; img] from a (B, L_txt) text mask, as (B, 1, 1, L_txt + n_img).

    `extra` is an additive (or boolean) mask over the whole joint sequence, broadcastable to (B, H, L, L), that
    callers supply for regional control; it is combined with the text mask.
    """
    mask = None
    if txt_mask is not None:
        ones = torch.ones(txt_mask.shape[0], n_img, dtype=torch.bool, device=txt_mask.device)
        mask = torch.cat([txt_mask.bool(), ones], dim=1)[:, None, None, :]
    if extra is None:
        return mask
    if mask is None:
        return extra
    if extra.dtype == torch.bool:
        return mask & extra
    return extra.masked_fill(~mask, float("-inf"))
