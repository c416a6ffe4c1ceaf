"""The FLUX transformer: real-size layout, forward semantics, and parity with diffusers' implementation."""

import math

import pytest
import torch

from conftest import read_key_fixture
from library.formats.diffusers_keys import bfl_to_diffusers, diffusers_shapes_to_bfl, diffusers_to_bfl
from library.memory.checkpointing import disable_gradient_checkpointing, enable_gradient_checkpointing
from library.models.flux_math import position_embedding, timestep_embedding
from library.models.transformer import FLUX_PRESETS, Flux, default_axes_dim


def meta_model(preset: str) -> Flux:
    with torch.device("meta"):
        return Flux(FLUX_PRESETS[preset])


def shapes(model: Flux) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_dev_preset_matches_real_checkpoint_keys_and_shapes():
    fixture = read_key_fixture("flux_dev_keys.txt")
    ours = shapes(meta_model("dev"))
    assert ours == fixture
    assert len(ours) == 780
    assert sum(math.prod(s) for s in ours.values()) == 11_901_408_320


def test_schnell_preset_has_no_guidance_embedder():
    ours = shapes(meta_model("schnell"))
    fixture = read_key_fixture("flux_dev_keys.txt")
    assert set(fixture) - set(ours) == {f"guidance_in.{a}.{b}" for a in ("in_layer", "out_layer")
                                        for b in ("weight", "bias")}
    assert meta_model("schnell").is_schnell and not meta_model("dev").is_schnell


def test_diffusers_key_table_matches_real_diffusers_layout():
    fixture = read_key_fixture("flux_dev_diffusers_keys.txt")
    dev = meta_model("dev").state_dict()
    converted = bfl_to_diffusers(dev, 3072)
    assert {k: tuple(v.shape) for k, v in converted.items()} == fixture
    assert diffusers_shapes_to_bfl(fixture) == {k: tuple(v.shape) for k, v in dev.items()}


def test_diffusers_key_table_agrees_with_diffusers_converter_at_real_size():
    # diffusers' own BFL -> diffusers converter (hard-coded to 3072 wide) run on real-size meta tensors
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    dev = meta_model("dev").state_dict()
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(dev))
    ours = bfl_to_diffusers(dev, 3072)
    assert {k: tuple(v.shape) for k, v in theirs.items()} == {k: tuple(v.shape) for k, v in ours.items()}


def test_diffusers_round_trip_is_exact():
    model = Flux(FLUX_PRESETS["tiny"])
    sd = model.state_dict()
    diff = bfl_to_diffusers(sd, model.params.hidden_size)
    back = diffusers_to_bfl(diff, diff.__getitem__)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    # the final modulation halves really are swapped (diffusers stores scale first)
    w = sd["final_layer.adaLN_modulation.1.weight"]
    assert torch.equal(diff["norm_out.linear.weight"], torch.cat(w.chunk(2)[::-1]))


def test_default_axes_split():
    assert default_axes_dim(128) == (16, 56, 56)
    assert default_axes_dim(32) == (4, 14, 14)
    with pytest.raises(ValueError):
        default_axes_dim(40)


def test_timestep_embedding_by_hand():
    t = torch.tensor([0.5])
    emb = timestep_embedding(t, 8)
    freqs = [math.exp(-math.log(10000) * k / 4) for k in range(4)]
    expected = [math.cos(500 * f) for f in freqs] + [math.sin(500 * f) for f in freqs]
    assert torch.allclose(emb[0], torch.tensor(expected), atol=1e-5)


def test_rope_rotates_by_position():
    ids = torch.zeros(1, 2, 3)
    ids[0, 1] = torch.tensor([0.0, 1.0, 2.0])
    pe = position_embedding(ids, (4, 14, 14), 10000)
    assert pe.shape == (1, 1, 2, 16, 2, 2)
    assert torch.allclose(pe[0, 0, 0], torch.eye(2).expand(16, 2, 2))  # position 0: identity
    # axis 1 (row), first pair: angle = row * theta^0 = 1 radian
    c, s = math.cos(1.0), math.sin(1.0)
    assert torch.allclose(pe[0, 0, 1, 2], torch.tensor([[c, -s], [s, c]]), atol=1e-6)


def make_inputs(params, batch=2, n_img=16, n_txt=8):
    return dict(
        img=torch.randn(batch, n_img, params.in_channels),
        img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"),
                            -1).reshape(1, n_img, 3).expand(batch, -1, -1),
        txt=torch.randn(batch, n_txt, params.context_in_dim),
        txt_ids=torch.zeros(batch, n_txt, 3),
        timesteps=torch.tensor([0.3, 0.9])[:batch],
        y=torch.randn(batch, params.vec_in_dim),
        guidance=torch.full((batch,), 3.5) if params.guidance_embed else None,
    )


