"""Chroma (lodestones' FLUX.1-schnell derivative, Apache-2.0) in its released single-file layout.

Chroma keeps FLUX's image/text inputs and blocks but drops every modulation Linear, CLIP-L's vector input and the
time/guidance embedders: one small network, the approximator (`distilled_guidance_layer`), turns
[emb(t), emb(guidance), emb(index)] into one modulation vector per index, 3 per single block, 6 per stream of each
double block and 2 for the final layer (344 at full size), in that order: single blocks first, then the image
streams of the double blocks, then their text streams, then the final layer (the order diffusers'
ChromaTransformer2DModel reads them in).

The blocks are FLUX's own classes (library/models/transformer.py) with their modulation modules replaced by
`PrecomputedModulation`, which has no weights and splits the vectors it is given exactly as FLUX's `Modulation`
splits its Linear's output; FLUX's code paths are untouched. Block containers keep their names (`double_blocks`,
`single_blocks`), so block swapping, gradient checkpointing and the LoRA network (which finds blocks by class name)
work unchanged, and no LoRA module is made for modulation Linears that do not exist.

Text: T5-XXL only. `txt_attention_mask` is the tokenizer mask (1 for tokens, EOS included); like Chroma's reference
pipelines, the model attends the tokens and the first padding token after them (`chroma_text_mask`), and trims the
text to the longest such prefix of the batch (the masked tail changes nothing).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from library.models.flux_math import joint_attention_mask, position_embedding, timestep_embedding
from library.models.transformer import (
    DoubleStreamBlock,
    Flux,
    FluxParams,
    LastLayer,
    MLPEmbedder,
    RMSNorm,
    SingleStreamBlock,
)

APPROXIMATOR_KEY = "distilled_guidance_layer.in_proj.weight"  # the key that tells a Chroma file


@dataclass(frozen=True)
class ChromaParams(FluxParams):
    vec_in_dim: int = 0  # no CLIP-L vector input
    guidance_embed: bool = True  # the approximator takes a guidance value
    approximator_in_dim: int = 64  # 16 (time) + 16 (guidance) + 32 (index)
    approximator_hidden_size: int = 5120
    approximator_depth: int = 5

    @property
    def mod_index_length(self) -> int:
        return 3 * self.depth_single_blocks + 2 * 6 * self.depth + 2

    def validate(self) -> None:
        super().validate()
        if self.approximator_in_dim % 4:
            raise ValueError(f"approximator_in_dim {self.approximator_in_dim} must be a multiple of 4")


CHROMA_PRESETS: dict[str, ChromaParams] = {
    "chroma": ChromaParams(),
    # test preset: FLUX's tiny widths, a small approximator
    "tiny": ChromaParams(context_in_dim=64, hidden_size=64, num_heads=2, depth=2, depth_single_blocks=2,
                         axes_dim=(4, 14, 14), approximator_hidden_size=96, approximator_depth=2),
}


class PrecomputedModulation(nn.Module):
    """Stands where FLUX's `Modulation` stands, without weights: from a block's modulation vectors (B, n, hidden)
    it takes `count` of them from `offset` on, as the chunks (B, 1, hidden) FLUX's module computes from `vec`."""

    def __init__(self, count: int, offset: int = 0):
        super().__init__()
        self.multiplier, self.offset = count, offset

    def vectors(self, vec: torch.Tensor) -> torch.Tensor:
        if vec.dim() != 3 or vec.shape[1] < self.offset + self.multiplier:
            raise ValueError(f"expected at least {self.offset + self.multiplier} modulation vectors "
                             f"(B, n, hidden), got shape {tuple(vec.shape)}")
        return vec[:, self.offset: self.offset + self.multiplier]

    def forward(self, vec: torch.Tensor) -> list[torch.Tensor]:
        return list(self.vectors(vec).unsqueeze(2).unbind(1))


class _FinalModulation(PrecomputedModulation):
    """The final layer's (shift, scale) as the (B, 2 * hidden) row LastLayer chunks (its adaLN Linear's output)."""

    def forward(self, vec: torch.Tensor) -> torch.Tensor:
        return self.vectors(vec).flatten(1)


class Approximator(nn.Module):
    """in_proj -> depth x (x + MLPEmbedder(RMSNorm(x))) -> out_proj, under lodestones' names."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, depth: int):
        super().__init__()
        self.in_proj = nn.Linear(in_dim, hidden)
        self.layers = nn.ModuleList(MLPEmbedder(hidden, hidden) for _ in range(depth))
        self.norms = nn.ModuleList(RMSNorm(hidden) for _ in range(depth))
        self.out_proj = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_proj(x)
        for layer, norm in zip(self.layers, self.norms):
            x = x + layer(norm(x))
        return self.out_proj(x)


def chroma_double_block(p: ChromaParams) -> DoubleStreamBlock:
    block = DoubleStreamBlock(p.hidden_size, p.num_heads, p.mlp_hidden_dim, p.qkv_bias)
    block.img_mod, block.txt_mod = PrecomputedModulation(6), PrecomputedModulation(6, offset=6)
    return block


def chroma_single_block(p: ChromaParams) -> SingleStreamBlock:
    block = SingleStreamBlock(p.hidden_size, p.num_heads, p.mlp_hidden_dim)
    block.modulation = PrecomputedModulation(3)
    return block


def chroma_text_mask(t5_mask: torch.Tensor) -> torch.Tensor:
    """Chroma's text mask from a tokenizer mask (B, L): the tokens and the first padding token after them (as
    diffusers' ChromaPipeline: position <= number of tokens), boolean."""
    n = t5_mask.to(torch.int64).sum(dim=1, keepdim=True)
    return torch.arange(t5_mask.shape[1], device=t5_mask.device)[None] <= n


