"""networks.lora_flux: kohya-compatible LoRA for FLUX.1 (names, math, files, split_qkv, network_args, interop)."""

from __future__ import annotations

import copy
import hashlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import read_key_fixture
from library.models.transformer import FLUX_PRESETS, Flux
from library.formats.safetensors_io import ModelFileError, load_tensors, read_header, save_file_atomic
from model_helpers import diffusers_reference, flux_inputs, run
from networks import lora_flux

# Per-block modules, hand-listed: suffix -> (in, out) for the tiny preset (hidden 64, MLP 256).
H, MLP = 64, 256
DOUBLE = {"img_mod_lin": (H, 6 * H), "img_attn_qkv": (H, 3 * H), "img_attn_proj": (H, H), "img_mlp_0": (H, MLP),
          "img_mlp_2": (MLP, H), "txt_mod_lin": (H, 6 * H), "txt_attn_qkv": (H, 3 * H), "txt_attn_proj": (H, H),
          "txt_mlp_0": (H, MLP), "txt_mlp_2": (MLP, H)}
SINGLE = {"linear1": (H, 3 * H + MLP), "linear2": (H + MLP, H), "modulation_lin": (H, 3 * H)}


def randomize(network: nn.Module, std: float = 0.05, seed: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def make(models, dim=4, alpha=1.0, apply=True, **kwargs) -> lora_flux.LoRANetwork:
    flux, clip, t5 = models
    net = lora_flux.create_network(1.0, dim, alpha, None, [clip, t5], flux, **kwargs)
    if apply:
        net.apply_to([clip, t5], flux)
    return net


def ranks(net) -> dict[str, int]:
    return {lora.lora_name: lora.lora_dim * lora.num_parts for lora in net.text_encoder_loras + net.unet_loras}


def plain_merge(model: nn.Module, lora_sd: dict, prefix: str = "lora_unet", multiplier: float = 1.0) -> None:
    """Independent kohya merge (reference 16.1): W += m * alpha/rank * up @ down by module-path name."""
    targets = {f"{prefix}_" + k[:-len(".weight")].replace(".", "_"): k for k in model.state_dict()
               if k.endswith(".weight")}
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, down in lora_sd.items():
            if not key.endswith(".lora_down.weight") or not key.startswith(prefix + "_"):
                continue
            name = key.split(".")[0]
            up = lora_sd[f"{name}.lora_up.weight"].float()
            alpha = float(lora_sd.get(f"{name}.alpha", down.shape[0]))
            params[targets[name]] += multiplier * alpha / down.shape[0] * (up @ down.float())


# ---------------------------------------------------------------------------------------------------------------
# Module selection and names


def test_dev_has_304_transformer_modules_with_kohya_names():
    with torch.device("meta"):
        flux = Flux(FLUX_PRESETS["dev"])
    net = lora_flux.create_network(1.0, None, None, None, [None, None], flux)
    names = [lora.lora_name for lora in net.unet_loras]
    assert len(names) == 304 and not net.text_encoder_loras
    assert names[:3] == ["lora_unet_double_blocks_0_img_mod_lin", "lora_unet_double_blocks_0_img_attn_qkv",
                         "lora_unet_double_blocks_0_img_attn_proj"]
    assert "lora_unet_single_blocks_37_modulation_lin" in names and "lora_unet_double_blocks_18_txt_mlp_2" in names
    assert all(lora.lora_dim == 4 and lora.alpha_value == 1.0 for lora in net.unet_loras)  # sd-scripts defaults
    single = lora_flux.create_network(1.0, 1, 1, None, None, flux, train_blocks="single")
    double = lora_flux.create_network(1.0, 1, 1, None, None, flux, train_blocks="double")
    assert len(single.unet_loras) == 38 * 3 and len(double.unet_loras) == 19 * 10


def test_tiny_key_set_and_shapes(models):
    net = make(models, dim=4, alpha=2)
    expected = {}
    for kind, table, n in (("double_blocks", DOUBLE, 2), ("single_blocks", SINGLE, 2)):
        for i in range(n):
            for suffix, (fan_in, fan_out) in table.items():
                name = f"lora_unet_{kind}_{i}_{suffix}"
                expected[f"{name}.lora_down.weight"] = (4, fan_in)
                expected[f"{name}.lora_up.weight"] = (fan_out, 4)
                expected[f"{name}.alpha"] = ()
    sd = net.state_dict()
    unet = {k: tuple(v.shape) for k, v in sd.items() if k.startswith("lora_unet")}
    assert unet == expected
    assert all(sd[k].dtype == torch.float32 and float(sd[k]) == 2.0 for k in sd if k.endswith(".alpha"))
    # the trainer finds text-encoder LoRA among the top-level children
    assert any(n.startswith("lora_te1") for n, _ in net.named_children())


def te_names(net) -> list[str]:
    return [lora.lora_name for lora in net.text_encoder_loras]


def test_text_encoder_names_for_both_clip_layouts_and_t5(models):
    flux, clip, t5 = models
    expected_clip = [f"lora_te1_text_model_encoder_layers_{i}_{m}" for i in range(2)
                     for m in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj",
                               "mlp_fc1", "mlp_fc2")]
    expected_t5 = [f"lora_te3_encoder_block_{i}_{m}" for i in range(2)
                   for m in ("layer_0_SelfAttention_q", "layer_0_SelfAttention_k", "layer_0_SelfAttention_v",
                             "layer_0_SelfAttention_o", "layer_1_DenseReluDense_wi_0",
                             "layer_1_DenseReluDense_wi_1", "layer_1_DenseReluDense_wo")]
    assert not any(n.startswith("text_model.") for n, _ in clip.named_modules())  # transformers 5 layout
    net = lora_flux.create_network(1.0, 4, 1, None, [clip, t5], flux)
    assert sorted(te_names(net)) == sorted(expected_clip)  # no T5 LoRA without train_t5xxl

    class Hf4Clip(nn.Module):  # transformers 4.x layout: CLIPTextModel.text_model.encoder...
        def __init__(self, inner):
            super().__init__()
            self.text_model = inner

    wrapped = Hf4Clip(clip)
    net4 = lora_flux.create_network(1.0, 4, 1, None, [wrapped, t5], flux, train_t5xxl="True")
    assert sorted(te_names(net4)) == sorted(expected_clip + expected_t5)
    assert dict(net4.named_children()) == {}  # nothing registered before apply_to
    net4.apply_to([wrapped, t5], flux, apply_text_encoder=True, apply_unet=False)
    assert not net4.unet_loras and sorted(n for n, _ in net4.named_children()) == sorted(expected_clip + expected_t5)
    sd = net4.state_dict()
    assert tuple(sd["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"].shape) == (64, 4)
    assert tuple(sd["lora_te3_encoder_block_1_layer_1_DenseReluDense_wo.lora_down.weight"].shape) == (4, 64)
    # hooked: a non-zero LoRA changes both encoders' outputs
    ids = torch.randint(0, 100, (1, 7))
    with torch.no_grad():
        before = clip(ids).last_hidden_state, t5(ids).last_hidden_state
        randomize(net4)
        after = clip(ids).last_hidden_state, t5(ids).last_hidden_state
    assert all((a - b).abs().max() > 1e-4 for a, b in zip(after, before))


