"""The FLUX autoencoder (reference 5.4) with the exact key layout of BFL's ae.safetensors.

Images in [-1, 1] map to 16-channel latents at 1/8 resolution, scaled as `scale_factor * (z - shift_factor)` so
the transformer sees roughly unit-variance inputs. Large images can be encoded/decoded in overlapping tiles.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from library.formats.safetensors_io import (
                                            ModelFileError,
                                            SafetensorsHeader,
                                            assign_weights,
                                            expect_kind,
                                            load_tensors,
                                            read_header,
                                            strip_prefix,
                                            )


@dataclass(frozen=True)
class AEParams:
    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159


AE_PRESETS = {
    "flux": AEParams(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2),  # dev and schnell share this AE
    # Four levels keep the 8x downsampling; channels stay multiples of 32 for GroupNorm(32) and the
    # 1 -> 2 step exercises the 1x1 nin_shortcut.
    "tiny": AEParams(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1),
}

AE_PREFIXES = ("first_stage_model.", "vae.")  # seen in merged checkpoints and some re-uploads


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        # (B, C, H, W) -> (B, 1 head, H*W, C)
        q, k, v = (m(y).reshape(b, 1, c, h * w).transpose(-1, -2) for m in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)
        y = y.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(y)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric padding (right/bottom only) is what the trained weights expect.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(channels: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels)
    return mid


def _run_mid(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, p: AEParams):
        super().__init__()
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = p.ch
        for level, mult in enumerate(p.ch_mult):
            block_out = p.ch * mult
            down = nn.Module()
            down.block = nn.ModuleList()
            for _ in range(p.num_res_blocks):
                down.block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            if level != len(p.ch_mult) - 1:
                down.downsample = Downsample(block_in)
            self.down.append(down)
        self.mid = _mid(block_in)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * p.z_channels, 3, padding=1)  # mean and logvar

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for down in self.down:
            for block in down.block:
                h = block(h)
            if hasattr(down, "downsample"):
                h = down.downsample(h)
        h = _run_mid(self.mid, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, p: AEParams):
        super().__init__()
        block_in = p.ch * p.ch_mult[-1]
        self.conv_in = nn.Conv2d(p.z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in)
        # Built from the deepest level up, but indexed by level so keys read decoder.up.{level}.
        up_levels = []
        for level in reversed(range(len(p.ch_mult))):
            block_out = p.ch * p.ch_mult[level]
            up = nn.Module()
            up.block = nn.ModuleList()
            for _ in range(p.num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            if level != 0:
                up.upsample = Upsample(block_in)
            up_levels.insert(0, up)
        self.up = nn.ModuleList(up_levels)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, p.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = _run_mid(self.mid, self.conv_in(z))
        for up in reversed(self.up):
            for block in up.block:
                h = block(h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------------------------------------------
# Tiling: overlapping tiles blended with linear ramps, weights normalised so any overlap pattern sums to 1


def _tile_starts(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]  # last tile flush with the edge (may overlap its neighbour more)


def _ramp(length: int, ramp: int, at_start: bool, at_end: bool, device, dtype) -> torch.Tensor:
    """1-D weights: rising over `ramp` cells on inner edges, 1 at the image border (no neighbour to blend with)."""
    i = torch.arange(length, device=device, dtype=torch.float32)
    w = torch.ones(length, device=device, dtype=torch.float32)
    if not at_start:
        w = torch.minimum(w, (i + 1) / (ramp + 1))
    if not at_end:
        w = torch.minimum(w, (length - i) / (ramp + 1))
    return w.to(dtype)


def _tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int,
           scale: float) -> torch.Tensor:
    """Apply `fn` (which resizes by `scale`) on overlapping tiles of `x` and blend the results.

    `tile` and `overlap` are in input cells; input tile offsets times `scale` must be whole output cells.
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be in [0, tile size), got overlap {overlap} for tile {tile}")
    H, W = x.shape[-2:]
    ys, xs = _tile_starts(H, tile, tile - overlap), _tile_starts(W, tile, tile - overlap)
    th, tw = min(tile, H), min(tile, W)
    ramp = max(1, round(overlap * scale))  # in output cells
    out = weight = None
    for y0 in ys:
        for x0 in xs:
            y = fn(x[..., y0:y0 + th, x0:x0 + tw]).float()
            if out is None:
                out = y.new_zeros(*y.shape[:-2], round(H * scale), round(W * scale))
                weight = y.new_zeros(round(H * scale), round(W * scale))
            oy, ox = round(y0 * scale), round(x0 * scale)
            oh, ow = y.shape[-2:]
            wy = _ramp(oh, ramp, y0 == 0, y0 + th == H, y.device, y.dtype)
            wx = _ramp(ow, ramp, x0 == 0, x0 + tw == W, y.device, y.dtype)
            w = wy[:, None] * wx[None, :]
            out[..., oy:oy + oh, ox:ox + ow] += y * w
            weight[oy:oy + oh, ox:ox + ow] += w
    return (out / weight).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------


