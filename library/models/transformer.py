"""The FLUX.1 transformer in Black Forest Labs' checkpoint layout (the key names of flux1-dev.safetensors).

The model is written here rather than taken from diffusers so that its parameter names are the BFL ones (no key
conversion for the files users have, fused qkv and linear1 as kohya's LoRA names expect) and so that block
swapping and extension inputs can be added around a plain list of blocks. See docs/design.md.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch
from torch import nn

from library.models.flux_math import attention, joint_attention_mask, position_embedding, timestep_embedding


@dataclass(frozen=True)
class FluxParams:
    in_channels: int = 64
    out_channels: int = 64
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"axes_dim {self.axes_dim} must sum to the head dimension {self.head_dim}")


FLUX_PRESETS: dict[str, FluxParams] = {
    "dev": FluxParams(),
    "schnell": FluxParams(guidance_embed=False),
    # ostris' Flex.2-preview: 8 double blocks and img_in taking 196 features (8.16B parameters), for the planner
    "flex2": FluxParams(in_channels=196, depth=8),
    # Test presets: same structure, tiny widths (head dim 32 so that the 3 RoPE axes stay even).
    "tiny": FluxParams(vec_in_dim=64, context_in_dim=64, hidden_size=64, num_heads=2, depth=2,
                       depth_single_blocks=2, axes_dim=(4, 14, 14)),
    "tiny-schnell": FluxParams(vec_in_dim=64, context_in_dim=64, hidden_size=64, num_heads=2, depth=2,
                               depth_single_blocks=2, axes_dim=(4, 14, 14), guidance_embed=False),
}


def default_axes_dim(head_dim: int) -> tuple[int, int, int]:
    """FLUX splits a head into (1/8, 7/16, 7/16) for (index, row, column): (16, 56, 56) at head dim 128."""
    axes = (head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16)
    if sum(axes) != head_dim or any(a % 2 for a in axes):
        raise ValueError(f"no FLUX RoPE split for head dimension {head_dim} (needs a multiple of 32)")
    return axes


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # one fp32 copy, saved once for both the square and the product (not two)
        rrms = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (xf * rrms).to(x.dtype) * self.scale.to(x.dtype)


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query_norm(q).to(v.dtype), self.key_norm(k).to(v.dtype)


class SelfAttention(nn.Module):
    """Holds the fused qkv projection, QK norm and output projection; the attention itself is joint (in blocks)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return split_heads(self.qkv(x), self.num_heads, self.norm)


def split_heads(qkv: torch.Tensor, num_heads: int, norm: QKNorm):
    """(B, L, 3*H*D) -> normalised q, k and v, each (B, H, L, D)."""
    b, l, _ = qkv.shape
    q, k, v = qkv.view(b, l, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = norm(q, k, v)
    return q, k, v


class Modulation(nn.Module):
    """adaLN: (shift, scale, gate) chunks from the conditioning vector, one or two sets."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)

    def forward(self, vec: torch.Tensor) -> list[torch.Tensor]:
        return self.lin(nn.functional.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (1 + scale) * x + shift


def _layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


def _mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class DoubleStreamBlock(nn.Module):
    """Separate weights for image and text tokens, one joint attention over [txt; img]."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_hidden_dim: int, qkv_bias: bool):
        super().__init__()
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_norm1 = _layer_norm(hidden_size)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.img_norm2 = _layer_norm(hidden_size)
        self.img_mlp = _mlp(hidden_size, mlp_hidden_dim)
        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_norm1 = _layer_norm(hidden_size)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.txt_norm2 = _layer_norm(hidden_size)
        self.txt_mlp = _mlp(hidden_size, mlp_hidden_dim)

    def forward(self, img, txt, vec, pe, mask=None):
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.img_mod(vec)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_mod(vec)
        attn = attention(*self._joint_qkv(modulate(self.img_norm1(img), i_shift1, i_scale1),
                                          modulate(self.txt_norm1(txt), t_shift1, t_scale1)), pe, mask)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1]:]
        img = img + i_gate1 * self.img_attn.proj(img_attn)
        img = img + i_gate2 * self.img_mlp(modulate(self.img_norm2(img), i_shift2, i_scale2))
        txt = txt + t_gate1 * self.txt_attn.proj(txt_attn)
        txt = txt + t_gate2 * self.txt_mlp(modulate(self.txt_norm2(txt), t_shift2, t_scale2))
        return img, txt

    def _joint_qkv(self, img, txt):
        """q, k, v over [txt; img]. A function of its own so that the per-stream heads -- views of each stream's
        qkv output -- are freed on return, not kept until the block ends (at 1024x1024, 72 MiB of image qkv)."""
        img_q, img_k, img_v = self.img_attn.qkv_heads(img)
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(txt)
        return torch.cat((txt_q, img_q), 2), torch.cat((txt_k, img_k), 2), torch.cat((txt_v, img_v), 2)