# ---------------------------------------------------------------------------------------------------------------
# Math


def test_forward_is_base_plus_scaled_update_and_zero_init_is_identity(models):
    flux = models[0]
    inputs = flux_inputs(flux)
    base = run(flux, inputs)
    net = make(models, dim=4, alpha=2.0)
    assert torch.equal(run(flux, inputs), base)  # up is zero-initialised
    lora = next(lora for lora in net.unet_loras if lora.lora_name == "lora_unet_double_blocks_1_txt_mlp_0")
    assert all(float(lora.lora_down.weight.detach().abs().max()) > 0 for lora in net.unet_loras)
    randomize(net)
    net.set_multiplier(0.7)
    layer = flux.double_blocks[1].txt_mlp[0]
    x = torch.randn(2, 5, H)
    with torch.no_grad():
        expected = F.linear(x, layer.weight, layer.bias) + 0.7 * (2.0 / 4) * (
            x @ lora.lora_down.weight.T @ lora.lora_up.weight.T)
        assert (layer(x) - expected).abs().max() < 1e-6
    assert (run(flux, inputs) - base).abs().max() > 1e-3
    net.set_multiplier(0.0)
    assert torch.equal(run(flux, inputs), base)
    net.restore()
    net.set_multiplier(1.0)
    assert torch.equal(run(flux, inputs), base)  # unhooked


