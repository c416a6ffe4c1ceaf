"""Inputs and references for tests that compare transformer outputs (LoRA hooked, merged, loaded by diffusers)."""

from __future__ import annotations

import torch


def flux_inputs(flux, batch: int = 2, n_img: int = 16, n_txt: int = 8, seed: int = 1) -> dict:
    """Seeded random inputs for `flux.forward` (guidance 3.5)."""
    g = torch.Generator().manual_seed(seed)
    p = flux.params
    return dict(img=torch.randn(batch, n_img, p.in_channels, generator=g),
                img_ids=torch.randint(0, 8, (1, n_img, 3), generator=g).float().expand(batch, -1, -1),
                txt=torch.randn(batch, n_txt, p.context_in_dim, generator=g), txt_ids=torch.zeros(batch, n_txt, 3),
                timesteps=torch.rand(batch, generator=g), y=torch.randn(batch, p.vec_in_dim, generator=g),
                guidance=torch.full((batch,), 3.5))


def run(flux, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return flux(**inputs)


def diffusers_reference(flux):
    """diffusers' FluxTransformer2DModel with `flux`'s configuration and weights (through our key table)."""
    from diffusers import FluxTransformer2DModel

    from library.formats.diffusers_keys import bfl_to_diffusers

    p = flux.params
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=p.in_channels, out_channels=p.out_channels, num_layers=p.depth,
        num_single_layers=p.depth_single_blocks, attention_head_dim=p.head_dim, num_attention_heads=p.num_heads,
        joint_attention_dim=p.context_in_dim, pooled_projection_dim=p.vec_in_dim, guidance_embeds=p.guidance_embed,
        axes_dims_rope=p.axes_dim).eval()
    model.load_state_dict(bfl_to_diffusers(flux.state_dict(), p.hidden_size), strict=True)
    return model