@pytest.mark.parametrize("preset", ["tiny", "tiny-schnell"])
def test_forward_matches_diffusers(preset):
    from diffusers import FluxTransformer2DModel

    model = Flux(FLUX_PRESETS[preset]).eval()
    p = model.params
    reference = FluxTransformer2DModel(
        patch_size=1, in_channels=p.in_channels, out_channels=p.out_channels, num_layers=p.depth,
        num_single_layers=p.depth_single_blocks, attention_head_dim=p.head_dim, num_attention_heads=p.num_heads,
        joint_attention_dim=p.context_in_dim, pooled_projection_dim=p.vec_in_dim, guidance_embeds=p.guidance_embed,
        axes_dims_rope=p.axes_dim,
    ).eval()
    reference.load_state_dict(bfl_to_diffusers(model.state_dict(), p.hidden_size), strict=True)
    inputs = make_inputs(p)
    with torch.no_grad():
        ours = model(**inputs)
        theirs = reference(hidden_states=inputs["img"], encoder_hidden_states=inputs["txt"],
                           pooled_projections=inputs["y"], timestep=inputs["timesteps"],
                           img_ids=inputs["img_ids"][0], txt_ids=inputs["txt_ids"][0], guidance=inputs["guidance"],
                           return_dict=False)[0]
    assert ours.shape == (2, 16, 64)
    assert (ours - theirs).abs().max() < 2e-5


def test_text_mask_hides_padding_tokens():
    model = Flux(FLUX_PRESETS["tiny"]).eval()
    inputs = make_inputs(model.params, batch=1)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])
    with torch.no_grad():
        base = model(**inputs, txt_attention_mask=mask)
        changed = dict(inputs, txt=inputs["txt"].clone())
        changed["txt"][:, 5:] = torch.randn(1, 3, model.params.context_in_dim)  # only masked tokens differ
        masked = model(**changed, txt_attention_mask=mask)
        unmasked = model(**changed)
    # masked text tokens still flow through their own stream, but the image tokens never attend to them
    assert torch.allclose(base, masked, atol=1e-6)
    assert not torch.allclose(base, unmasked, atol=1e-4)


def test_extension_points_residuals_and_output_tokens():
    model = Flux(FLUX_PRESETS["tiny"]).eval()
    inputs = make_inputs(model.params, batch=1)
    h = model.params.hidden_size
    with torch.no_grad():
        base = model(**inputs)
        zero = model(**inputs, double_block_residuals=[torch.zeros(1, 16, h)],
                     single_block_residuals=[torch.zeros(1, 16, h)])
        pushed = model(**inputs, double_block_residuals=[torch.randn(1, 16, h)])
        truncated = model(**inputs, num_output_tokens=10)
    assert torch.allclose(base, zero)
    assert not torch.allclose(base, pushed, atol=1e-4)
    assert truncated.shape == (1, 10, 64) and torch.allclose(truncated, base[:, :10], atol=1e-6)


def test_guidance_required_for_dev():
    model = Flux(FLUX_PRESETS["tiny"])
    inputs = make_inputs(model.params, batch=1)
    inputs["guidance"] = None
    with pytest.raises(ValueError, match="guidance"):
        model(**inputs)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = Flux(FLUX_PRESETS["tiny"]).train()
    inputs = make_inputs(model.params, batch=1)
    model(**inputs).square().mean().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    enable_gradient_checkpointing(model)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = model(**inputs)
    out.square().mean().backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, plain[n], atol=1e-6), n
    disable_gradient_checkpointing(model)
    saved_plain = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved_plain.append(t.numel()) or t, lambda t: t):
        model(**inputs)
    assert sum(saved) < sum(saved_plain) / 2  # far fewer activations kept for backward


def test_checkpointing_keeps_the_keys_and_wraps_a_forward_replaced_later():
    model = Flux(FLUX_PRESETS["tiny"]).train()
    keys = list(model.state_dict())
    enable_gradient_checkpointing(model)
    assert list(model.state_dict()) == keys
    block = model.double_blocks[0]
    compiled, calls = block.forward, []
    block.forward = lambda *args: calls.append(1) or compiled(*args)  # as --torch_compile replaces it afterwards
    model(**make_inputs(model.params, batch=1)).square().mean().backward()
    assert len(calls) == 2  # run again in backward: the checkpoint is around the replaced forward