def test_merge_to_equals_hooked_output(models, tmp_path):
    flux = models[0]
    inputs = flux_inputs(flux)
    net = make(models, dim=4, alpha=8.0)
    randomize(net)
    net.set_multiplier(0.5)
    hooked = run(flux, inputs)
    net.save_weights(tmp_path / "l.safetensors", None, None)
    net.restore()

    base_flux = copy.deepcopy(flux)
    inf, sd = lora_flux.create_network_from_weights(0.5, tmp_path / "l.safetensors", None, [None, None], base_flux,
                                                    for_inference=True)
    inf.merge_to([None, None], base_flux, sd, torch.float32, "cpu")
    assert (run(base_flux, inputs) - hooked).abs().max() < 1e-5

    own = copy.deepcopy(flux)
    net2 = lora_flux.create_network(0.5, 4, 8.0, None, None, own)
    net2.apply_to(None, own)
    net2.load_state_dict(net.state_dict(), strict=False)
    net2.restore()
    net2.merge_to(None, own, None)  # the network's own weights
    assert (run(own, inputs) - hooked).abs().max() < 1e-5


def test_dropouts_only_in_training_mode(models):
    flux = models[0]
    inputs = flux_inputs(flux)
    base = run(flux, inputs)
    net = make(models, rank_dropout="0.5", module_dropout="1.0")
    randomize(net)
    net.eval()
    evaluated = run(flux, inputs)
    assert (evaluated - base).abs().max() > 1e-3
    net.on_epoch_start(None, flux)  # -> train mode: module_dropout 1.0 skips every LoRA
    assert net.training and torch.equal(run(flux, inputs), base)

    layer = flux.single_blocks[0].linear2
    lora = next(lora for lora in net.unet_loras if lora.lora_name == "lora_unet_single_blocks_0_linear2")
    lora.module_dropout = None
    x = torch.randn(3, 6, H + MLP)
    with torch.no_grad():
        org = F.linear(x, layer.weight, layer.bias)
        torch.manual_seed(3)
        delta = layer(x) - org
        # rank dropout: one keep-mask per sample over ranks, compensated by 1/(1-p)
        low = x @ lora.lora_down.weight.T  # (3, 6, r)
        per_rank = torch.einsum("bsr,or->bsor", low, lora.lora_up.weight) * lora.scale / 0.5
        for b in range(3):
            fits = [torch.allclose(delta[b], per_rank[b][..., mask.bool()].sum(-1), atol=1e-6)
                    for mask in torch.cartesian_prod(*[torch.tensor([0, 1])] * 4)]
            assert any(fits)
        lora.eval()
        assert torch.allclose(layer(x), org + lora.scale * (low @ lora.lora_up.weight.T), atol=1e-6)

    neuron = make(models, dim=4, apply=False)
    assert neuron.unet_loras[0].dropout is None
    dropped = lora_flux.create_network(1.0, 4, 1, None, None, flux, neuron_dropout=0.3)
    assert all(lora.dropout == 0.3 for lora in dropped.unet_loras)


