"""FLUX.1 Kontext: reference images as extra image tokens, and BFL's size rules.

A reference image is AE-encoded (posterior mean), packed like the target and appended to the image stream with
position ids (1, row, col) on its own grid; the transformer runs unchanged and only the target tokens' prediction is
returned (`num_output_tokens`), so the loss and the sampler never see the reference tokens.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from library.models.packing import pack_latents, prepare_img_ids
from library.models.transformer import FluxWrapper

# BFL's preferred Kontext resolutions (width, height), ~1 MP each; list order breaks aspect-ratio ties
PREFERRED_KONTEXT_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
    (1568, 672),
)

# How several references are placed (BFL's reference code takes one): "overlap" puts every reference at (1, 0, 0)
# (DiffSynth); "columns" shifts reference i's column ids by the widths of the references before it (diffusers'
# community multi-image pipeline). Both are outside what Kontext was trained on.
MULTI_REFERENCE_LAYOUTS = ("overlap", "columns")


def snap_to_preferred(width: int, height: int) -> tuple[int, int]:
    """BFL's rule: the preferred size whose aspect ratio is nearest to width/height (first on ties), floored to 16."""
    aspect = width / height
    w, h = min(PREFERRED_KONTEXT_RESOLUTIONS, key=lambda wh: abs(wh[0] / wh[1] - aspect))
    return w // 16 * 16, h // 16 * 16


def size_for_aspect(aspect_ratio: float, area: int = 1024 * 1024) -> tuple[int, int]:
    """A target size of about `area` pixels at `aspect_ratio` (width / height), floored to multiples of 16."""
    width = round(math.sqrt(area * aspect_ratio))
    height = round(math.sqrt(area / aspect_ratio))
    return width // 16 * 16, height // 16 * 16


def reference_tokens(latents: Sequence[torch.Tensor], layout: str = "overlap"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed reference tokens (B, sum N_i, 64) and their ids (B, sum N_i, 3) from reference latents, each
    (B, 16, H_i/8, W_i/8) scaled as the AE's encode returns them."""
    if layout not in MULTI_REFERENCE_LAYOUTS:
        raise ValueError(f"reference layout {layout!r}: expected one of {', '.join(MULTI_REFERENCE_LAYOUTS)}")
    tokens, ids, column_offset = [], [], 0
    for lat in latents:
        b, _, h, w = lat.shape
        ph, pw = h // 2, w // 2
        tokens.append(pack_latents(lat))
        grid = prepare_img_ids(b, ph, pw, index=1).to(lat.device)
        if layout == "columns":
            grid[..., 2] += column_offset
            column_offset += pw
        ids.append(grid)
    return torch.cat(tokens, dim=1), torch.cat(ids, dim=1)


class KontextFlux(FluxWrapper):
    """The transformer with reference tokens appended, with the transformer's call signature and output (target
    tokens only). References come per call (`reference_tokens` / `reference_ids`: training passes each batch's)
    or from `bind` (sampling: encoded once, identical at every step)."""

    def __init__(self, flux: nn.Module):
        super().__init__(flux)
        self._bound: tuple[torch.Tensor, torch.Tensor] | None = None

    def bind(self, tokens: torch.Tensor | None, ids: torch.Tensor | None = None) -> "KontextFlux":
        """Use these reference tokens and ids for calls that pass none (None unbinds: plain text-to-image)."""
        self._bound = None if tokens is None else (tokens, ids)
        return self

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, txt_attention_mask=None, *,
                reference_tokens: torch.Tensor | None = None, reference_ids: torch.Tensor | None = None, **kwargs):
        if reference_tokens is None and self._bound is not None:
            reference_tokens, reference_ids = self._bound
        if reference_tokens is None:
            return self.flux(img, img_ids, txt, txt_ids, timesteps, y, guidance, txt_attention_mask, **kwargs)
        if reference_ids is None:
            raise ValueError("KontextFlux: reference tokens need their ids")
        n_target, batch = img.shape[1], img.shape[0]
        ref = reference_tokens.to(img.device, img.dtype).expand(batch, -1, -1)
        ref_ids = reference_ids.to(img_ids.device, img_ids.dtype).expand(batch, -1, -1)
        return self.flux(torch.cat((img, ref), dim=1), torch.cat((img_ids, ref_ids), dim=1), txt, txt_ids,
                         timesteps, y, guidance, txt_attention_mask, num_output_tokens=n_target, **kwargs)
