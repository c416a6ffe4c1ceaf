"""The sd-scripts FLUX ControlNet module: key names and shapes, zero start, init from the transformer, residual
injection, file round trip and refusals, inference wrapper."""

import numpy as np
import pytest
import torch

from conftest import read_key_fixture
from library.data.tensors import control_image_source, prepare_control_image
from library.models.controlnet import (ControlledFlux, ControlNetFlux, controlnet_from_transformer,
                                       controlnet_state_dict, load_controlnet)
from library.models.transformer import FLUX_PRESETS, Flux
from library.models.packing import pack_latents, prepare_img_ids
from library.formats.safetensors_io import ModelFileError, save_file_atomic

TINY = FLUX_PRESETS["tiny"]


def test_dev_controlnet_has_sd_scripts_keys_and_shapes():
    with torch.device("meta"):
        cn = ControlNetFlux(FLUX_PRESETS["dev"])
    shapes = {k: tuple(v.shape) for k, v in cn.state_dict().items()}
    dev = read_key_fixture("flux_dev_keys.txt")
    copied = [k for k in dev if k.startswith(("img_in.", "time_in.", "vector_in.", "guidance_in.", "txt_in.",
                                              "double_blocks.0.", "double_blocks.1."))]
    assert {k: shapes[k] for k in copied} == {k: dev[k] for k in copied}
    own = {k: s for k, s in shapes.items() if k not in copied}
    assert own == {
        "controlnet_blocks.0.weight": (3072, 3072), "controlnet_blocks.0.bias": (3072,),
        "controlnet_blocks.1.weight": (3072, 3072), "controlnet_blocks.1.bias": (3072,),
        "pos_embed_input.weight": (3072, 64), "pos_embed_input.bias": (3072,),
        "input_hint_block.0.weight": (16, 3, 3, 3), "input_hint_block.0.bias": (16,),
        **{f"input_hint_block.{i}.{p}": (16, 16, 3, 3) if p == "weight" else (16,)
           for i in range(2, 16, 2) for p in ("weight", "bias")},
    }
    with torch.device("meta"):
        schnell = ControlNetFlux(FLUX_PRESETS["schnell"])
    assert not any(k.startswith("guidance_in") for k in schnell.state_dict())