def test_max_norm_regularization_caps_norms(models):
    net = make(models, dim=4, alpha=4, split_qkv="True")
    randomize(net, std=0.5)
    big = net.unet_loras[0]
    small = net.unet_loras[1]
    with torch.no_grad():
        for p in small.parameters():
            p.mul_(1e-4)
    small_before = [p.clone() for p in small.parameters()]
    keys_scaled, mean_norm, max_norm = net.apply_max_norm_regularization(1.0, "cpu")
    assert keys_scaled == len(net.unet_loras) + len(net.text_encoder_loras) - 1
    assert max_norm <= 1.0 + 1e-5 and 0 < mean_norm <= max_norm
    for lora in net.unet_loras + net.text_encoder_loras:
        assert float(torch.linalg.norm(lora.get_weight(1.0))) <= 1.0 + 1e-4
    assert abs(float(torch.linalg.norm(big.get_weight(1.0))) - 1.0) < 1e-4  # scaled down to the cap, not below
    assert all(torch.equal(a, b) for a, b in zip(small_before, small.parameters()))


# ---------------------------------------------------------------------------------------------------------------
# Files


def test_save_load_round_trip_with_metadata_and_hashes(models, tmp_path):
    flux = models[0]
    inputs = flux_inputs(flux)
    net = make(models, dim=4, alpha=1)
    randomize(net)
    expected = run(flux, inputs)
    path = tmp_path / "lora.safetensors"
    net.save_weights(path, torch.bfloat16, {"ss_network_module": "networks.lora_flux", "ss_network_dim": "4",
                                            "modelspec.title": "t"})
    header = read_header(path)
    meta = header.metadata
    assert meta["ss_network_module"] == "networks.lora_flux" and meta["modelspec.title"] == "t"
    sd = load_tensors(path)
    assert all(v.dtype == (torch.float32 if k.endswith(".alpha") else torch.bfloat16) for k, v in sd.items())
    assert all(v.shape == () and float(v) == 1.0 for k, v in sd.items() if k.endswith(".alpha"))
    raw = path.read_bytes()
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[header.data_start:]).hexdigest()  # data region only
    from safetensors.torch import save

    ss_only = save(sd, metadata={k: v for k, v in meta.items() if k.startswith("ss_")})
    assert meta["sshs_legacy_hash"] == hashlib.sha256(ss_only[0x100000:0x110000]).hexdigest()[:8]

    flux2, clip2, t52 = models[0], models[1], models[2]
    net.restore()
    fresh = make((flux2, clip2, t52), dim=4, alpha=1)
    info = fresh.load_weights(path)
    assert not info.missing_keys and not info.unexpected_keys
    assert (run(flux, inputs) - expected).abs().max() < 2e-2  # bf16 weights
    for (k, a), b in zip(net.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a.to(torch.bfloat16).float(), b.float()), k

    with pytest.raises(ValueError, match="safetensors only"):
        net.save_weights(tmp_path / "lora.pt", None, None)
    assert not (tmp_path / "lora.pt").exists()
    net.save_weights(tmp_path / "plain.safetensors", None, None)
    assert read_header(tmp_path / "plain.safetensors").metadata == {}
    torch.save({"a": torch.zeros(1)}, tmp_path / "p.safetensors")
    with pytest.raises(ModelFileError, match="pickle"):
        fresh.load_weights(tmp_path / "p.safetensors")


def test_model_hashes_ignore_non_ss_metadata_and_cover_legacy_offset():
    from library.formats.model_hashes import add_model_hashes

    tensors = {"a": torch.arange(600_000, dtype=torch.float32)}  # 2.4 MB: the legacy window holds data
    m1, m2, m3 = {"ss_x": "1"}, {"ss_x": "1", "modelspec.title": "t"}, {"ss_x": "2"}
    for m in (m1, m2, m3):
        add_model_hashes(tensors, m)
    assert m1["sshs_model_hash"] == m2["sshs_model_hash"] == m3["sshs_model_hash"]
    assert m1["sshs_legacy_hash"] == m2["sshs_legacy_hash"] and len(m1["sshs_legacy_hash"]) == 8
    assert m1["sshs_model_hash"] == hashlib.sha256(tensors["a"].numpy().tobytes()).hexdigest()


