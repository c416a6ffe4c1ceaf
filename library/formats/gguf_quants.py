"""GGUF (ggml) tensor types: their block layout, bytes per parameter, and dequantization in torch.

Each dequantizer takes a tensor's raw bytes (uint8, any shape whose last dimension holds whole blocks) and returns
float32 values in row-major order, with the same float32 operations in the same order as the `gguf` package's numpy
dequantizers, so the two agree bit for bit (tests/test_gguf.py). Vectorised over all blocks at once, so they run on
the device the bytes are on (one layer at a time, GGUFLinear in library/memory/gguf_linear.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

QK_K = 256  # values per super-block of the K-quants


@dataclass(frozen=True)
class GGUFType:
    name: str
    type_id: int  # ggml's enum value, as stored in a .gguf tensor header
    block_size: int  # values per block
    type_size: int  # bytes per block
    f16_fields: tuple[int, ...] = ()  # byte offsets of the float16 scales in a block (the rest: packed integers)

    @property
    def bytes_per_param(self) -> float:
        return self.type_size / self.block_size

    @property
    def quantized(self) -> bool:
        return self.name not in ("F32", "F16", "BF16")


GGUF_TYPES: dict[str, GGUFType] = {t.name: t for t in (
    GGUFType("F32", 0, 1, 4),
    GGUFType("F16", 1, 1, 2),
    GGUFType("BF16", 30, 1, 2),
    GGUFType("Q8_0", 8, 32, 2 + 32, (0,)),
    GGUFType("Q5_1", 7, 32, 2 + 2 + 4 + 16, (0, 2)),
    GGUFType("Q5_0", 6, 32, 2 + 4 + 16, (0,)),
    GGUFType("Q4_1", 3, 32, 2 + 2 + 16, (0, 2)),
    GGUFType("Q4_0", 2, 32, 2 + 16, (0,)),
    GGUFType("Q6_K", 14, QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2, (208,)),
    GGUFType("Q5_K", 13, QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2, (0, 2)),
    GGUFType("Q4_K", 12, QK_K, 2 + 2 + 12 + QK_K // 2, (0, 2)),
    GGUFType("Q3_K", 11, QK_K, QK_K // 8 + QK_K // 4 + 12 + 2, (108,)),
    GGUFType("Q2_K", 10, QK_K, QK_K // 16 + QK_K // 4 + 2 + 2, (80, 82)),
)}
GGUF_TYPE_BY_ID = {t.type_id: t for t in GGUF_TYPES.values()}

# Bytes per parameter of each supported type (the memory planner's input). The _S/_M/_L variants of the K-quant
# files are mixes of these types, chosen per tensor by the converter; their size is the sum over their tensors.
GGUF_BYTES_PER_PARAM: dict[str, float] = {name: t.bytes_per_param for name, t in GGUF_TYPES.items()}


def gguf_type(name: str) -> GGUFType:
    try:
        return GGUF_TYPES[name]
    except KeyError:
        raise ValueError(f"GGUF tensor type {name!r} is not supported; supported: {', '.join(GGUF_TYPES)}") from None


def raw_shape(shape: tuple[int, ...], qtype: GGUFType) -> tuple[int, ...]:
    """The uint8 shape holding a tensor of `shape` (torch order): the last dimension becomes bytes."""
    if shape[-1] % qtype.block_size:
        raise ValueError(f"a {qtype.name} tensor needs rows of a multiple of {qtype.block_size} values, got {shape}")
    return (*shape[:-1], shape[-1] // qtype.block_size * qtype.type_size)


def random_blocks(qtype: str, n_blocks: int, seed: int = 0, scale_std: float = 0.01) -> torch.Tensor:
    """(n_blocks, type_size) uint8 blocks of a quantized type with random packed values and finite random float16
    scales: valid data for tests and benchmarks of types nothing here quantizes to (the K-quants)."""
    t = gguf_type(qtype)
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (n_blocks, t.type_size), generator=g, dtype=torch.uint8)
    for at in t.f16_fields:
        scales = (torch.randn(n_blocks, generator=g) * scale_std).to(torch.float16)
        blocks[:, at:at + 2] = scales.view(torch.uint8).reshape(n_blocks, 2)
    return blocks


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Little-endian float16 fields (n, 2) of uint8 as float32 (n, 1)."""
    return b.contiguous().view(torch.float16).float()


@functools.lru_cache(maxsize=None)
def _shifts(shifts: tuple[int, ...], device: torch.device) -> torch.Tensor:
    # made once per device: a tensor built from a list each call would be a host-to-device copy that waits for the
    # GPU's queue, stalling the host (and with it block swapping's overlap)
    return torch.tensor(shifts, dtype=torch.uint8, device=device).view(len(shifts), 1)


def _bits(b: torch.Tensor, shifts: list[int], mask: int) -> torch.Tensor:
    """b (n, ..., 1, m) >> each shift (inserted at dim -2) & mask."""
    return (b >> _shifts(tuple(shifts), b.device)) & mask


def _nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """Low then high nibbles of each `group` bytes: (n, k*group) -> (n, k, 2, group)."""
    return _bits(qs.reshape(qs.shape[0], -1, 1, group), [0, 4], 0x0F)