class AutoEncoder(nn.Module):
    def __init__(self, params: AEParams):
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode(self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None,
               tiled: bool = False, tile_size: int = 512, tile_overlap: int = 64) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1], H and W multiples of 8 -> scaled latents (B, 16, H/8, W/8).

        The posterior mean by default; `sample=True` draws mean + std * eps with `generator`.
        `tile_size`/`tile_overlap` are in pixels (multiples of 8).
        """
        if x.shape[-1] % 8 or x.shape[-2] % 8:
            raise ValueError(f"image size {tuple(x.shape[-2:])} must be a multiple of 8")
        x = x.to(device=self.device, dtype=self.dtype)
        if tiled:
            if tile_size % 8 or tile_overlap % 8:
                raise ValueError(f"tile size {tile_size} and overlap {tile_overlap} must be multiples of 8 pixels")
            moments = _tiled(self.encoder, x, tile_size, tile_overlap, 1 / 8)
        else:
            moments = self.encoder(x)
        mean, logvar = moments.chunk(2, dim=1)
        z = mean
        if sample:
            # Noise in fp32 on the generator's device, so a seed gives the same latents for any model dtype/device.
            eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32,
                              device=generator.device if generator is not None else mean.device)
            z = mean + torch.exp(0.5 * logvar) * eps.to(mean)
        return self.params.scale_factor * (z - self.params.shift_factor)

    def decode(self, z: torch.Tensor, tiled: bool = False, tile_size: int = 64, tile_overlap: int = 8) -> torch.Tensor:
        """Scaled latents (B, 16, h, w) -> images (B, 3, 8h, 8w), roughly in [-1, 1].

        `tile_size`/`tile_overlap` are in latent cells.
        """
        z = z.to(device=self.device, dtype=self.dtype)
        z = z / self.params.scale_factor + self.params.shift_factor
        if tiled:
            return _tiled(self.decoder, z, tile_size, tile_overlap, 8)
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


# ----------------------------------------------------------------------------------------------------------------
# Loading


def infer_ae_params(header_or_shapes: SafetensorsHeader | Mapping[str, object], **overrides) -> AEParams:
    """Derive AEParams from tensor shapes (a header, or a mapping of key -> shape or tensor).

    Scale and shift are not stored in the file; they keep the FLUX values unless given in `overrides`.
    """
    if isinstance(header_or_shapes, SafetensorsHeader):
        where = f"{header_or_shapes.path}: "
        shapes = {k: info.shape for k, info in header_or_shapes.tensors.items()}
    else:
        where = ""
        shapes = {k: tuple(getattr(v, "shape", v)) for k, v in header_or_shapes.items()}
    prefix = strip_prefix(shapes, AE_PREFIXES)
    shapes = {k[len(prefix):]: s for k, s in shapes.items()}

    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise ModelFileError(f"{where}cannot read the autoencoder configuration: tensor {key!r} is missing")
        return shapes[key]

    def count(pattern: str) -> int:
        return len({m.group(1) for k in shapes if (m := re.match(pattern, k))})

    ch = shape("encoder.conv_in.weight")[0]
    levels = count(r"encoder\.down\.(\d+)\.")
    num_res_blocks = count(r"encoder\.down\.0\.block\.(\d+)\.")
    ch_mult = tuple(shape(f"encoder.down.{lv}.block.0.conv1.weight")[0] // ch for lv in range(levels))
    params = dict(
        in_channels=shape("encoder.conv_in.weight")[1],
        ch=ch,
        out_ch=shape("decoder.conv_out.weight")[0],
        ch_mult=ch_mult,
        num_res_blocks=num_res_blocks,
        z_channels=shape("decoder.conv_in.weight")[1],
    )
    params.update(overrides)
    return AEParams(**params)


def load_ae(path: str | os.PathLike, dtype: torch.dtype | None = None,
            device: str | torch.device = "cpu") -> AutoEncoder:
    """Load a FLUX autoencoder from a .safetensors file (BFL ae.safetensors layout).

    The configuration is read from the tensor shapes, so the real AE and small test files load alike.
    Keys may carry a "first_stage_model." or "vae." prefix. `dtype` casts floating tensors while reading (None
    keeps the file's dtype). Returns the model on `device` in eval mode.
    Raises ModelFileError naming the file if it is not an autoencoder, or a tensor is missing or mis-shaped.
    """
    header = read_header(path)
    expect_kind(header, "ae", "the autoencoder (--ae)")
    prefix = strip_prefix(header.keys, AE_PREFIXES)
    params = infer_ae_params(header)
    with torch.device("meta"):
        model = AutoEncoder(params)
    rename = {k: k[len(prefix):] for k in header.keys} if prefix else None
    state_dict = load_tensors(path, dtype=dtype, rename=rename)
    assign_weights(model, state_dict, path)
    return model.to(device).eval()