def test_int64_and_missing_alpha_files_load(models, tmp_path):
    flux = models[0]
    inputs = flux_inputs(flux)
    base = run(flux, inputs)
    g = torch.Generator().manual_seed(5)
    sd = {}
    for name, (fan_in, fan_out) in (("lora_unet_double_blocks_0_img_attn_proj", DOUBLE["img_attn_proj"]),
                                    ("lora_unet_single_blocks_1_linear2", SINGLE["linear2"])):
        sd[f"{name}.lora_down.weight"] = torch.randn(4, fan_in, generator=g) * 0.1
        sd[f"{name}.lora_up.weight"] = torch.randn(fan_out, 4, generator=g) * 0.1
    sd["lora_unet_double_blocks_0_img_attn_proj.alpha"] = torch.tensor(1)  # int64: sd-scripts' default alpha
    save_file_atomic(sd, tmp_path / "int.safetensors")  # linear2 has no alpha: alpha = rank
    assert load_tensors(tmp_path / "int.safetensors")["lora_unet_double_blocks_0_img_attn_proj.alpha"].dtype \
        == torch.int64

    reference = copy.deepcopy(flux)
    plain_merge(reference, sd)
    expected = run(reference, inputs)

    net, _ = lora_flux.create_network_from_weights(1.0, tmp_path / "int.safetensors", None, [None, None], flux)
    assert ranks(net) == {"lora_unet_double_blocks_0_img_attn_proj": 4, "lora_unet_single_blocks_1_linear2": 4}
    assert [lora.alpha_value for lora in net.unet_loras] == [1.0, 4.0]
    net.apply_to(None, flux)
    net.load_weights(tmp_path / "int.safetensors")
    assert (run(flux, inputs) - expected).abs().max() < 1e-5
    assert net.state_dict()["lora_unet_double_blocks_0_img_attn_proj.alpha"].dtype == torch.float32
    net.restore()

    # loading into a network made with another alpha takes the file's alpha (sd-scripts keeps its own)
    other = make(models, dim=4, alpha=16.0)
    other.load_weights(tmp_path / "int.safetensors")
    got = {lora.lora_name: lora.scale for lora in other.unet_loras}
    assert got["lora_unet_double_blocks_0_img_attn_proj"] == 0.25 and got["lora_unet_single_blocks_1_linear2"] == 1.0
    assert (run(flux, inputs) - expected).abs().max() < 1e-5
    assert not torch.equal(expected, base)


def test_create_network_from_weights_infers_dims(models, tmp_path):
    net = make(models, dim=4, alpha=2.0, img_attn_dim="8", single_mod_dim="0", in_dims="[2,0,3,0,1]",
               train_t5xxl="True")
    net.save_weights(tmp_path / "l.safetensors", None, {})
    flux, clip, t5 = models
    loaded, sd = lora_flux.create_network_from_weights(1.0, tmp_path / "l.safetensors", None, [clip, t5], flux)
    assert ranks(loaded) == ranks(net)
    assert {lora.lora_name: lora.alpha_value for lora in loaded.unet_loras + loaded.text_encoder_loras} == \
        {lora.lora_name: 2.0 for lora in net.unet_loras + net.text_encoder_loras}
    assert loaded.train_t5xxl and any(n.startswith("lora_te3") for n in ranks(loaded))
    assert set(sd) == set(net.state_dict())


# ---------------------------------------------------------------------------------------------------------------
# split_qkv