def inputs(batch=1, h=2, w=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(img=torch.randn(batch, h * w, 64, generator=g), img_ids=prepare_img_ids(batch, h, w),
                txt=torch.randn(batch, 4, TINY.context_in_dim, generator=g), txt_ids=torch.zeros(batch, 4, 3),
                timesteps=torch.full((batch,), 0.5), y=torch.randn(batch, TINY.vec_in_dim, generator=g),
                guidance=torch.full((batch,), 3.5))


def test_new_controlnet_starts_from_the_transformer_and_changes_nothing():
    flux = Flux(TINY).eval()
    cn = controlnet_from_transformer(flux).eval()
    src = flux.state_dict()
    for k, v in cn.state_dict().items():
        if k.startswith("controlnet_blocks") or k == "input_hint_block.14.weight":
            assert not v.any(), k
        elif k in src:
            assert torch.equal(v, src[k]), k
    x = inputs()
    cond = torch.rand(1, 3, 32, 48) * 2 - 1
    double, single = cn(controlnet_cond=cond, **x)
    assert len(double) == 2 and single == [] and all(r.shape == (1, 6, 64) and not r.any() for r in double)
    with torch.no_grad():
        blank = control_image_source(np.zeros((32, 48, 3), np.uint8))
        assert torch.equal(ControlledFlux(flux, cn, blank)(**x), flux(**x))
    with pytest.raises(ValueError, match="needs a transformer with at least"):
        controlnet_from_transformer(flux, controlnet_depth=3)


def test_residuals_enter_double_blocks_repeated_and_scaled():
    """Residual j goes to double blocks j, j+2, ... (sd-scripts' repeat convention), times the scale; single
    blocks are untouched; the control image reaches the output through input_hint_block and pos_embed_input."""
    torch.manual_seed(1)
    flux = Flux(TINY).eval()
    cn = ControlNetFlux(TINY).eval()
    for p in cn.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = inputs()
    cond = torch.rand(1, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        double, _ = cn(controlnet_cond=cond, **x)
        seen = []
        hooks = [b.register_forward_hook(lambda m, a, out, i=i: seen.append((i, a[0].clone())))
                 for i, b in enumerate(flux.double_blocks)]
        flux(**x, double_block_residuals=[r * 0.5 for r in double])
        for h in hooks:
            h.remove()
        plain = []
        hooks = [b.register_forward_hook(lambda m, a, out: plain.append(out[0].clone())) for b in flux.double_blocks]
        flux(**x)
        for h in hooks:
            h.remove()
    # input of double block 1 = output of block 0 + 0.5 * residual 0
    assert torch.allclose(seen[1][1], plain[0] + 0.5 * double[0], atol=1e-5)
    image = (np.random.default_rng(0).random((32, 48, 3)) * 255).astype(np.uint8)
    other = 255 - image
    with torch.no_grad():
        a = ControlledFlux(flux, cn, control_image_source(image))(**x)
        b = ControlledFlux(flux, cn, control_image_source(other))(**x)
        zero = ControlledFlux(flux, cn, control_image_source(image), scale=0.0)(**x)
    assert not torch.allclose(a, b) and torch.allclose(zero, flux(**x), atol=1e-6)


def test_hint_encoder_packs_like_the_latents():
    cn = ControlNetFlux(TINY)
    hint = cn.input_hint_block(torch.zeros(2, 3, 32, 48))
    assert hint.shape == (2, 16, 4, 6) and pack_latents(hint).shape == (2, 6, 64)
    with pytest.raises(ValueError, match="does not match the 6 latent tokens"):
        cn(controlnet_cond=torch.zeros(1, 3, 48, 48), **inputs())


def test_file_round_trip_and_refusals(tmp_path):
    torch.manual_seed(2)
    cn = ControlNetFlux(TINY)
    for p in cn.controlnet_blocks.parameters():
        torch.nn.init.normal_(p)
    path = tmp_path / "cn.safetensors"
    save_file_atomic(controlnet_state_dict(cn, torch.bfloat16), path)
    loaded = load_controlnet(path, TINY, torch.float32)
    assert loaded.depths == (2, 0) and loaded.params.guidance_embed
    assert all(torch.equal(v, cn.state_dict()[k].to(torch.bfloat16).float()) for k, v in loaded.state_dict().items())
    # a schnell ControlNet (no guidance_in) loads for a dev base too: guidance follows the file
    sd = {k: v for k, v in controlnet_state_dict(cn).items() if not k.startswith("guidance_in")}
    save_file_atomic(sd, tmp_path / "schnell.safetensors")
    assert not load_controlnet(tmp_path / "schnell.safetensors", TINY).params.guidance_embed

    save_file_atomic(Flux(TINY).state_dict(), tmp_path / "flux.safetensors")
    with pytest.raises(ModelFileError,
                       match="flux.safetensors: expected an sd-scripts FLUX ControlNet.*looks like a FLUX transformer"):
        load_controlnet(tmp_path / "flux.safetensors", TINY)
    wide = FLUX_PRESETS["tiny"].__class__(**{**TINY.__dict__, "hidden_size": 128, "num_heads": 4})
    with pytest.raises(ModelFileError, match="width 64 does not match the transformer's hidden size 128"):
        load_controlnet(path, wide)
    broken = controlnet_state_dict(cn)
    del broken["double_blocks.1.img_mlp.0.weight"]
    save_file_atomic(broken, tmp_path / "broken.safetensors")
    with pytest.raises(ModelFileError, match="broken.safetensors.*1 missing tensor.*double_blocks.1.img_mlp.0.weight"):
        load_controlnet(tmp_path / "broken.safetensors", TINY)


def test_control_image_covers_and_centre_crops():
    # 60x20 image with a marker column in the middle; a 32x32 output keeps the middle of it
    image = np.zeros((20, 60, 3), np.uint8)
    image[:, 29:31] = 255
    t = prepare_control_image(image, 32, 32)
    assert t.shape == (1, 3, 32, 32) and t.min() >= -1 and t.max() <= 1
    bright = (t[0, 0].mean(0) > 0).nonzero().flatten().tolist()
    assert bright and all(13 <= c <= 18 for c in bright)


def test_flux_utils_load_controlnet_as_sd_scripts(tmp_path):
    from library import flux_utils

    new = flux_utils.load_controlnet(None, False, torch.float32, "cpu", base_params=TINY)
    assert new.depths == (2, 0) and not new.controlnet_blocks[1].weight.any()
    save_file_atomic(controlnet_state_dict(new), tmp_path / "cn.safetensors")
    loaded = flux_utils.load_controlnet(tmp_path / "cn.safetensors", False, torch.bfloat16, "cpu", base_params=TINY)
    assert loaded.dtype == torch.bfloat16 and loaded.state_dict().keys() == new.state_dict().keys()
    with torch.device("meta"):
        assert flux_utils.load_controlnet(None, True, None, "meta").params.hidden_size == 3072
