"""library/formats/lora_formats.py and networks/convert_flux_lora.py: every layout read exactly, any to any conversion,
loading foreign layouts through the trainer's / inference's loaders."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors import safe_open

from library.formats import lora_formats as lf
from library.models.transformer import Flux
from library.formats.safetensors_io import load_tensors, save_file_atomic
from model_helpers import flux_inputs
from networks import convert_flux_lora, lora_flux

H = 64  # tiny preset hidden size


def randomize(module, seed=3, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def kohya_lora(models, split_qkv: bool) -> dict[str, torch.Tensor]:
    """A kohya file of our trainer: every block module, the conditioning layers, CLIP-L and T5 modules, with
    alpha/rank = 0.3 (a scale no format can keep by accident) plus one final_layer module from another tool."""
    flux, clip, t5 = models
    net = lora_flux.create_network(1.0, 4, 1.2, None, [clip, t5], flux, split_qkv=str(split_qkv),
                                   in_dims="[2,2,2,2,2]", train_t5xxl="True")
    net.apply_to([clip, t5], flux)
    randomize(net)
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    net.restore()
    g = torch.Generator().manual_seed(9)
    sd["lora_unet_final_layer_adaLN_modulation_1.lora_down.weight"] = torch.randn(3, H, generator=g)
    sd["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"] = torch.randn(2 * H, 3, generator=g)
    sd["lora_unet_final_layer_adaLN_modulation_1.alpha"] = torch.tensor(1.5)
    return sd


def deltas(modules: dict[str, lf.LoRAWeights]) -> dict[str, torch.Tensor]:
    return {n: w.delta() for n, w in modules.items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    return max(float((a[n] - b[n]).abs().max()) for n in a)


@pytest.mark.parametrize("split_qkv", [False, True])
def test_any_to_any_round_trips_keep_every_update(models, split_qkv, capsys):
    sd = kohya_lora(models, split_qkv)
    modules, layout = lf.read_lora(sd)
    assert layout == "sd-scripts"
    assert any(n.startswith("lora_te3_") for n in modules) and "lora_unet_img_in" in modules
    reference = deltas(modules)
    worst = 0.0
    for a in lf.FORMATS:
        in_a = lf.write_lora(modules, a)
        for b in lf.FORMATS:
            back, _ = lf.read_lora(lf.write_lora(lf.read_lora(in_a)[0], b))
            expected = {n: d for n, d in reference.items() if not (a == "ai-toolkit" or b == "ai-toolkit")
                        or n.startswith("lora_unet_")}  # ai-toolkit files hold the transformer only
            worst = max(worst, max_diff(deltas(back), expected))
    print(f"any-to-any round trips (split_qkv={split_qkv}): max abs update difference {worst:.2e}")
    assert worst <= 1e-6


def test_written_layouts_have_the_expected_names(models):
    modules, _ = lf.read_lora(kohya_lora(models, split_qkv=True))
    diff = lf.write_lora(modules, "diffusers")
    # split_qkv -> each part gets its own rank-4 block; the MLP part of linear1 too; final_layer -> norm_out.linear
    assert diff["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"].shape == (4, H)
    assert diff["transformer.single_transformer_blocks.1.proj_mlp.lora_B.weight"].shape == (4 * H, 4)
    assert "transformer.norm_out.linear.lora_A.weight" in diff and "transformer.x_embedder.lora_B.weight" in diff
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in diff
    assert "text_encoder_2.encoder.block.0.layer.1.DenseReluDense.wi_0.lora_A.weight" in diff
    assert not any(k.endswith(".alpha") for k in diff)
    comfy = lf.write_lora(modules, "comfyui")
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight" in comfy
    assert "diffusion_model.single_blocks.1.linear1.alpha" in comfy
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha" in comfy
    assert not any(k.startswith("text_encoder") for k in lf.write_lora(modules, "ai-toolkit"))


def _pair(g, rank, out, inp):
    return torch.randn(rank, inp, generator=g) * 0.1, torch.randn(out, rank, generator=g) * 0.1


def test_foreign_layouts_read_exactly():
    """Hand-made files of other tools: PEFT with adapter metadata (lora_alpha, alpha_pattern, rsLoRA), missing
    q/k/v/mlp parts, OneTrainer / LyCORIS underscores, BFL names with lora_A/B, ComfyUI without alpha, lora_te2."""
    g = torch.Generator().manual_seed(0)
    (qa, qb), (ka, kb), (va, vb) = (_pair(g, 2, H, H) for _ in range(3))
    (pa, pb) = _pair(g, 3, H, H)
    peft = {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": qa,
            "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": qb,
            "transformer.single_transformer_blocks.0.attn.to_k.lora_A.weight": ka,
            "transformer.single_transformer_blocks.0.attn.to_k.lora_B.weight": kb,
            "transformer.single_transformer_blocks.0.attn.to_v.lora_A.weight": va,
            "transformer.single_transformer_blocks.0.attn.to_v.lora_B.weight": vb,
            "transformer.transformer_blocks.1.attn.to_out.0.lora_A.weight": pa,
            "transformer.transformer_blocks.1.attn.to_out.0.lora_B.weight": pb}
    adapter = {"transformer.r": 2, "transformer.lora_alpha": 8,
               "transformer.alpha_pattern": {"transformer_blocks.1.attn.to_out.0": 6}}
    meta = {"lora_adapter_metadata": json.dumps(adapter)}
    modules, layout = lf.read_lora(peft, meta)
    assert layout == "diffusers"
    linear1 = modules["lora_unet_single_blocks_0_linear1"].delta()
    assert linear1.shape == (3 * H + 4 * H, H)  # rows for the absent proj_mlp part are zero
    assert torch.allclose(linear1[:H], 4.0 * qb @ qa) and torch.allclose(linear1[2 * H:3 * H], 4.0 * vb @ va)
    assert not linear1[3 * H:].any()
    assert torch.allclose(modules["lora_unet_double_blocks_1_img_attn_proj"].delta(), 2.0 * pb @ pa)

    rs = json.dumps({"transformer.lora_alpha": 4, "transformer.use_rslora": True})
    rs_modules, _ = lf.read_lora(peft, {"lora_adapter_metadata": rs})
    assert torch.allclose(rs_modules["lora_unet_double_blocks_1_img_attn_proj"].delta(), 4 / math.sqrt(3) * pb @ pa)

    onetrainer = {"lora_transformer_transformer_blocks_0_attn_add_k_proj.lora_down.weight": ka,
                  "lora_transformer_transformer_blocks_0_attn_add_k_proj.lora_up.weight": kb,
                  "lora_transformer_transformer_blocks_0_attn_add_k_proj.alpha": torch.tensor(1.0),
                  "lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": qa[:, :32],
                  "lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight": qb[:32],
                  "lora_te2_encoder_block_0_layer_0_SelfAttention_q.alpha": torch.tensor(4, dtype=torch.int64)}
    modules, layout = lf.read_lora(onetrainer)
    assert layout == "onetrainer"
    qkv = modules["lora_unet_double_blocks_0_txt_attn_qkv"].delta()
    assert torch.allclose(qkv[H:2 * H], 0.5 * kb @ ka) and not qkv[:H].any() and not qkv[2 * H:].any()
    assert torch.allclose(modules["lora_te3_encoder_block_0_layer_0_SelfAttention_q"].delta(),
                          2.0 * qb[:32] @ qa[:, :32])

    bfl = {"double_blocks.0.img_mod.lin.lora_A.weight": qa, "double_blocks.0.img_mod.lin.lora_B.weight": qb,
           "lycoris_single_transformer_blocks_0_proj_out.lora_down.weight": ka,
           "lycoris_single_transformer_blocks_0_proj_out.lora_up.weight": kb}
    modules, _ = lf.read_lora(bfl)
    assert torch.allclose(modules["lora_unet_double_blocks_0_img_mod_lin"].delta(), qb @ qa)  # no alpha: scale 1
    assert torch.allclose(modules["lora_unet_single_blocks_0_linear2"].delta(), kb @ ka)

    comfy = {"diffusion_model.img_in.lora_down.weight": qa, "diffusion_model.img_in.lora_up.weight": qb}
    modules, layout = lf.read_lora(comfy)
    assert layout == "comfyui" and torch.allclose(modules["lora_unet_img_in"].delta(), qb @ qa)


def test_diffusers_norm_out_halves_are_swapped():
    """diffusers' norm_out.linear holds (scale, shift), BFL's final_layer.adaLN_modulation.1 (shift, scale)."""
    g = torch.Generator().manual_seed(1)
    a, b = _pair(g, 2, 2 * H, H)
    modules, _ = lf.read_lora({"transformer.norm_out.linear.lora_A.weight": a,
                               "transformer.norm_out.linear.lora_B.weight": b})
    delta = modules["lora_unet_final_layer_adaLN_modulation_1"].delta()
    assert torch.allclose(delta[:H], (b @ a)[H:]) and torch.allclose(delta[H:], (b @ a)[:H])


@pytest.mark.parametrize("sd, message", [
    ({"model.layer.weight": torch.zeros(2, 2)}, "not a FLUX.1 LoRA in any known layout; sample keys: model.layer"),
    ({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 4),
      "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(12, 2),
      "lora_unet_double_blocks_0_img_attn_qkv.dora_scale": torch.zeros(1, 4)}, "not plain LoRA weights (DoRA"),
    ({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 4),
      "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(12, 2),
      "lora_unet_input_blocks_1_0_emb_layers_1.lora_down.weight": torch.zeros(2, 4),
      "lora_unet_input_blocks_1_0_emb_layers_1.lora_up.weight": torch.zeros(4, 2)},
     "not FLUX.1 / CLIP-L / T5 layers (a LoRA for another model?): unknown FLUX module "
     "'lora_unet_input_blocks_1_0_emb_layers_1'"),
    ({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 4)}, "needs both down (A) and up"),
])
def test_unreadable_files_are_named_clearly(sd, message):
    with pytest.raises(lf.LoRAFormatError, match=re.escape(message)):
        lf.read_lora(sd)


def test_kohya_files_load_unchanged(tmp_path):
    sd = {"lora_unet_img_in.lora_down.weight": torch.ones(2, 4),
          "lora_unet_img_in.lora_up.weight": torch.ones(4, 2), "lora_unet_img_in.alpha": torch.tensor(1)}
    save_file_atomic(sd, tmp_path / "k.safetensors")
    loaded = lora_flux.load_lora_file(tmp_path / "k.safetensors")
    assert loaded["lora_unet_img_in.alpha"].dtype == torch.int64  # as stored: no conversion for kohya files


@pytest.mark.parametrize("fmt", ["diffusers", "comfyui"])
def test_foreign_files_apply_like_the_kohya_file(models, tiny_paths, tmp_path, fmt):
    """--lora_weights (apply_loras, hooked and merged) and --network_weights (load_weights) read a converted
    file with the same effect as the kohya original, transformer and text encoders alike."""
    from library.lora.loading import apply_loras

    flux, clip, t5 = models
    sd = kohya_lora(models, split_qkv=True)
    save_file_atomic(sd, tmp_path / "kohya.safetensors")
    assert convert_flux_lora.main(["--src", "sd-scripts", "--dst", fmt, "--src_path",
                                   str(tmp_path / "kohya.safetensors"), "--dst_path",
                                   str(tmp_path / "other.safetensors")]) == 0
    inputs = flux_inputs(flux)
    ids = torch.randint(0, 40, (1, 7))

    def outputs():
        with torch.no_grad():
            return flux(**inputs), clip(ids).last_hidden_state, t5(ids).last_hidden_state

    base = outputs()
    results = {}
    for name in ("kohya", "other"):
        nets = apply_loras([f"{tmp_path / name}.safetensors;0.7"], flux, clip, t5, merge=False, device="cpu")
        results[name] = outputs()
        for n in nets:
            n.restore()
    for ours, theirs, b in zip(results["kohya"], results["other"], base):
        assert (ours - b).abs().max() > 1e-3  # the LoRA changes every model...
        assert (ours - theirs).abs().max() < 1e-5  # ...the same way from either file

    net = lora_flux.create_network(1.0, 4, 1.2, None, [clip, t5], flux, split_qkv="True", in_dims="[2,2,2,2,2]",
                                   train_t5xxl="True")
    net.apply_to([clip, t5], flux)
    info = net.load_weights(tmp_path / "other.safetensors")  # the trainer's --network_weights path
    # everything but the final_layer module (not part of a trained network) lands on the network
    assert info.unexpected_keys and all("final_layer" in k for k in info.unexpected_keys)
    assert not info.missing_keys


def test_convert_cli_checks_src_and_carries_metadata(tmp_path, capsys):
    sd = {"lora_unet_img_in.lora_down.weight": torch.randn(2, 64), "lora_unet_img_in.lora_up.weight":
          torch.randn(H, 2), "lora_unet_img_in.alpha": torch.tensor(1.0)}
    save_file_atomic(sd, tmp_path / "k.safetensors", {"ss_network_dim": "2", "modelspec.title": "x"})
    src = str(tmp_path / "k.safetensors")
    assert convert_flux_lora.main(["--src_path", src, "--dst_path", str(tmp_path / "o.safetensors")]) == 2
    assert "this is a sd-scripts layout LoRA, not ai-toolkit" in capsys.readouterr().err
    assert convert_flux_lora.main(["--src", "auto", "--dst", "ai-toolkit", "--src_path", src, "--dst_path",
                                   str(tmp_path / "o.safetensors")]) == 0
    with safe_open(str(tmp_path / "o.safetensors"), "pt") as f:
        assert f.metadata() == {"ss_network_dim": "2", "modelspec.title": "x"}
        assert sorted(f.keys()) == ["transformer.x_embedder.lora_A.weight", "transformer.x_embedder.lora_B.weight"]
    back = load_tensors(tmp_path / "o.safetensors")
    assert torch.allclose(back["transformer.x_embedder.lora_B.weight"] @ back["transformer.x_embedder.lora_A.weight"],
                          0.5 * sd["lora_unet_img_in.lora_up.weight"] @ sd["lora_unet_img_in.lora_down.weight"])


def test_real_size_dev_lora_lands_on_real_diffusers_and_bfl_keys():
    """FLUX.1-dev width (meta base model with 2 + 2 of its blocks, real rank-2 LoRA tensors, every block module plus
    the conditioning layers): each diffusers / ComfyUI module written names a real weight of the published key
    lists, with its shape, and the updates survive the round trip."""
    from dataclasses import replace

    from conftest import read_key_fixture
    from library.models.transformer import FLUX_PRESETS

    with torch.device("meta"):
        flux = Flux(replace(FLUX_PRESETS["dev"], depth=2, depth_single_blocks=2))
    net = lora_flux.create_network(1.0, 2, 1.0, None, None, flux, split_qkv="True", in_dims="[2,2,2,2,2]")
    net.apply_to(None, flux)
    randomize(net, std=0.02)
    modules, _ = lf.read_lora({k: v for k, v in net.state_dict().items()})
    assert len(modules) == 2 * 10 + 2 * 3 + 8
    for fmt, fixture, prefix in (("diffusers", "flux_dev_diffusers_keys.txt", "transformer."),
                                 ("comfyui", "flux_dev_keys.txt", "diffusion_model.")):
        shapes = read_key_fixture(fixture)
        written = lf.write_lora(modules, fmt)
        downs = {k[len(prefix):].rsplit(".lora_", 1)[0]: v for k, v in written.items() if ".lora_A" in k
                 or ".lora_down" in k}
        ups = {k[len(prefix):].rsplit(".lora_", 1)[0]: v for k, v in written.items() if ".lora_B" in k
               or ".lora_up" in k}
        assert set(downs) == set(ups)
        for name in downs:
            out_features, in_features = shapes[f"{name}.weight"]
            assert downs[name].shape[1] == in_features and ups[name].shape[0] == out_features, (fmt, name)
        back, _ = lf.read_lora(written)
        assert set(back) == set(modules)
        # the updates applied to random vectors (a real-width linear1 update alone is 264 MB in fp32)
        probe = torch.randn(3072 * 4 + 3072, 4, generator=torch.Generator().manual_seed(0))

        def apply(w):
            return w.scale * (w.up @ (w.down @ probe[:w.down.shape[1]]))

        assert max(float((apply(back[n]) - apply(w)).abs().max()) for n, w in modules.items()) <= 1e-6
