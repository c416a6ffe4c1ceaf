"""LoRA tools through their CLIs on tiny models: a LoRA trained by our trainer in diffusers, merge into checkpoints
(then infer), LoRA + LoRA merges, extraction from a merged model."""

from __future__ import annotations

import pytest
import torch

from library.training.recipes.command_lines import LORA
from library.formats.lora_formats import LoRAWeights, load_lora, read_lora
from library.formats.safetensors_io import load_tensors, save_file_atomic
from model_helpers import diffusers_reference, flux_inputs, run
from networks import convert_flux_lora, flux_extract_lora, flux_merge_lora, lora_flux


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tools.make_demo_dataset import make_demo_dataset
    from tools.make_tiny_models import make_tiny_models

    base = tmp_path_factory.mktemp("tools")
    return make_tiny_models(base / "models"), make_demo_dataset(base / "data", count=2, size=32), base


@pytest.fixture(scope="module")
def trained(setup):
    """A LoRA trained by flux_train_network.py's CLI (4 steps): every block module with split_qkv, plus the
    conditioning layers (in_dims), transformer only."""
    import flux_train_network as cli
    from library.training.recipes.lora import LoRATrainer
    from library.training.arguments import verify_training_args

    models, toml, base = setup
    out = base / "trained"
    argv = ["--pretrained_model_name_or_path", str(models["flux"]), "--clip_l", str(models["clip_l"]),
            "--t5xxl", str(models["t5xxl"]), "--ae", str(models["ae"]), "--tokenizer_cache_dir",
            str(models["tokenizers"]), "--dataset_config", str(toml), "--output_dir", str(out),
            "--output_name", "trained", "--network_module", "networks.lora_flux", "--network_dim", "4",
            "--network_alpha", "2", "--network_args", "split_qkv=True", "in_dims=[2,2,2,2,2]",
            "--network_train_unet_only", "--learning_rate", "3e-2", "--max_train_steps", "4", "--seed", "3",
            "--max_data_loader_n_workers", "0", "--t5xxl_max_token_length", "16", "--model_prediction_type", "raw"]
    args = cli.setup_parser().parse_args(argv)
    verify_training_args(args, LORA)
    assert LoRATrainer(args).run() == 0
    return out / "trained.safetensors"


def load_flux(path):
    from library import flux_utils

    return flux_utils.load_flow_model(path, torch.float32, "cpu")[1].eval()


def hooked_output(flux, lora_path, inputs, multiplier=1.0):
    net, weights = lora_flux.create_network_from_weights(multiplier, lora_path, None, None, flux, for_inference=True)
    net.apply_to(None, flux, False, True)
    net.load_state_dict(weights, strict=False)
    out = run(flux, inputs)
    net.restore()
    return out


def diffusers_output(model, inputs):
    with torch.no_grad():
        return model(hidden_states=inputs["img"], encoder_hidden_states=inputs["txt"], pooled_projections=inputs["y"],
                     timestep=inputs["timesteps"], img_ids=inputs["img_ids"][0], txt_ids=inputs["txt_ids"][0],
                     guidance=inputs["guidance"], return_dict=False)[0]


def test_our_trained_lora_in_diffusers_own_loader(setup, trained, tmp_path, capsys):
    """Our converter's diffusers file through FluxTransformer2DModel.load_lora_adapter: the same output as our model
    with the LoRA, every layer included (blocks, split q/k/v, img_in/txt_in/time_in/vector_in/guidance_in)."""
    pytest.importorskip("peft")
    models, _, _ = setup
    flux = load_flux(models["flux"])
    inputs = flux_inputs(flux)
    base = run(flux, inputs)
    ours = hooked_output(flux, trained, inputs)
    assert (ours - base).abs().max() > 1e-3  # the trained LoRA matters

    dst = tmp_path / "trained_diffusers.safetensors"
    assert convert_flux_lora.main(["--src", "sd-scripts", "--dst", "diffusers", "--src_path", str(trained),
                                   "--dst_path", str(dst)]) == 0
    converted = load_tensors(dst)
    model = diffusers_reference(flux)
    model.load_lora_adapter(converted, prefix="transformer")
    loaded = {n for n, m in model.named_modules() if hasattr(m, "lora_A") and "default_0" in getattr(m, "lora_A")}
    assert len(loaded) == len({k.split(".lora_")[0] for k in converted})  # every layer of the file was loaded
    assert {"x_embedder", "context_embedder", "time_text_embed.guidance_embedder.linear_2"} <= loaded
    theirs = diffusers_output(model, inputs)
    diff = float((theirs - ours).abs().max())
    print(f"diffusers load_lora_adapter vs our hooked LoRA: max abs output difference {diff:.2e}")
    assert diff < 1e-5


