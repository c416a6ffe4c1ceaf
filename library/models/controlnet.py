"""sd-scripts' FLUX ControlNet (`ControlNetFlux`, the XLabs design): files interchangeable with sd-scripts'.

A small copy of the transformer's input stack and first double blocks reads the noisy latent plus an encoded control
image and returns one residual per ControlNet block; the frozen transformer adds residual `b % n` to its image
stream after double block `b` (library/models/transformer.py, `double_block_residuals`). Key names are the module's own
parameter names, as sd-scripts saves them: `img_in.*`, `time_in.*`, `vector_in.*`, `guidance_in.*` (dev only),
`txt_in.*`, `double_blocks.{i}.*`, `controlnet_blocks.{i}.*`, `pos_embed_input.*`, `input_hint_block.{0,2,...,14}.*`
(and `single_blocks.*` / `controlnet_blocks_for_single.*` when a single depth is used).

The output projections (`controlnet_blocks*`) and the last hint convolution start at zero, so a new ControlNet
changes nothing until it is trained. Unlike sd-scripts (fresh random blocks), `controlnet_from_transformer` starts
the copied input stack and blocks from the transformer's weights, as diffusers' `from_transformer` does: the blocks
then already compute features the transformer understands.
"""

from __future__ import annotations

import re
from pathlib import Path
import torch
from torch import nn

from library.models.flux_math import joint_attention_mask, position_embedding
from library.models.transformer import DoubleStreamBlock, Flux, FluxParams, SingleStreamBlock, add_input_layers
from library.models.packing import pack_latents
from library.formats.safetensors_io import (FILE_KINDS, ModelFileError, assign_weights, detect_kind, load_tensors,
                                            read_header, sample_keys)

CONTROLNET_DEPTH = 2  # sd-scripts' flux_train_control_net.py: 2 double blocks, no single blocks
HINT_CHANNELS = 16
REQUIRED_KEYS = ("controlnet_blocks.0.weight", "input_hint_block.0.weight", "pos_embed_input.weight")


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _hint_encoder() -> nn.Sequential:
    """3-channel image in [-1, 1] at pixel size -> (B, 16, H/8, W/8); 8 convolutions (3 with stride 2), the last one
    zero. Module indices 0, 2, ..., 14 are the convolutions (the SiLUs between them hold no weights)."""
    c = HINT_CHANNELS
    layers: list[nn.Module] = [nn.Conv2d(3, c, 3, padding=1), nn.SiLU()]
    for stride in (1, 2, 1, 2, 1, 2):
        layers += [nn.Conv2d(c, c, 3, padding=1, stride=stride), nn.SiLU()]
    layers.append(_zero(nn.Conv2d(c, c, 3, padding=1)))
    return nn.Sequential(*layers)


def controlnet_residuals(net: nn.Module, img, txt, img_ids, txt_ids, vec, txt_attention_mask,
                         double_projections, single_projections) -> tuple[list, list]:
    """A ControlNet's blocks on embedded tokens, shared by both file layouts: each double block's image output and
    each single block's image part, through its zero-initialised projection. `net` has the transformer's
    `params`, `double_blocks` and `single_blocks`."""
    n_txt = txt.shape[1]
    pe = position_embedding(torch.cat((txt_ids, img_ids), dim=1), net.params.axes_dim, net.params.theta)
    mask = joint_attention_mask(txt_attention_mask, img.shape[1])
    double = []
    for block in net.double_blocks:
        img, txt = block(img, txt, vec, pe, mask)
        double.append(img)
    single = []
    x = torch.cat((txt, img), dim=1)
    for block in net.single_blocks:
        x = block(x, vec, pe, mask)
        single.append(x[:, n_txt:])
    return ([proj(s) for proj, s in zip(double_projections, double)],
            [proj(s) for proj, s in zip(single_projections, single)])


def unconsumed_parameters(net: nn.Module) -> list[str]:
    """Names of `net`'s parameters no output of `controlnet_residuals` depends on (they never get a gradient, which
    DDP must be told): without single blocks, the last double block's text stream after its attention."""
    if len(net.single_blocks) or not len(net.double_blocks):
        return []
    last = len(net.double_blocks) - 1
    return [f"double_blocks.{last}.{n}" for n, _ in net.double_blocks[last].named_parameters()
            if n.startswith(("txt_attn.proj.", "txt_mlp."))]


