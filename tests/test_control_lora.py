"""BFL control LoRAs (library/formats/control_lora.py, library/lora/control.py): the key/shape map against diffusers'
BFL control-LoRA converter on a rank-1 file at FLUX.1-dev's real dimensions, the merge formula on one layer
(zero-padded img_in, bias, norm replacement), hooked == merged, and unhooking restoring the model exactly."""

from __future__ import annotations

import copy

import pytest
import torch

from library.formats.control_lora import (ControlLoRAWeights, control_lora_to_diffusers, is_control_lora,
                                          read_control_lora, write_control_lora)
from library.lora.control import ControlLoRA, control_linears, norm_scales
from library.models.transformer import Flux, params_with_overrides
from model_helpers import flux_inputs


def fake_control_lora(flux, rank: int = 1, seed: int = 0, ranks: dict | None = None) -> dict[str, torch.Tensor]:
    """A random control LoRA file (BFL names) for `flux` (which may be on meta: only shapes are read)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, linear in control_linears(flux).items():
        r = (ranks or {}).get(name, rank)
        in_features = 128 if name == "img_in" else linear.in_features
        sd[f"{name}.lora_A.weight"] = torch.randn(r, in_features, generator=g) * 0.1
        sd[f"{name}.lora_B.weight"] = torch.randn(linear.out_features, r, generator=g) * 0.1
        sd[f"{name}.lora_B.bias"] = torch.randn(linear.out_features, generator=g) * 0.1
    for name, scale in norm_scales(flux).items():
        sd[name] = 1 + 0.1 * torch.randn(scale.shape, generator=g)
    return sd


def test_key_and_shape_map_equals_diffusers_converter_at_real_dimensions():
    """Rank 1 at FLUX.1-dev's 19/38 blocks and 3072 width (the converter hard-codes them). diffusers' converter also
    swaps the halves of the final adaLN's lora_A rows (a rank permutation; chunking a rank-1 A fails), so that one
    layer gets rank 2 here and its A is compared swapped."""
    from diffusers.loaders.lora_conversion_utils import _convert_bfl_flux_control_lora_to_diffusers

    with torch.device("meta"):
        dev = Flux(params_with_overrides("dev"))
    sd = fake_control_lora(dev, ranks={"final_layer.adaLN_modulation.1": 2})
    assert is_control_lora(sd) and not is_control_lora({k: v for k, v in sd.items() if "norm" not in k})
    theirs = _convert_bfl_flux_control_lora_to_diffusers(dict(sd))
    ours = control_lora_to_diffusers(read_control_lora(sd), hidden_size=3072)
    assert sorted(ours) == sorted(theirs) and len(ours) > 1000
    quirk = "transformer.norm_out.linear.lora_A.weight"
    for key, value in theirs.items():
        expected = ours[key] if key != quirk else torch.cat(ours[key].chunk(2)[::-1])
        assert value.shape == ours[key].shape and torch.equal(value, expected), key
    assert ours["transformer.x_embedder.lora_A.weight"].shape == (1, 128)


@pytest.fixture
def tiny_dev(one_torch_thread):
    torch.manual_seed(0)
    return Flux(params_with_overrides("tiny")).eval()


def test_merge_formula_on_one_layer_padding_bias_and_norms(tiny_dev):
    sd = fake_control_lora(tiny_dev, rank=2)
    weights = read_control_lora(sd)
    merged = copy.deepcopy(tiny_dev)
    ControlLoRA(merged, weights=weights, multiplier=0.85).merge_to(merged)
    s = 0.85
    w, b = tiny_dev.img_in.weight, tiny_dev.img_in.bias
    padded = torch.cat((w, torch.zeros_like(w)), dim=1)
    a, bb, bias = weights.loras["img_in"]
    torch.testing.assert_close(merged.img_in.weight, padded + s * bb @ a)
    torch.testing.assert_close(merged.img_in.bias, b + s * bias)
    a, bb, bias = weights.loras["double_blocks.1.img_attn.qkv"]
    base = tiny_dev.double_blocks[1].img_attn.qkv
    torch.testing.assert_close(merged.double_blocks[1].img_attn.qkv.weight, base.weight + s * bb @ a)
    torch.testing.assert_close(merged.double_blocks[1].img_attn.qkv.bias, base.bias + s * bias)
    key = "single_blocks.0.norm.key_norm.scale"  # replaced, not scaled
    assert torch.equal(merged.single_blocks[0].norm.key_norm.scale, sd[key])
    assert merged.params.in_channels == 128 and tiny_dev.params.in_channels == 64


def test_hooked_equals_merged_and_unhooking_restores_exactly(tiny_dev):
    weights = read_control_lora(fake_control_lora(tiny_dev, rank=3, seed=1))
    before = dict(tiny_dev.state_dict())
    inputs64 = flux_inputs(tiny_dev)
    with torch.no_grad():
        plain = tiny_dev(**inputs64)
    merged = copy.deepcopy(tiny_dev)
    ControlLoRA(merged, weights=weights, multiplier=0.7).merge_to(merged)
    hooked = ControlLoRA(tiny_dev, weights=weights, multiplier=0.7)
    hooked.apply_to(tiny_dev)
    inputs = flux_inputs(merged)
    with torch.no_grad():
        torch.testing.assert_close(tiny_dev(**inputs), merged(**inputs), atol=1e-5, rtol=1e-5)
        hooked.set_multiplier(0.0)  # s = 0: the padded img_in ignores the control half, but the norms stay replaced
        zero = tiny_dev(**{**inputs, "img": torch.cat((inputs64["img"], inputs["img"][..., 64:]), -1)})
    assert not torch.allclose(zero, plain)
    hooked.restore()
    assert tiny_dev.params.in_channels == 64 and tiny_dev.img_in.in_features == 64
    assert all(torch.equal(v, before[k]) for k, v in tiny_dev.state_dict().items())
    with torch.no_grad():
        assert torch.equal(tiny_dev(**inputs64), plain)


def test_written_file_reads_back_and_bad_files_are_named(tiny_dev):
    sd = fake_control_lora(tiny_dev, rank=2)
    weights = ControlLoRA(tiny_dev, weights=read_control_lora(sd)).to_weights()
    assert all(torch.equal(v, sd[k]) for k, v in write_control_lora(weights).items())
    with pytest.raises(ValueError, match="img_in has no lora_B.weight"):
        read_control_lora({k: v for k, v in sd.items() if k != "img_in.lora_B.weight"})
    with pytest.raises(ValueError, match="key foo.weight is neither"):
        read_control_lora({**sd, "foo.weight": torch.zeros(1)})
    wide = Flux(params_with_overrides("tiny", hidden_size=128, num_heads=4))
    with pytest.raises(ValueError, match="a LoRA for another model size"):
        ControlLoRA(wide, weights=read_control_lora(sd))
    assert isinstance(weights, ControlLoRAWeights) and weights.in_channels == 128


def test_unhooking_keeps_a_kohya_lora_applied_before(tiny_dev):
    """A style LoRA hooked first, the control LoRA over it: removing the control LoRA leaves the style LoRA's hooks."""
    from networks import lora_flux

    inputs = flux_inputs(tiny_dev)
    network = lora_flux.create_network(1.0, 4, 4.0, None, [], tiny_dev)
    network.apply_to([], tiny_dev, False, True)
    for lora in network.unet_loras:
        torch.nn.init.normal_(lora.lora_up.weight, std=0.1)
    with torch.no_grad():
        styled = tiny_dev(**inputs)
    control = ControlLoRA(tiny_dev, weights=read_control_lora(fake_control_lora(tiny_dev, rank=2)))
    control.apply_to(tiny_dev)
    control.restore()
    with torch.no_grad():
        assert torch.equal(tiny_dev(**inputs), styled)