def test_diffusers_kohya_converter_drops_the_conditioning_layers(trained):
    """Upstream limitation (docs/lora_formats.md): diffusers' own kohya converter emits the LoRA of img_in, txt_in,
    time_in, vector_in, guidance_in (and final_layer) without the `transformer.` prefix, so its loaders skip them.
    Double blocks only here: the converter's single-block split is hard-coded to 3072 wide."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    sd = {k: v.clone() for k, v in load_tensors(trained).items() if "single_blocks" not in k}
    out = _convert_kohya_flux_lora_to_diffusers(sd)
    dropped = sorted({k.split(".lora_")[0] for k in out if not k.startswith("transformer.")})
    print("dropped by diffusers' kohya converter:", dropped)
    assert not any("transformer_blocks" in k for k in dropped)  # the blocks always load
    if dropped:
        assert set(dropped) <= {"x_embedder", "context_embedder", "proj_out", "norm_out.linear",
                                *(f"time_text_embed.{e}_embedder.linear_{i}" for e in ("timestep", "text", "guidance")
                                  for i in (1, 2))}


@pytest.mark.parametrize("save_precision", [None, "bf16"])
def test_merge_into_checkpoint_then_infer_equals_hooked(setup, trained, tmp_path, save_precision):
    models, _, _ = setup
    merged = tmp_path / "merged.safetensors"
    extra = ["--save_precision", save_precision] if save_precision else []
    assert flux_merge_lora.main(["--flux_model", str(models["flux"]), "--save_to", str(merged), "--models",
                                 str(trained), "--ratios", "0.8", *extra]) == 0
    flux = load_flux(models["flux"])
    inputs = flux_inputs(flux)
    hooked = hooked_output(flux, trained, inputs, multiplier=0.8)
    stored = load_tensors(merged)
    assert set(stored) == set(load_tensors(models["flux"]))  # BFL names, every tensor
    expected_dtype = torch.bfloat16 if save_precision else torch.float32
    assert stored["double_blocks.0.img_attn.qkv.weight"].dtype == expected_dtype
    out = run(load_flux(merged), inputs)
    diff = float((out - hooked).abs().max())
    print(f"merge ({save_precision or 'fp32'}) then infer vs hooked: max abs output difference {diff:.2e}")
    assert diff < (1e-5 if save_precision is None else 3e-2)


def test_merge_into_a_diffusers_checkpoint_and_text_encoders(setup, tmp_path):
    """A diffusers-layout transformer comes out with BFL names; lora_te1 / lora_te3 modules go into the CLIP-L /
    T5 files."""
    from library import flux_utils
    from library.formats.diffusers_keys import bfl_to_diffusers

    models, _, _ = setup
    flux = load_flux(models["flux"])
    clip = flux_utils.load_clip_l(models["clip_l"], torch.float32, "cpu").eval()
    t5 = flux_utils.load_t5xxl(models["t5xxl"], torch.float32, "cpu").eval()
    folder = tmp_path / "diffusers" / "transformer"
    folder.mkdir(parents=True)
    save_file_atomic(bfl_to_diffusers(flux.state_dict(), flux.params.hidden_size),
                     folder / "diffusion_pytorch_model.safetensors")
    net = lora_flux.create_network(1.0, 3, 1.5, None, [clip, t5], flux, train_t5xxl="True")
    net.apply_to([clip, t5], flux)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    inputs, ids = flux_inputs(flux), torch.randint(0, 40, (1, 7))
    with torch.no_grad():
        want_flux, want_clip, want_t5 = run(flux, inputs), clip(ids).last_hidden_state, t5(ids).last_hidden_state
    net.restore()
    net.save_weights(tmp_path / "l.safetensors", None, None)
    assert flux_merge_lora.main(["--flux_model", str(tmp_path / "diffusers"), "--clip_l", str(models["clip_l"]),
                                 "--save_to", str(tmp_path / "m.safetensors"), "--clip_l_save_to",
                                 str(tmp_path / "c.safetensors"), "--t5xxl", str(models["t5xxl"]), "--t5xxl_save_to",
                                 str(tmp_path / "t.safetensors"), "--models", str(tmp_path / "l.safetensors")]) == 0
    assert (run(load_flux(tmp_path / "m.safetensors"), inputs) - want_flux).abs().max() < 1e-5
    merged_clip = flux_utils.load_clip_l(tmp_path / "c.safetensors", torch.float32, "cpu").eval()
    merged_t5 = flux_utils.load_t5xxl(tmp_path / "t.safetensors", torch.float32, "cpu").eval()
    with torch.no_grad():
        assert (merged_clip(ids).last_hidden_state - want_clip).abs().max() < 1e-5
        assert (merged_t5(ids).last_hidden_state - want_t5).abs().max() < 1e-5
        assert (t5(ids).last_hidden_state - want_t5).abs().max() > 1e-3  # the T5 LoRA matters


def _random_lora(names_shapes, rank, alpha, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: LoRAWeights(torch.randn(rank, i, generator=g) * 0.1, torch.randn(o, rank, generator=g) * 0.1, alpha)
            for n, (o, i) in names_shapes.items()}


def test_merge_loras_into_one_concat_exact_and_svd(tmp_path):
    from library.formats.lora_formats import save_lora

    shapes = {"lora_unet_double_blocks_0_img_attn_proj": (64, 64), "lora_unet_single_blocks_1_linear2": (64, 320)}
    a = _random_lora(shapes, 4, 2.0, 1)
    b = _random_lora({k: v for k, v in shapes.items() if "single" in k}, 2, 2.0, 2)
    save_lora(tmp_path / "a.safetensors", a, "sd-scripts", {"ss_base_model_version": "flux1"})
    save_lora(tmp_path / "b.safetensors", b, "diffusers")
    want = {n: 0.7 * a[n].delta() - 0.5 * (b[n].delta() if n in b else 0) for n in shapes}
    assert flux_merge_lora.main(["--save_to", str(tmp_path / "c.safetensors"), "--models",
                                 str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--ratios", "0.7",
                                 "-0.5", "--concat", "--shuffle"]) == 0
    merged, meta, _ = load_lora(tmp_path / "c.safetensors")
    assert merged["lora_unet_single_blocks_1_linear2"].rank == 6
    assert max(float((merged[n].delta() - want[n]).abs().max()) for n in shapes) < 1e-6
    assert meta["ss_network_module"] == "networks.lora_flux" and meta["ss_network_dim"] == "Dynamic"
    assert "sshs_model_hash" in meta

    for rank, bound in ((6, 1e-5), (1, None)):
        assert flux_merge_lora.main(["--save_to", str(tmp_path / f"s{rank}.safetensors"), "--models",
                                     str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
                                     "--ratios", "0.7", "-0.5", "--new_rank", str(rank)]) == 0
        svd, _, _ = load_lora(tmp_path / f"s{rank}.safetensors")
        err = max(float(torch.linalg.norm(svd[n].delta() - want[n]) / torch.linalg.norm(want[n])) for n in shapes)
        print(f"SVD merge to rank {rank}: max relative error {err:.2e}")
        if bound is not None:
            assert err < bound  # rank >= the summed update's rank: exact
        else:
            assert 0.05 < err < 1  # truncation error, reported


def test_extract_from_a_merged_model_recovers_the_lora(setup, tmp_path, capsys):
    models, _, _ = setup
    flux = load_flux(models["flux"])
    net = lora_flux.create_network(1.0, 4, 4.0, None, None, flux, train_blocks="double")
    net.apply_to(None, flux)
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    net.restore()
    net.save_weights(tmp_path / "l.safetensors", None, None)
    merged = tmp_path / "merged.safetensors"
    assert flux_merge_lora.main(["--flux_model", str(models["flux"]), "--save_to", str(merged), "--models",
                                 str(tmp_path / "l.safetensors")]) == 0
    out = tmp_path / "x.safetensors"
    assert flux_extract_lora.main(["--model_org", str(models["flux"]), "--model_tuned", str(merged), "--save_to",
                                   str(out), "--dim", "4", "--clamp_quantile", "1", "--error_report",
                                   str(tmp_path / "err.json")]) == 0
    extracted, meta, _ = load_lora(out)
    original, _ = read_lora(load_tensors(tmp_path / "l.safetensors"))
    assert set(extracted) == set(original)  # single blocks are unchanged: not extracted
    rel = {n: float(torch.linalg.norm(extracted[n].delta() - w.delta()) / torch.linalg.norm(w.delta()))
           for n, w in original.items()}
    with capsys.disabled():
        print(f"extract of a merged model: relative error of the LoRA update max {max(rel.values()):.2e}")
    assert max(rel.values()) < 1e-4
    assert meta["ss_network_dim"] == "4" and meta["modelspec.architecture"] == "flux-1-dev/lora"
    import json

    report = json.loads((tmp_path / "err.json").read_text())
    assert len(report["relative_error"]) == len(original) and max(report["relative_error"].values()) < 1e-4
    assert len(report["unchanged"]) == 2 * 3  # the tiny preset's single-block Linears

    assert flux_extract_lora.main(["--model_org", str(models["flux"]), "--model_tuned", str(models["flux"]),
                                   "--save_to", str(tmp_path / "none.safetensors")]) == 2
    assert "no block weight differs" in capsys.readouterr().err


def test_merge_refuses_a_lora_for_another_model(setup, tmp_path, capsys):
    models, _, _ = setup
    save_file_atomic({"lora_unet_double_blocks_7_img_attn_proj.lora_down.weight": torch.zeros(2, 64),
                      "lora_unet_double_blocks_7_img_attn_proj.lora_up.weight": torch.zeros(64, 2)},
                     tmp_path / "l.safetensors")
    assert flux_merge_lora.main(["--flux_model", str(models["flux"]), "--save_to", str(tmp_path / "m.safetensors"),
                                 "--models", str(tmp_path / "l.safetensors")]) == 2
    assert "lora_unet_double_blocks_7_img_attn_proj" in capsys.readouterr().err
    assert not (tmp_path / "m.safetensors").exists()


def test_trainer_reads_foreign_network_and_base_weights(setup, trained, tmp_path):
    """flux_train_network.py --network_weights (diffusers file, --dim_from_weights) and --base_weights (ComfyUI
    file): the network starts from the file's exact updates, the base gets the ComfyUI LoRA merged."""
    import flux_train_network as cli
    from library.training.recipes.lora import LoRATrainer
    from library.training.arguments import verify_training_args

    models, toml, _ = setup
    for fmt in ("diffusers", "comfyui"):
        assert convert_flux_lora.main(["--src", "sd-scripts", "--dst", fmt, "--src_path", str(trained),
                                       "--dst_path", str(tmp_path / f"{fmt}.safetensors")]) == 0
    out = tmp_path / "out"
    argv = ["--pretrained_model_name_or_path", str(models["flux"]), "--clip_l", str(models["clip_l"]),
            "--t5xxl", str(models["t5xxl"]), "--ae", str(models["ae"]), "--tokenizer_cache_dir",
            str(models["tokenizers"]), "--dataset_config", str(toml), "--output_dir", str(out),
            "--network_module", "networks.lora_flux", "--network_weights", str(tmp_path / "diffusers.safetensors"),
            "--dim_from_weights", "--base_weights", str(tmp_path / "comfyui.safetensors"),
            "--base_weights_multiplier", "0.5", "--network_train_unet_only", "--learning_rate", "1e-12",
            "--max_train_steps", "1", "--seed", "3", "--max_data_loader_n_workers", "0",
            "--t5xxl_max_token_length", "16", "--model_prediction_type", "raw"]
    args = cli.setup_parser().parse_args(argv)
    verify_training_args(args, LORA)
    trainer = LoRATrainer(args)
    assert trainer.run() == 0
    original, _ = read_lora(load_tensors(trained))
    saved, _ = read_lora(load_tensors(out / "last.safetensors"))
    assert set(saved) == set(original)
    assert max(float((saved[n].delta() - w.delta()).abs().max()) for n, w in original.items()) < 1e-6

    base = load_tensors(models["flux"])["double_blocks.0.img_attn.qkv.weight"]
    merged = trainer.models.flux.double_blocks[0].img_attn.qkv.weight.detach().float().cpu()
    want = base + 0.5 * original["lora_unet_double_blocks_0_img_attn_qkv"].delta()
    assert (merged - want).abs().max() < 1e-6