class ControlNetFlux(nn.Module):
    """The ControlNet: forward returns (double-block residuals, single-block residuals), each (B, N_img, hidden)."""

    residual_mapping = "repeat"  # sd-scripts / XLabs: base block b <- r[b % n]

    def __init__(self, params: FluxParams, controlnet_depth: int = CONTROLNET_DEPTH, controlnet_single_depth: int = 0):
        super().__init__()
        params.validate()
        self.params = params
        h = params.hidden_size
        add_input_layers(self, params)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(h, params.num_heads, params.mlp_hidden_dim, params.qkv_bias)
            for _ in range(controlnet_depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(h, params.num_heads, params.mlp_hidden_dim) for _ in range(controlnet_single_depth))
        self.controlnet_blocks = nn.ModuleList(_zero(nn.Linear(h, h)) for _ in range(controlnet_depth))
        self.controlnet_blocks_for_single = nn.ModuleList(
            _zero(nn.Linear(h, h)) for _ in range(controlnet_single_depth))
        self.pos_embed_input = nn.Linear(params.in_channels, h)  # default init, as sd-scripts
        self.input_hint_block = _hint_encoder()

    # the input stack works exactly as the transformer's: share its code, not a copy of it
    conditioning_vector = Flux.conditioning_vector
    unconsumed_parameters = unconsumed_parameters
    dtype = Flux.dtype
    device = Flux.device

    @property
    def depths(self) -> tuple[int, int]:
        return len(self.double_blocks), len(self.single_blocks)

    def forward(self, img, img_ids, controlnet_cond, txt, txt_ids, timesteps, y, guidance=None,
                txt_attention_mask=None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """img (B, N, 64) packed noisy latents, controlnet_cond (B, 3, 16h, 16w) in [-1, 1] for an h x w token grid;
        the other inputs as for `Flux.forward`."""
        hint = self.input_hint_block(controlnet_cond.to(img.dtype))
        if hint.shape[-2] * hint.shape[-1] // 4 != img.shape[1]:
            raise ValueError(f"control image {tuple(controlnet_cond.shape[-2:])} does not match the {img.shape[1]} "
                             "latent tokens (it must be the image size: 16 pixels per token side)")
        vec = self.conditioning_vector(timesteps, y, guidance, dtype=img.dtype)
        img = self.img_in(img) + self.pos_embed_input(pack_latents(hint))
        txt = self.txt_in(txt)
        # the image part of each single block (sd-scripts never trains these)
        return controlnet_residuals(self, img, txt, img_ids, txt_ids, vec, txt_attention_mask,
                                    self.controlnet_blocks, self.controlnet_blocks_for_single)


def controlnet_from_transformer(flux: Flux, controlnet_depth: int = CONTROLNET_DEPTH,
                                controlnet_single_depth: int = 0, dtype: torch.dtype = torch.float32,
                                device: torch.device | str | None = None) -> ControlNetFlux:
    """A new ControlNet whose input stack and blocks are copies of the transformer's first blocks; zero outputs."""
    p = flux.params
    if controlnet_depth > p.depth or controlnet_single_depth > p.depth_single_blocks:
        raise ValueError(f"a ControlNet of {controlnet_depth} double / {controlnet_single_depth} single blocks needs "
                         f"a transformer with at least as many (it has {p.depth} / {p.depth_single_blocks})")
    cn = ControlNetFlux(p, controlnet_depth, controlnet_single_depth)
    source = flux.state_dict()
    with torch.no_grad():
        for name, t in cn.state_dict().items():
            if name in source:  # all but controlnet_blocks*, pos_embed_input, input_hint_block
                t.copy_(source[name].to(t.dtype))  # upcasts bf16 base weights
    return cn.to(device or flux.device, dtype)


def count_blocks(keys, name: str) -> int:
    """How many `name.<i>.` blocks the keys hold (the highest index + 1)."""
    idx = {int(m.group(1)) for k in keys if (m := re.match(rf"{name}\.(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def block_depths(path, keys, blocks: tuple[str, str], projections: tuple[str, str]) -> tuple[int, int]:
    """(double, single) block counts of a ControlNet file, checked against its output projections (both layouts)."""
    depth, single = (count_blocks(keys, name) for name in blocks)
    have = tuple(count_blocks(keys, name) for name in projections)
    if have != (depth, single):
        raise ModelFileError(f"{path}: {depth} double / {single} single blocks but {have[0]} / {have[1]} output "
                             "projections; the file is incomplete")
    return depth, single


def controlnet_params(path: str | Path, base: FluxParams) -> tuple[FluxParams, int, int]:
    """(params, double depth, single depth) of a ControlNet file, from its header; checked against `base`."""
    header = read_header(path)
    keys = header.keys
    if not all(k in header.tensors for k in REQUIRED_KEYS):
        kind = detect_kind(keys)
        if any(k.startswith("controlnet_x_embedder") for k in keys):
            looks = "a diffusers-layout ControlNet (InstantX, jasperai, ...), not the sd-scripts/XLabs layout"
        else:
            looks = FILE_KINDS[kind] + (f" (sample keys: {sample_keys(keys)})" if kind == "unknown" else "")
        raise ModelFileError(f"{path}: expected an sd-scripts FLUX ControlNet (keys {', '.join(REQUIRED_KEYS)}), "
                             f"but this file looks like {looks}")
    width = header.tensors["controlnet_blocks.0.weight"].shape[0]
    if width != base.hidden_size:
        raise ModelFileError(f"{path}: ControlNet width {width} does not match the transformer's hidden size "
                             f"{base.hidden_size}: it was trained for another model")
    depth, single = block_depths(path, keys, ("double_blocks", "single_blocks"),
                                 ("controlnet_blocks", "controlnet_blocks_for_single"))
    from dataclasses import replace

    return replace(base, guidance_embed="guidance_in.in_layer.weight" in header.tensors), depth, single


def load_controlnet(path: str | Path, base: FluxParams, dtype: torch.dtype | None = torch.float32,
                    device: torch.device | str = "cpu") -> ControlNetFlux:
    """Load a ControlNet saved by sd-scripts or by this suite; strict (every tensor present, right shapes)."""
    params, depth, single = controlnet_params(path, base)
    with torch.device("meta"):
        cn = ControlNetFlux(params, depth, single)
    assign_weights(cn, load_tensors(path, dtype=dtype), path)
    return cn.to(device)


def controlnet_state_dict(cn: ControlNetFlux, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Tensors to save: the module's own names (as sd-scripts), optionally cast; detached CPU copies."""
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
            for k, v in cn.state_dict().items()}


# the transformer with a ControlNet (sd-scripts' or diffusers-layout, one or several): library/models/controlled.py
from library.models.controlled import ControlledFlux  # noqa: E402,F401  (its public path since sd-scripts' layout)