@pytest.mark.parametrize("train_blocks", ["all", "double", "single"])
def test_split_qkv_saved_fused_loads_everywhere(models, tmp_path, train_blocks):
    flux = models[0]
    inputs = flux_inputs(flux)
    split = make(models, dim=4, alpha=3.0, split_qkv="True", train_blocks=train_blocks)
    kinds = {lora.lora_name.split("_")[-1]: lora.num_parts for lora in split.unet_loras if lora.split_dims}
    assert kinds == {"all": {"qkv": 3, "linear1": 4}, "double": {"qkv": 3}, "single": {"linear1": 4}}[train_blocks]
    randomize(split)
    expected = run(flux, inputs)
    path = tmp_path / "split.safetensors"
    split.save_weights(path, None, {})
    split.restore()
    sd = load_tensors(path)

    # fused, kohya layout: stacked downs, block-diagonal up, alpha = (alpha / r) * total rank
    for lora in split.unet_loras:
        name, k = lora.lora_name, lora.num_parts
        assert sd[f"{name}.lora_down.weight"].shape[0] == 4 * k
        assert float(sd[f"{name}.alpha"]) == 3.0 * k
        if k > 1:
            up, rows = sd[f"{name}.lora_up.weight"], 0
            for i, d in enumerate(lora.split_dims):
                block = up[rows:rows + d].clone()
                assert torch.equal(block[:, i * 4:(i + 1) * 4], lora.lora_up[i].weight.detach())
                block[:, i * 4:(i + 1) * 4] = 0
                assert not block.any()
                rows += d

    # (a) our non-split network built from the file
    plain, _ = lora_flux.create_network_from_weights(1.0, path, None, [None, None], flux)
    assert not any(lora.split_dims for lora in plain.unet_loras)
    plain.apply_to(None, flux)
    plain.load_weights(path)
    assert (run(flux, inputs) - expected).abs().max() < 1e-5
    plain.restore()

    # (b) any kohya loader: plain merge of alpha/rank * up @ down
    merged = copy.deepcopy(flux)
    plain_merge(merged, sd)
    assert (run(merged, inputs) - expected).abs().max() < 1e-5

    # (c) back into a split network: the parts come back exactly
    again = make(models, dim=4, alpha=1.0, split_qkv="True", train_blocks=train_blocks)
    info = again.load_weights(path)
    assert not info.missing_keys and not info.unexpected_keys
    for a, b in zip(split.unet_loras, again.unet_loras):
        assert a.alpha_value == b.alpha_value == 3.0
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert (run(flux, inputs) - expected).abs().max() < 1e-5
    again.restore()

    # (d) --dim_from_weights with split_qkv: split modules again
    resplit, _ = lora_flux.create_network_from_weights(1.0, path, None, None, flux, split_qkv="True")
    assert {lora.lora_name: (lora.lora_dim, lora.alpha_value) for lora in resplit.unet_loras if lora.split_dims} \
        == {lora.lora_name: (4, 3.0) for lora in split.unet_loras if lora.split_dims}


