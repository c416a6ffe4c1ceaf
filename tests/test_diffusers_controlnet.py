"""diffusers-layout FLUX ControlNets: our module (the transformer's blocks + a key map) loaded from files written by
diffusers' own FluxControlNetModel, and the base steered by it, equal diffusers' FluxControlNetModel feeding
FluxTransformer2DModel with the same tiny weights: Union (mode token), single blocks, alimama's 68-feature embedder,
a ControlNet with more residuals than the interval rule uses; the index maps at FLUX.1's real block counts;
refusals; our saved files loaded back by diffusers."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from library.formats.safetensors_io import ModelFileError, save_file_atomic
from library.models.controlled import ControlledFlux, ControlUnit, active_at, residual_map
from library.models.diffusers_controlnet import (DiffusersControlNetShape, diffusers_controlnet_from_transformer,
                                                 diffusers_controlnet_shape, diffusers_state_dict,
                                                 load_diffusers_controlnet, write_diffusers_folder)
from library.models.transformer import FLUX_PRESETS, Flux
from model_helpers import diffusers_reference

BASE = replace(FLUX_PRESETS["tiny"], depth=5, depth_single_blocks=4)


def test_interval_and_repeat_maps_at_flux_block_counts():
    # alimama: 6 residuals over 19 double blocks, step ceil(19/6) = 4: r[5] is never used
    assert residual_map(19, 6, "interval") == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4 + [4] * 3
    assert residual_map(19, 5, "interval") == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4 + [4] * 3
    assert residual_map(19, 4, "interval") == [0] * 5 + [1] * 5 + [2] * 5 + [3] * 4
    assert residual_map(38, 10, "interval") == [j for j in range(9) for _ in range(4)] + [9, 9]
    assert residual_map(19, 2, "repeat") == [b % 2 for b in range(19)]
    # diffusers' keep rule: 10 steps, start 0.2, end 0.8 -> steps 2..7
    assert [i for i in range(10) if active_at(i, 10, 0.2, 0.8)] == [2, 3, 4, 5, 6, 7]


def diffusers_controlnet(shape: DiffusersControlNetShape, seed: int):
    from diffusers import FluxControlNetModel

    p = BASE
    torch.manual_seed(seed)
    model = FluxControlNetModel(
        patch_size=1, in_channels=64, num_layers=shape.depth, num_single_layers=shape.single_depth,
        attention_head_dim=p.head_dim, num_attention_heads=p.num_heads, joint_attention_dim=p.context_in_dim,
        pooled_projection_dim=p.vec_in_dim, guidance_embeds=shape.guidance_embed, axes_dims_rope=list(p.axes_dim),
        num_mode=shape.num_mode)
    if shape.condition_channels != 64:  # alimama: diffusers 0.30's extra_condition_channels, removed since
        model.controlnet_x_embedder = torch.nn.Linear(shape.condition_channels, p.hidden_size)
    with torch.no_grad():  # zero-initialised projections would hide everything: random weights throughout
        for t in model.parameters():
            t.normal_(0, 0.05)
    return model.eval()


def inputs(n_img=12, n_txt=5, batch=2, seed=3, channels=64):
    g = torch.Generator().manual_seed(seed)
    rows, cols = 3, n_img // 3
    ids = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).reshape(-1, 2)
    img_ids = torch.cat((torch.zeros(n_img, 1), ids.float()), 1)
    return dict(img=torch.randn(batch, n_img, 64, generator=g), img_ids=img_ids.expand(batch, -1, -1),
                txt=torch.randn(batch, n_txt, BASE.context_in_dim, generator=g), txt_ids=torch.zeros(batch, n_txt, 3),
                timesteps=torch.rand(batch, generator=g), y=torch.randn(batch, BASE.vec_in_dim, generator=g),
                guidance=torch.full((batch,), 3.5)), torch.randn(batch, n_img, channels, generator=g)


def diffusers_output(base, controlnets, x, conds, modes, scales):
    """diffusers: each ControlNet run, residuals scaled and summed (FluxMultiControlNetModel's rule), the
    transformer fed with them (interval mapping)."""
    transformer = diffusers_reference(base)
    kw = dict(hidden_states=x["img"], timestep=x["timesteps"], guidance=x["guidance"], pooled_projections=x["y"],
              encoder_hidden_states=x["txt"], txt_ids=x["txt_ids"][0], img_ids=x["img_ids"][0], return_dict=False)
    double = single = None
    for net, cond, mode, scale in zip(controlnets, conds, modes, scales):
        m = None if mode is None else torch.full((x["img"].shape[0], 1), mode)
        guidance = x["guidance"] if net.config.guidance_embeds else None  # as FluxControlNetPipeline
        d, s = net(controlnet_cond=cond, controlnet_mode=m, conditioning_scale=scale, **{**kw, "guidance": guidance})
        double = d if double is None or d is None else [a + b for a, b in zip(double, d)]
        single = s if single is None or s is None else [a + b for a, b in zip(single, s)]
    return transformer(controlnet_block_samples=double, controlnet_single_block_samples=single, **kw)[0]


CASES = {
    "union": DiffusersControlNetShape(2, 3, num_mode=4),
    "singles": DiffusersControlNetShape(2, 2),
    "alimama": DiffusersControlNetShape(6, 0, condition_channels=68),  # 6 residuals over 5 blocks: r[5] unused
    "jasperai-schnell": DiffusersControlNetShape(3, 0, guidance_embed=False),
}


@pytest.mark.parametrize("case", CASES)
def test_equals_diffusers(case, tmp_path):
    with torch.no_grad():
        shape = CASES[case]
        base = Flux(BASE).eval()
        for t in base.parameters():
            torch.nn.init.normal_(t, 0, 0.05)
        reference = diffusers_controlnet(shape, seed=7)
        path = tmp_path / "cn.safetensors"
        save_file_atomic({k: v.contiguous() for k, v in reference.state_dict().items()}, path)
        assert diffusers_controlnet_shape(path, BASE) == shape
        ours = load_diffusers_controlnet(path, BASE).eval()
        x, cond = inputs(channels=shape.condition_channels)
        mode = 2 if shape.num_mode else None
        expected = diffusers_output(base, [reference], x, [cond], [mode], [0.7])
        got = ControlledFlux(base, units=[ControlUnit(ours, cond, 0.7, mode=mode)])(**x)
        assert torch.allclose(got, expected, atol=2e-5), (got - expected).abs().max()
        assert not torch.allclose(got, base(**x), atol=1e-3)  # the ControlNet does change the output


def test_union_with_two_modes_and_a_second_controlnet_sum_like_diffusers(tmp_path):
    with torch.no_grad():
        base = Flux(BASE).eval()
        for t in base.parameters():
            torch.nn.init.normal_(t, 0, 0.05)
        union, plain = diffusers_controlnet(CASES["union"], 1), diffusers_controlnet(CASES["singles"], 2)
        nets = []
        for name, net in (("union", union), ("plain", plain)):
            save_file_atomic({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / f"{name}.st")
            nets.append(load_diffusers_controlnet(tmp_path / f"{name}.st", BASE).eval())
        x, c1 = inputs(seed=4)
        _, c2 = inputs(seed=5)
        _, c3 = inputs(seed=6)
        expected = diffusers_output(base, [union, union, plain], x, [c1, c2, c3], [0, 3, None], [0.5, 0.3, 0.8])
        got = ControlledFlux(base, units=[ControlUnit(nets[0], c1, 0.5, mode=0), ControlUnit(nets[0], c2, 0.3, mode=3),
                                          ControlUnit(nets[1], c3, 0.8)])(**x)
        assert torch.allclose(got, expected, atol=2e-5), (got - expected).abs().max()


def test_start_end_range_follows_the_bound_schedule():
    with torch.no_grad():
        base = Flux(BASE).eval()
        cn = diffusers_controlnet_from_transformer(base, DiffusersControlNetShape(2, 0)).eval()
        for t in cn.controlnet_blocks.parameters():
            torch.nn.init.normal_(t, 0, 0.1)
        x, cond = inputs(batch=1)
        model = ControlledFlux(base, units=[ControlUnit(cn, cond, 1.0, start=0.25, end=0.75)])
        schedule = [1.0, 0.8, 0.6, 0.4, 0.0]  # 4 steps: the ControlNet acts at steps 1 and 2
        model.bind_schedule(schedule)
        for i, t in enumerate(schedule[:-1]):
            x["timesteps"] = torch.tensor([t])
            steered = not torch.allclose(model(**x), base(**x))
            assert steered == (i in (1, 2)), i


def test_new_controlnet_copies_the_transformer_and_changes_nothing():
    base = Flux(BASE).eval()
    cn = diffusers_controlnet_from_transformer(base, DiffusersControlNetShape(2, 1, num_mode=3))
    src = base.state_dict()
    for k, v in cn.state_dict().items():
        if k.startswith(("controlnet_blocks", "controlnet_single_blocks", "controlnet_x_embedder")):
            assert not v.any(), k
        elif k != "controlnet_mode_embedder.weight":
            assert torch.equal(v, src[k]), k
    x, cond = inputs()
    with torch.no_grad():
        assert torch.equal(ControlledFlux(base, units=[ControlUnit(cn, cond, mode=1)])(**x), base(**x))
    with pytest.raises(ValueError, match="needs a control mode"):
        cn(x["img"], x["img_ids"], cond, x["txt"], x["txt_ids"], x["timesteps"], x["y"], x["guidance"])
    with pytest.raises(ValueError, match="out of range: the model has 3 modes"):
        cn(x["img"], x["img_ids"], cond, x["txt"], x["txt_ids"], x["timesteps"], x["y"], x["guidance"], mode=5)


def test_saved_controlnet_loads_in_diffusers_with_the_same_residuals(tmp_path):
    from diffusers import FluxControlNetModel

    base = Flux(BASE).eval()
    cn = diffusers_controlnet_from_transformer(base, DiffusersControlNetShape(2, 2, num_mode=4)).eval()
    with torch.no_grad():
        for t in cn.parameters():
            t.add_(torch.randn_like(t) * 0.05)
    file = tmp_path / "cn.safetensors"
    save_file_atomic(diffusers_state_dict(cn), file)
    folder = write_diffusers_folder(file, cn)
    assert json.loads((folder / "config.json").read_text())["num_mode"] == 4
    theirs = FluxControlNetModel.from_pretrained(folder).eval()
    x, cond = inputs()
    with torch.no_grad():
        ours_d, ours_s = cn(x["img"], x["img_ids"], cond, x["txt"], x["txt_ids"], x["timesteps"], x["y"],
                            x["guidance"], mode=1)
        d, s = theirs(hidden_states=x["img"], controlnet_cond=cond, controlnet_mode=torch.ones(2, 1, dtype=torch.long),
                      timestep=x["timesteps"], guidance=x["guidance"], pooled_projections=x["y"],
                      encoder_hidden_states=x["txt"], txt_ids=x["txt_ids"][0], img_ids=x["img_ids"][0],
                      return_dict=False)
    for a, b in zip([*ours_d, *ours_s], [*d, *s]):
        assert torch.allclose(a, b, atol=2e-5)
    assert len(d) == 2 and len(s) == 2
    # and our loader reads the folder too
    again = load_diffusers_controlnet(folder, BASE)
    assert all(torch.equal(v, cn.state_dict()[k]) for k, v in again.state_dict().items())


def test_refusals_name_the_file_and_both_layouts(tmp_path):
    base = Flux(BASE)
    cn = diffusers_controlnet_from_transformer(base, DiffusersControlNetShape(2, 0))
    path = tmp_path / "cn.safetensors"
    save_file_atomic(diffusers_state_dict(cn), path)
    wide = replace(BASE, hidden_size=128, num_heads=4)
    with pytest.raises(ModelFileError, match=r"cn.safetensors: ControlNet width 64 \(2 heads x 32\) does not fit "
                                             r"the transformer's 128 \(4 heads x 32\)"):
        load_diffusers_controlnet(path, wide)
    broken = diffusers_state_dict(cn)
    del broken["controlnet_blocks.1.weight"]
    save_file_atomic(broken, tmp_path / "broken.safetensors")
    with pytest.raises(ModelFileError, match=r"broken.safetensors: .*1 missing tensor.*controlnet_blocks.1.weight"):
        load_diffusers_controlnet(tmp_path / "broken.safetensors", BASE)
    (tmp_path / "folder").mkdir()
    with pytest.raises(ModelFileError, match="folder needs diffusion_pytorch_model.safetensors"):
        load_diffusers_controlnet(tmp_path / "folder", BASE)


def test_on_a_kontext_base_residuals_reach_the_target_tokens_only():
    """ControlledFlux around KontextFlux: the ControlNet sees the target tokens, and its residuals are added to
    them only (equal to the transformer fed residuals padded with zeros over the reference tokens)."""
    from library.models.controlled import spread_residuals
    from library.models.kontext import KontextFlux

    with torch.no_grad():
        base = Flux(BASE).eval()
        for t in base.parameters():
            torch.nn.init.normal_(t, 0, 0.05)
        cn = diffusers_controlnet_from_transformer(base, DiffusersControlNetShape(2, 2)).eval()
        for t in cn.parameters():
            t.add_(torch.randn_like(t) * 0.05)
        x, cond = inputs(batch=1)
        refs, ref_ids = torch.randn(1, 6, 64), torch.cat((torch.ones(6, 1), torch.rand(6, 2) * 3), 1)[None]
        got = ControlledFlux(KontextFlux(base).bind(refs, ref_ids), units=[ControlUnit(cn, cond, 0.9)])(**x)
        d, s = cn(x["img"], x["img_ids"], cond, x["txt"], x["txt_ids"], x["timesteps"], x["y"], x["guidance"])
        pad = torch.zeros(1, 6, BASE.hidden_size)
        d = [torch.cat((r * 0.9, pad), 1) for r in spread_residuals([(d, "interval")], BASE.depth)]
        s = [torch.cat((r * 0.9, pad), 1) for r in spread_residuals([(s, "interval")], BASE.depth_single_blocks)]
        expected = base(torch.cat((x["img"], refs), 1), torch.cat((x["img_ids"], ref_ids), 1), x["txt"], x["txt_ids"],
                        x["timesteps"], x["y"], x["guidance"], double_block_residuals=d, single_block_residuals=s,
                        num_output_tokens=12)
        assert got.shape == (1, 12, 64) and torch.allclose(got, expected, atol=1e-6)


def test_the_sixth_residual_of_a_six_block_controlnet_is_never_used(tmp_path):
    """alimama's 6 blocks over FLUX.1's 19 (step 4) -- here over 5 blocks (step 1): block 5's projection changes
    nothing, block 4's does."""
    with torch.no_grad():
        base = Flux(BASE).eval()
        shape = CASES["alimama"]
        save_file_atomic({k: v.contiguous() for k, v in diffusers_controlnet(shape, 3).state_dict().items()},
                         tmp_path / "cn.safetensors")
        cn = load_diffusers_controlnet(tmp_path / "cn.safetensors", BASE).eval()
        x, cond = inputs(channels=68)
        model = ControlledFlux(base, units=[ControlUnit(cn, cond)])
        before = model(**x)
        cn.controlnet_blocks[5].weight.mul_(3)
        assert torch.equal(model(**x), before)
        cn.controlnet_blocks[4].weight.mul_(3)
        assert not torch.allclose(model(**x), before)
    assert residual_map(BASE.depth, 6, "interval") == [0, 1, 2, 3, 4]