class Chroma(Flux):
    """The Chroma transformer, called like `Flux` (`y` is ignored: there is no CLIP input)."""

    family = "chroma"

    def __init__(self, params: ChromaParams):
        nn.Module.__init__(self)
        params.validate()
        self.params = params
        h = params.hidden_size
        self.img_in = nn.Linear(params.in_channels, h)
        self.txt_in = nn.Linear(params.context_in_dim, h)
        self.distilled_guidance_layer = Approximator(params.approximator_in_dim, params.approximator_hidden_size,
                                                     h, params.approximator_depth)
        self.double_blocks = nn.ModuleList(chroma_double_block(params) for _ in range(params.depth))
        self.single_blocks = nn.ModuleList(chroma_single_block(params) for _ in range(params.depth_single_blocks))
        self.final_layer = LastLayer(h, params.out_channels)
        self.final_layer.adaLN_modulation = _FinalModulation(2)

    @property
    def is_schnell(self) -> bool:
        return False

    def approximator_input(self, timesteps: torch.Tensor, guidance: torch.Tensor | None,
                           dtype: torch.dtype) -> torch.Tensor:
        """(B, mod_index_length, approximator_in_dim): [emb(t), emb(guidance)] (a quarter each, t and guidance
        scaled by 1000 as FLUX's embedders do, in their own dtype as there) next to emb(index) (half), for every
        modulation index."""
        quarter = self.params.approximator_in_dim // 4
        n = self.params.mod_index_length
        if guidance is None:
            guidance = torch.zeros_like(timesteps)
        tg = torch.cat([timestep_embedding(timesteps, quarter).to(dtype),
                        timestep_embedding(guidance.to(timesteps.device), quarter).to(dtype)], dim=1)
        index = timestep_embedding(torch.arange(n, device=timesteps.device, dtype=torch.float32), 2 * quarter)
        index = index.to(dtype)
        return torch.cat([tg[:, None, :].expand(-1, n, -1), index[None].expand(tg.shape[0], -1, -1)], dim=-1)

    def modulation_vectors(self, timesteps, guidance=None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The approximator's output (B, mod_index_length, hidden), computed in `dtype`."""
        return self.distilled_guidance_layer(self.approximator_input(timesteps, guidance, dtype or torch.float32))

    def conditioning_vector(self, timesteps, y=None, guidance=None, dtype: torch.dtype | None = None):
        return self.modulation_vectors(timesteps, guidance, dtype)

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y=None, guidance=None, txt_attention_mask=None, *,
                attention_mask=None, double_block_residuals=None, single_block_residuals=None,
                num_output_tokens=None):
        """Velocity prediction for packed image tokens; arguments as `Flux.forward`. `txt_attention_mask` is the
        tokenizer mask (Chroma's one-padding-token rule is applied here); None attends every text token."""
        if double_block_residuals or single_block_residuals:
            raise ValueError("Chroma takes no ControlNet residuals")
        if txt_attention_mask is not None:
            txt_mask = chroma_text_mask(txt_attention_mask)
            if attention_mask is None:  # trim the text to the longest attended prefix of the batch
                keep = min(int(txt_mask.sum(dim=1).max()), txt.shape[1])
                txt, txt_ids, txt_mask = txt[:, :keep], txt_ids[:, :keep], txt_mask[:, :keep]
        else:
            txt_mask = None
        p = self.params
        mods = self.modulation_vectors(timesteps, guidance, dtype=img.dtype)
        single_end, double_img_end = 3 * p.depth_single_blocks, 3 * p.depth_single_blocks + 6 * p.depth
        img = self.img_in(img)
        txt = self.txt_in(txt)
        n_txt = txt.shape[1]
        pe = position_embedding(torch.cat((txt_ids, img_ids), dim=1), p.axes_dim, p.theta)
        mask = joint_attention_mask(txt_mask, img.shape[1], attention_mask)
        for i, block in enumerate(self.double_blocks):
            vec = torch.cat((mods[:, single_end + 6 * i: single_end + 6 * i + 6],
                             mods[:, double_img_end + 6 * i: double_img_end + 6 * i + 6]), dim=1)
            img, txt = block(img, txt, vec, pe, mask)
        x = torch.cat((txt, img), dim=1)
        for i, block in enumerate(self.single_blocks):
            x = block(x, mods[:, 3 * i: 3 * i + 3], pe, mask)
        img = x[:, n_txt:]
        if num_output_tokens is not None:
            img = img[:, :num_output_tokens]
        return self.final_layer(img, mods[:, -2:])


class NoCLIP(nn.Module):
    """Chroma's stand-in for CLIP-L (sd-scripts uses one too): no weights, no file, its pooled output zeros that the
    transformer never reads. Text encoding, the text-encoder caches and sampling then run unchanged; the cached
    `l_pooled` of a Chroma run is zeros. The one empty parameter only carries the device and dtype."""

    class Output:
        def __init__(self, pooler_output: torch.Tensor):
            self.pooler_output = pooler_output

    def __init__(self, dtype: torch.dtype = torch.float32, width: int = 768):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(0, dtype=dtype), requires_grad=False)
        self.width = width

    @property
    def dtype(self) -> torch.dtype:
        return self.anchor.dtype

    def forward(self, input_ids: torch.Tensor, **_):
        return self.Output(torch.zeros(input_ids.shape[0], self.width, dtype=self.anchor.dtype,
                                       device=self.anchor.device))


def params_with_overrides(preset: str | ChromaParams, **overrides) -> ChromaParams:
    base = CHROMA_PRESETS[preset] if isinstance(preset, str) else preset
    return replace(base, **overrides)