def test_split_qkv_refuses_a_non_split_file(models, tmp_path):
    net = make(models, dim=6, train_blocks="double")
    randomize(net)
    net.save_weights(tmp_path / "l.safetensors", None, None)
    net.restore()
    split = make(models, dim=2, train_blocks="double", split_qkv="True")
    with pytest.raises(RuntimeError, match="not block-diagonal"):
        split.load_weights(tmp_path / "l.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# network_args


def test_block_filters_type_dims_in_dims_and_regex_dims(models):
    assert set(ranks(make(models, apply=False, train_blocks="single"))) == {
        f"lora_unet_single_blocks_{i}_{s}" for i in range(2) for s in SINGLE} | {
        n for n in ranks(make(models, apply=False)) if n.startswith("lora_te1")}
    r = ranks(make(models, apply=False, train_double_block_indices="1", train_single_block_indices="none"))
    assert {n for n in r if n.startswith("lora_unet")} == {f"lora_unet_double_blocks_1_{s}" for s in DOUBLE}
    r = ranks(make(models, apply=False, train_double_block_indices="0-1", train_single_block_indices="1"))
    assert sum(n.startswith("lora_unet_double") for n in r) == 20 and "lora_unet_single_blocks_0_linear1" not in r

    r = ranks(make(models, apply=False, img_attn_dim="8", txt_mlp_dim="0", single_dim="6", single_mod_dim="2"))
    assert r["lora_unet_double_blocks_0_img_attn_qkv"] == r["lora_unet_double_blocks_1_img_attn_proj"] == 8
    assert not any("txt_mlp" in n for n in r)
    assert r["lora_unet_single_blocks_0_linear1"] == r["lora_unet_single_blocks_1_linear2"] == 6
    assert r["lora_unet_single_blocks_0_modulation_lin"] == 2 and r["lora_unet_double_blocks_0_img_mod_lin"] == 4

    r = ranks(make(models, apply=False, in_dims="[2,0,3,0,1]"))
    assert {n: d for n, d in r.items() if "blocks" not in n and n.startswith("lora_unet")} == {
        "lora_unet_img_in": 2, "lora_unet_vector_in_in_layer": 3, "lora_unet_vector_in_out_layer": 3,
        "lora_unet_txt_in": 1}
    r = ranks(make(models, apply=False, in_dims="1,1,1,1,1"))
    assert "lora_unet_guidance_in_out_layer" in r and "lora_unet_time_in_in_layer" in r
    assert not any("final_layer" in n for n in r)

    # a regex dim wins over type dims and block filters
    r = ranks(make(models, apply=False, network_reg_dims="double_blocks_0_.*qkv=16,single_blocks_1=3",
                   train_double_block_indices="none", img_attn_dim="8"))
    assert r["lora_unet_double_blocks_0_img_attn_qkv"] == r["lora_unet_double_blocks_0_txt_attn_qkv"] == 16
    assert not any(n.startswith("lora_unet_double_blocks_1") or n.endswith("0_img_attn_proj") for n in r)
    assert r["lora_unet_single_blocks_1_linear1"] == 3 and r["lora_unet_single_blocks_0_linear1"] == 4

    for bad in (dict(train_blocks="triple"), dict(in_dims="1,2,3"), dict(train_single_block_indices="0-2"),
                dict(network_reg_dims="noequals"), dict(split_qkv="maybe"), dict(ggpo_sigma="0.1", ggpo_beta="1")):
        with pytest.raises(ValueError):
            make(models, apply=False, **bad)


def test_param_groups_lrs_loraplus_and_regex_lrs(models):
    net = make(models, train_t5xxl="True", loraplus_lr_ratio="16", loraplus_text_encoder_lr_ratio="4",
               network_reg_lrs="single_blocks=1e-3")
    groups, descs = net.prepare_optimizer_params_with_multiple_te_lrs([1e-5, 2e-5], 1e-4, 5e-4)
    assert descs == ["textencoder 1 ", "textencoder 1 plus", "textencoder 2 ", "textencoder 2 plus",
                     "unet reg_lr_0", "unet reg_lr_0 plus", "unet", "unet plus"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-5, 4e-5, 2e-5, 8e-5, 1e-3, 1.6e-2, 1e-4, 1.6e-3])
    names = {id(p): n for n, p in net.named_parameters()}
    for g, d in zip(groups, descs):
        in_group = [names[id(p)] for p in g["params"]]
        assert all(("lora_up" in n) == d.endswith("plus") for n in in_group)
        assert all(("single_blocks" in n) == ("reg_lr" in d) for n in in_group if n.startswith("lora_unet"))
    assert sum(len(g["params"]) for g in groups) == len(list(net.get_trainable_params()))

    plain = make(models)
    groups, descs = plain.prepare_optimizer_params_with_multiple_te_lrs(None, None, 1e-4)
    assert descs == ["textencoder 1 ", "unet"] and [g["lr"] for g in groups] == [1e-4, 1e-4]
    groups, descs = plain.prepare_optimizer_params_with_multiple_te_lrs(0.0, 3e-4, 1e-4)
    assert descs == ["unet"] and groups[0]["lr"] == 3e-4  # lr 0: text-encoder LoRA not trained


# ---------------------------------------------------------------------------------------------------------------
# fp8 base weights


def test_lora_on_fp8_linear(models):
    from library.memory.fp8 import Fp8Linear, prepare_fp8

    flux = prepare_fp8(models[0].requires_grad_(False), compute_dtype=torch.float32)
    layer = flux.double_blocks[0].img_attn.qkv
    assert isinstance(layer, Fp8Linear) and layer.weight.dtype == torch.float8_e4m3fn
    net = make((flux, None, None), dim=4, alpha=4)
    randomize(net)
    lora = net.unet_loras[1]
    assert lora.lora_name == "lora_unet_double_blocks_0_img_attn_qkv"
    x = torch.randn(2, 3, H)
    with torch.no_grad():
        expected = F.linear(x, layer.weight.float(), layer.bias) + x @ lora.lora_down.weight.T @ lora.lora_up.weight.T
        assert (layer(x) - expected).abs().max() < 1e-5
        assert layer(x.to(torch.bfloat16)).dtype == torch.float32  # the base layer's compute dtype
    net.prepare_grad_etc(None, flux)
    out = flux(**flux_inputs(flux))
    out.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())
    assert not any(p.grad is not None for p in flux.parameters())