class SingleStreamBlock(nn.Module):
    """One weight set over the joint sequence; qkv and the MLP input share `linear1`, outputs share `linear2`."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_hidden_dim: int):
        super().__init__()
        self.hidden_size, self.num_heads, self.mlp_hidden_dim = hidden_size, num_heads, mlp_hidden_dim
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden_size + mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = _layer_norm(hidden_size)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False)

    def forward(self, x, vec, pe, mask=None):
        shift, scale, gate = self.modulation(vec)
        q, k, v, mlp = self._split_linear1(modulate(self.pre_norm(x), shift, scale))
        out = self.linear2(torch.cat((attention(q, k, v, pe, mask), self.mlp_act(mlp)), dim=2))
        return x + gate * out

    def _split_linear1(self, x):
        """q, k, v and the MLP input from linear1, made in a function whose locals end here. In bf16/fp16 the QK
        norm keeps fp32 copies of q and k, so v and the MLP input are copied out too: kept for backward as views
        (by attention and the activation) they would keep all of linear1's output alive, q and k parts included.
        In fp32 the norm keeps q and k as views of that output anyway, and copies would only add."""
        qkv, mlp = self.linear1(x).split([3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        q, k, v = split_heads(qkv, self.num_heads, self.norm)
        if qkv.dtype == torch.float32:
            return q, k, v, mlp
        return q, k, v.contiguous(), mlp.contiguous()


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.norm_final = _layer_norm(hidden_size)
        self.linear = nn.Linear(hidden_size, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def add_input_layers(module: nn.Module, params: FluxParams) -> None:
    """The input stack under FLUX's names (img_in, time_in, vector_in, guidance_in, txt_in): the transformer's and
    the ControlNet's, which must stay the same for ControlNets to start from (and load into) the transformer."""
    h = params.hidden_size
    module.img_in = nn.Linear(params.in_channels, h)
    module.time_in = MLPEmbedder(256, h)
    module.vector_in = MLPEmbedder(params.vec_in_dim, h)
    module.guidance_in = MLPEmbedder(256, h) if params.guidance_embed else nn.Identity()
    module.txt_in = nn.Linear(params.context_in_dim, h)