def _high_bits(qh: torch.Tensor, n_out: int) -> torch.Tensor:
    """Bit i of 32-byte (or 4-byte) masks: (n, 32) -> (n, 8, 32), bit j of every byte in row j (K-quants);
    (n, 4) -> (n, 32) when n_out == 32 (element i = bit i of the little-endian uint32)."""
    n = qh.shape[0]
    if n_out == 32:
        return _bits(qh.reshape(n, 4, 1, 1), list(range(8)), 1).reshape(n, 32)
    return _bits(qh.reshape(n, -1, 1, 32), list(range(8)), 1).reshape(n, -1, 32)


def _q8_0(b):
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b[:, :2])


def _q4_0(b):
    q = _nibbles(b[:, 2:], 16).reshape(b.shape[0], -1).to(torch.int8) - 8
    return _f16(b[:, :2]) * q.float()


def _q4_1(b):
    q = _nibbles(b[:, 4:], 16).reshape(b.shape[0], -1).float()
    return _f16(b[:, :2]) * q + _f16(b[:, 2:4])


def _q5(b, offset: int):
    """Q5_0 (offset 2, signed) and Q5_1 (offset 4, with a minimum): scale(s), 32 high bits, 16 bytes of nibbles."""
    n = b.shape[0]
    ql = _nibbles(b[:, offset + 4:], 16).reshape(n, -1)
    q = ql | (_high_bits(b[:, offset:offset + 4], 32) << 4)
    if offset == 2:
        return _f16(b[:, :2]) * (q.to(torch.int8) - 16).float()
    return _f16(b[:, :2]) * q.float() + _f16(b[:, 2:4])


def _q2_k(b):
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0xF).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    q = _bits(qs.reshape(n, -1, 1, 32), [0, 2, 4, 6], 3).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b):
    n = b.shape[0]
    hmask, qs, scales, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    low = _bits(scales[:, :8].reshape(n, 1, 8), [0, 4], 0x0F).reshape(n, 16)
    high = _bits(scales[:, 8:].reshape(n, 1, 4), [0, 2, 4, 6], 3).reshape(n, 16)
    sc = ((low | (high << 4)).to(torch.int8) - 32).float()
    dl = (d * sc).reshape(n, 16, 1)
    ql = _bits(qs.reshape(n, -1, 1, 32), [0, 2, 4, 6], 3).reshape(n, 16, 16)
    qh = _high_bits(hmask, 0).reshape(n, 16, 16) ^ 1  # a set mask bit means no -4 offset
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()
    return (dl * q).reshape(n, QK_K)


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit scales and minimums packed in 12 bytes (Q4_K, Q5_K), each (n, 8) uint8."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _q45_k(b, five: bool):
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scales(b[:, 4:16])
    d = (d * sc.float()).reshape(n, -1, 1)
    dm = (dmin * mn.float()).reshape(n, -1, 1)
    qs = b[:, 48:] if five else b[:, 16:]
    q = _nibbles(qs, 32).reshape(n, -1, 32)
    if five:
        q = q | (_high_bits(b[:, 16:48], 0) << 4)
    return (d * q.float() - dm).reshape(n, QK_K)


def _q6_k(b):
    n = b.shape[0]
    ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
    d = (d * scales.contiguous().view(torch.int8).float()).reshape(n, 16, 1)
    low = _nibbles(ql, 64).reshape(n, -1, 32)
    high = _bits(qh.reshape(n, -1, 1, 32), [0, 2, 4, 6], 3).reshape(n, -1, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, -1).float()
    return (d * q).reshape(n, QK_K)


_DEQUANTIZE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "F32": lambda b: b.contiguous().view(torch.float32),
    "F16": lambda b: b.contiguous().view(torch.float16).float(),
    "BF16": lambda b: b.contiguous().view(torch.bfloat16).float(),
    "Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1,
    "Q5_0": lambda b: _q5(b, 2), "Q5_1": lambda b: _q5(b, 4),
    "Q2_K": _q2_k, "Q3_K": _q3_k,
    "Q4_K": lambda b: _q45_k(b, five=False), "Q5_K": lambda b: _q45_k(b, five=True),
    "Q6_K": _q6_k,
}


CHUNK_VALUES = 1 << 23  # values dequantized at a time: bounds the float32 intermediates (~5 x 32 MiB)


def dequantize(raw: torch.Tensor, qtype: str, shape: tuple[int, ...] | torch.Size,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values of a GGUF tensor of `shape` (torch order) from its raw bytes, in `dtype`.

    Computed in float32 (as the reference does) a chunk of blocks at a time into the output, so a large layer's
    transient is the output plus one chunk's intermediates rather than several float32 copies of the layer."""
    t = gguf_type(qtype)
    if raw.dtype != torch.uint8:
        raise TypeError(f"GGUF raw data must be uint8 bytes, got {raw.dtype}")
    blocks = raw.reshape(-1, t.type_size)
    fn, per = _DEQUANTIZE[qtype], max(1, CHUNK_VALUES // t.block_size)
    if blocks.shape[0] <= per:
        return fn(blocks).reshape(shape).to(dtype)
    out = torch.empty(blocks.shape[0], t.block_size, dtype=dtype, device=raw.device)
    for i in range(0, blocks.shape[0], per):
        out[i:i + per] = fn(blocks[i:i + per]).reshape(-1, t.block_size)
    return out.reshape(shape)
