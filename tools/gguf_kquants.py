"""Plain K-quant encoders (Q2_K to Q6_K) for tools/make_tiny_models.py --gguf_type: the gguf package quantizes only
the simple types, and tiny test models need K-quant files whose values approximate the model's weights.

Each encoder takes a sub-block's range (min/max, or max magnitude), rounds the per-sub-block scales to the type's
integer scales under float16 super-block scales, then rounds each value; the bytes are laid out exactly as
library/formats/gguf_quants.py (bit-exact with the gguf package) reads them back. llama.cpp's quantizers search the
scales for a lower error; these do not, which is fine for test models and not meant for converting real ones.
"""

from __future__ import annotations

import torch

from library.formats.gguf_quants import QK_K, gguf_type


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """(n,) float -> (n, 2) uint8 of its float16 value."""
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def _f16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).float()


def _round_div(x: torch.Tensor, step: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """round(x / step) clamped to [lo, hi]; 0 where step is 0."""
    safe = torch.where(step == 0, torch.ones_like(step), step)
    return torch.where(step == 0, torch.zeros_like(x), torch.round(x / safe)).clamp(lo, hi)


def _nibble_pack(q: torch.Tensor, group: int) -> torch.Tensor:
    """(n, k*2*group) values < 16 -> (n, k*group) bytes: per `group` bytes, low nibbles then high nibbles."""
    n = q.shape[0]
    v = q.to(torch.uint8).reshape(n, -1, 2, group)
    return (v[:, :, 0] | (v[:, :, 1] << 4)).reshape(n, -1)


def _two_bits(q: torch.Tensor) -> torch.Tensor:
    """(n, 256) values < 4 -> (n, 64): byte h*32+k holds rows h*4+s of (n, 8, 32) at bit 2s."""
    v = q.to(torch.uint8).reshape(q.shape[0], 2, 4, 32)
    return (v[:, :, 0] | (v[:, :, 1] << 2) | (v[:, :, 2] << 4) | (v[:, :, 3] << 6)).reshape(q.shape[0], 64)


def _one_bit(q: torch.Tensor) -> torch.Tensor:
    """(n, 256) bits -> (n, 32): bit j of byte k is row j of (n, 8, 32), column k."""
    v = q.to(torch.uint8).reshape(q.shape[0], 8, 32)
    out = torch.zeros(q.shape[0], 32, dtype=torch.uint8)
    for j in range(8):
        out |= v[:, j] << j
    return out


def _asymmetric(x: torch.Tensor, levels: int, scale_levels: int):
    """Per sub-block (the last dim): integer scale and minimum under float16 super-block scales, and the values.
    Returns (d, dmin, sc, mq, q)."""
    lo = x.amin(-1).clamp(max=0)
    scale = (x.amax(-1) - lo) / levels
    d, dmin = _f16(scale.amax(-1) / scale_levels), _f16((-lo).amax(-1) / scale_levels)
    sc = _round_div(scale, d[:, None], 0, scale_levels)
    mq = _round_div(-lo, dmin[:, None], 0, scale_levels)
    q = _round_div(x + (dmin[:, None] * mq)[..., None], (d[:, None] * sc)[..., None], 0, levels)
    return d, dmin, sc, mq, q


def _symmetric(x: torch.Tensor, low: int, high: int, scale_max: int):
    """Per sub-block: a non-negative integer scale under a float16 super-block scale; values in [low, high]."""
    scale = x.abs().amax(-1) / -low
    d = _f16(scale.amax(-1) / scale_max)
    sc = _round_div(scale, d[:, None], 0, scale_max)
    q = _round_div(x, (d[:, None] * sc)[..., None], low, high)
    return d, sc, q


def _k_scale_bytes(sc: torch.Tensor, mq: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and minimums -> the 12 bytes Q4_K/Q5_K read."""
    sc, mq = sc.to(torch.uint8), mq.to(torch.uint8)
    first = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    second = mq[:, :4] | ((mq[:, 4:] >> 4) << 6)
    third = (sc[:, 4:] & 0x0F) | ((mq[:, 4:] & 0x0F) << 4)
    return torch.cat([first, second, third], dim=1)


def _q45_k(x, five: bool):
    d, dmin, sc, mq, q = _asymmetric(x.reshape(-1, 8, 32), 31 if five else 15, 63)
    q = q.reshape(-1, QK_K).to(torch.uint8)
    parts = [_f16_bytes(d), _f16_bytes(dmin), _k_scale_bytes(sc, mq)]
    if five:
        parts.append(_one_bit(q >> 4))
    return torch.cat([*parts, _nibble_pack(q & 0x0F, 32)], dim=1)


def _q6_k(x):
    d, sc, q = _symmetric(x.reshape(-1, 16, 16), -32, 31, 127)
    u = (q.reshape(-1, QK_K) + 32).to(torch.uint8)
    scales = sc.to(torch.int8).view(torch.uint8)
    return torch.cat([_nibble_pack(u & 0x0F, 64), _two_bits(u >> 4), scales, _f16_bytes(d)], dim=1)


def _q3_k(x):
    d, sc, q = _symmetric(x.reshape(-1, 16, 16), -4, 3, 31)
    u = (q.reshape(-1, QK_K) + 4).to(torch.uint8)
    s = (sc + 32).to(torch.uint8)
    lo, hi = s & 0x0F, s >> 4
    scales = torch.cat([lo[:, :8] | (lo[:, 8:] << 4), _two_bits_of_scales(hi)], dim=1)
    return torch.cat([_one_bit(u >> 2), _two_bits(u & 3), scales, _f16_bytes(d)], dim=1)


def _two_bits_of_scales(hi: torch.Tensor) -> torch.Tensor:
    """(n, 16) values < 4 -> (n, 4): byte j holds scale s*4+j at bit 2s."""
    v = hi.reshape(-1, 4, 4)
    return v[:, 0] | (v[:, 1] << 2) | (v[:, 2] << 4) | (v[:, 3] << 6)


def _q2_k(x):
    d, dmin, sc, mq, q = _asymmetric(x.reshape(-1, 16, 16), 3, 15)
    scales = sc.to(torch.uint8) | (mq.to(torch.uint8) << 4)
    return torch.cat([scales, _two_bits(q.reshape(-1, QK_K)), _f16_bytes(d), _f16_bytes(dmin)], dim=1)


_ENCODE = {"Q6_K": _q6_k, "Q5_K": lambda x: _q45_k(x, True), "Q4_K": lambda x: _q45_k(x, False),
           "Q3_K": _q3_k, "Q2_K": _q2_k}
K_QUANTS = tuple(_ENCODE)


def quantize_k(values: torch.Tensor, qtype: str) -> torch.Tensor:
    """(rows, cols) values, cols a multiple of 256 -> (rows, bytes per row) uint8 blocks of `qtype`."""
    t = gguf_type(qtype)
    if qtype not in _ENCODE:
        raise ValueError(f"quantize_k encodes {', '.join(K_QUANTS)}, not {qtype}")
    rows, cols = values.shape
    if cols % QK_K:
        raise ValueError(f"{qtype} needs rows of a multiple of {QK_K} values, got {tuple(values.shape)}")
    blocks = _ENCODE[qtype](values.detach().float().reshape(-1, QK_K))
    assert blocks.shape[1] == t.type_size
    return blocks.reshape(rows, -1)