# ---------------------------------------------------------------------------------------------------------------
# diffusers interop


def diffusers_convert(sd: dict) -> dict:
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    return _convert_kohya_flux_lora_to_diffusers({k: v.clone() for k, v in sd.items()})


@pytest.mark.parametrize("split_qkv", [False, True])
def test_diffusers_loads_our_file_with_the_same_output(models, tmp_path, split_qkv):
    """Double-block LoRA at tiny width through diffusers' kohya converter into FluxTransformer2DModel (its
    single-block split is hard-coded to 3072 wide, so single blocks are covered at real width below)."""
    pytest.importorskip("peft")
    flux = models[0]
    reference = diffusers_reference(flux)

    net = make((flux, None, None), dim=6, alpha=2.0, train_blocks="double", split_qkv=str(split_qkv))
    randomize(net)
    inputs = flux_inputs(flux)
    ours = run(flux, inputs)
    net.save_weights(tmp_path / "l.safetensors", None, None)
    converted = diffusers_convert(load_tensors(tmp_path / "l.safetensors"))
    assert len(converted) == 2 * 2 * (8 + 2 * 3)  # A and B for 14 diffusers Linears per double block
    reference.load_lora_adapter(converted, prefix="transformer")
    with torch.no_grad():
        theirs = reference(hidden_states=inputs["img"], encoder_hidden_states=inputs["txt"],
                           pooled_projections=inputs["y"], timestep=inputs["timesteps"],
                           img_ids=inputs["img_ids"][0], txt_ids=inputs["txt_ids"][0], guidance=inputs["guidance"],
                           return_dict=False)[0]
    net.restore()
    assert (run(flux, inputs) - ours).abs().max() > 1e-3  # the LoRA matters...
    assert (theirs - ours).abs().max() < 1e-5  # ...and diffusers applies the same update


def test_diffusers_converts_every_real_size_module():
    """Real-width dev shapes (meta base model, real LoRA tensors) for diffusers' 3072-wide splits: every module
    lands on a diffusers Linear of the right shape, and a split_qkv file's parts keep their scale."""
    with torch.device("meta"):
        flux = Flux(FLUX_PRESETS["dev"])
    net = lora_flux.create_network(1.0, 2, 1.0, None, None, flux, split_qkv="True")
    net.apply_to(None, flux)
    randomize(net, std=0.02)
    sd = net.state_dict()
    assert float(sd["lora_unet_single_blocks_0_linear1.alpha"]) == 4.0
    converted = diffusers_convert({k: v for k, v in sd.items()})
    fixture = read_key_fixture("flux_dev_diffusers_keys.txt")
    targets = {k[len("transformer."):-len(".lora_A.weight")] for k in converted if k.endswith(".lora_A.weight")}
    assert len(targets) == 19 * 14 + 38 * 6 and len(converted) == 2 * len(targets)
    for t in targets:
        out_features, in_features = fixture[f"{t}.weight"]
        a, b = converted[f"transformer.{t}.lora_A.weight"], converted[f"transformer.{t}.lora_B.weight"]
        assert a.shape == (2, in_features) and b.shape == (out_features, 2), t
    lora = next(lora for lora in net.unet_loras if lora.lora_name == "lora_unet_single_blocks_5_linear1")
    probe = torch.randn(3072)
    with torch.no_grad():
        for i, part in enumerate(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")):
            a = converted[f"transformer.single_transformer_blocks.5.{part}.lora_A.weight"]
            b = converted[f"transformer.single_transformer_blocks.5.{part}.lora_B.weight"]
            ours = lora.scale * (lora.lora_up[i].weight @ (lora.lora_down[i].weight @ probe))
            assert torch.allclose(b @ (a @ probe), ours, atol=1e-6)