class Flux(nn.Module):
    """FLUX.1 transformer. Inputs and outputs are packed latents (2x2 patches of 16 channels = 64 per token)."""

    def __init__(self, params: FluxParams):
        super().__init__()
        params.validate()
        self.params = params
        h = params.hidden_size
        add_input_layers(self, params)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(h, params.num_heads, params.mlp_hidden_dim, params.qkv_bias) for _ in range(params.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(h, params.num_heads, params.mlp_hidden_dim) for _ in range(params.depth_single_blocks))
        self.final_layer = LastLayer(h, params.out_channels)

    @property
    def is_schnell(self) -> bool:
        return not self.params.guidance_embed

    @property
    def dtype(self) -> torch.dtype:
        return self.img_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.img_in.weight.device

    def conditioning_vector(self, timesteps, y, guidance=None, dtype: torch.dtype | None = None,
                            bypass_guidance: bool = False) -> torch.Tensor:
        """time + guidance + pooled-text embedding, computed in `dtype` (the activations' dtype; weights may be fp8).
        `bypass_guidance`: without the guidance term (Flex.2 trains with its guidance embedder bypassed)."""
        dtype = dtype or y.dtype
        vec = self.time_in(timestep_embedding(timesteps, 256).to(dtype))
        if self.params.guidance_embed and not bypass_guidance:
            if guidance is None:
                raise ValueError("this FLUX model has a guidance embedder (dev): pass `guidance`")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(dtype))
        return vec + self.vector_in(y.to(dtype))

    def forward(
        self,
        img: torch.Tensor,
        img_ids: torch.Tensor,
        txt: torch.Tensor,
        txt_ids: torch.Tensor,
        timesteps: torch.Tensor,
        y: torch.Tensor,
        guidance: torch.Tensor | None = None,
        txt_attention_mask: torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        double_block_residuals: Sequence[torch.Tensor] | None = None,
        single_block_residuals: Sequence[torch.Tensor] | None = None,
        num_output_tokens: int | None = None,
        bypass_guidance: bool = False,
    ) -> torch.Tensor:
        """Velocity prediction for packed image tokens.

        img (B, N, in_channels), img_ids (B, N, 3), txt (B, L, context_in_dim), txt_ids (B, L, 3), timesteps (B,) in
        [0, 1], y (B, vec_in_dim) pooled CLIP-L, guidance (B,) embedded guidance scale, txt_attention_mask (B, L)
        with 1 for real text tokens. Extension points for conditioned variants:
        - extra input channels: a params.in_channels > 64 model takes the channel-concatenated tokens as `img`;
        - appended image tokens (reference images): append them and their ids to `img`/`img_ids` and pass
          `num_output_tokens` to return only the first (target) tokens;
        - appended or replaced text tokens: supply `txt`/`txt_ids`/`y` accordingly;
        - `attention_mask`: an extra boolean or additive mask over the joint [txt; img] sequence;
        - `double_block_residuals` / `single_block_residuals`: ControlNet residuals (B, N_img, hidden); block b gets
          residuals[b % len(residuals)] added to its image tokens (to the first ones when the residual is
          shorter: the target tokens of a Kontext call, before its reference tokens);
        - `bypass_guidance`: the conditioning vector without the guidance embedder's term (`guidance` is ignored;
          ai-toolkit's bypass_guidance_embedding, with which Flex.2 is trained).
        """
        n_txt = txt.shape[1]
        vec = self.conditioning_vector(timesteps, y, guidance, dtype=img.dtype, bypass_guidance=bypass_guidance)
        img = self.img_in(img)
        txt = self.txt_in(txt)
        pe = position_embedding(torch.cat((txt_ids, img_ids), dim=1), self.params.axes_dim, self.params.theta)
        mask = joint_attention_mask(txt_attention_mask, img.shape[1], attention_mask)

        for i, block in enumerate(self.double_blocks):
            img, txt = block(img, txt, vec, pe, mask)
            if double_block_residuals:
                img = _add_residual(img, double_block_residuals[i % len(double_block_residuals)])

        x = torch.cat((txt, img), dim=1)
        for i, block in enumerate(self.single_blocks):
            x = block(x, vec, pe, mask)
            if single_block_residuals:
                r = single_block_residuals[i % len(single_block_residuals)]
                x = torch.cat((x[:, :n_txt], _add_residual(x[:, n_txt:], r)), dim=1)

        img = x[:, n_txt:]
        if num_output_tokens is not None:
            img = img[:, :num_output_tokens]
        return self.final_layer(img, vec)


def _add_residual(img: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    n = r.shape[1]
    return img + r if n == img.shape[1] else torch.cat((img[:, :n] + r, img[:, n:]), dim=1)


class FluxWrapper(nn.Module):
    """A model with the transformer's call signature that adds a condition around `self.flux` (a ControlNet,
    reference tokens, extra input channels); callers read the transformer's params through it."""

    def __init__(self, flux: nn.Module):
        super().__init__()
        self.flux = flux

    @property
    def params(self):
        return self.flux.params

    @property
    def is_schnell(self) -> bool:
        return self.flux.is_schnell


def params_with_overrides(preset: str | FluxParams, **overrides) -> FluxParams:
    base = FLUX_PRESETS[preset] if isinstance(preset, str) else preset
    return replace(base, **overrides)