@pytest.mark.gpu
def test_merge_and_extract_on_cuda_match_cpu(setup, trained, tmp_path):
    """--working_device cuda / --device cuda compute the same files as the CPU (fp32, TF32 off)."""
    models, _, _ = setup
    torch.backends.cuda.matmul.allow_tf32 = False
    for device in ("cpu", "cuda"):
        assert flux_merge_lora.main(["--flux_model", str(models["flux"]), "--save_to",
                                     str(tmp_path / f"m_{device}.safetensors"), "--models", str(trained),
                                     "--working_device", device]) == 0
        assert flux_extract_lora.main(["--model_org", str(models["flux"]), "--model_tuned",
                                       str(tmp_path / f"m_{device}.safetensors"), "--save_to",
                                       str(tmp_path / f"x_{device}.safetensors"), "--dim", "8", "--clamp_quantile",
                                       "1", "--device", device]) == 0
    cpu, gpu = load_tensors(tmp_path / "m_cpu.safetensors"), load_tensors(tmp_path / "m_cuda.safetensors")
    assert max(float((cpu[k].float() - gpu[k].float()).abs().max()) for k in cpu) < 1e-5
    a, _ = read_lora(load_tensors(tmp_path / "x_cpu.safetensors"))
    b, _ = read_lora(load_tensors(tmp_path / "x_cuda.safetensors"))
    assert set(a) == set(b) and max(float((a[n].delta() - b[n].delta()).abs().max()) for n in a) < 1e-4


@pytest.mark.parametrize("tool, argv, message", [
    (flux_extract_lora, ["--dim", "0"], "argument --dim: must be 1 or more, got 0"),
    (flux_merge_lora, ["--new_rank", "-4"], "argument --new_rank: must be 1 or more, got -4"),
    (flux_merge_lora, ["--ratio", "0.5"], "unknown option --ratio (did you mean --ratios?)"),  # no abbreviations
    (convert_flux_lora, ["--dst_pth", "x"], "unknown option --dst_pth (did you mean --dst_path?)"),
])
def test_tool_options_are_checked_in_one_line(capsys, tool, argv, message):
    required = {flux_extract_lora: ["--model_org", "a", "--model_tuned", "b", "--save_to", "c"],
                flux_merge_lora: ["--save_to", "c", "--models", "l"],
                convert_flux_lora: ["--src_path", "a", "--dst_path", "b"]}[tool]
    with pytest.raises(SystemExit) as e:
        tool.main(required + argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"error: {message}" in err and err.count("\n") == 1, err
