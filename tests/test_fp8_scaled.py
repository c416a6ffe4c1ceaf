"""Scaled fp8 ("fp8_scaled") files: ComfyUI's dequantisation exactly, on files we write and on a file laid out the way
ComfyUI writes one; forward, LoRA training (with block swap), inference and LoRA merging on them; one real-width
block on the CPU; and, on a GPU of compute capability 8.9+, torch._scaled_mm against the upcast path."""

from dataclasses import replace
from functools import partial

import cli_runs
import pytest
import torch
from cli_runs import run_args
from safetensors.torch import load_file

import flux_minimal_inference
from library.formats import fp8_scaled
from library.formats.safetensors_io import ModelFileError, save_file_atomic
from library.memory.fp8 import Fp8Linear, prepare_fp8, prepare_fp8_scaled
from library.models.checkpoint import analyze_checkpoint, load_transformer
from library.models.flux_math import position_embedding
from library.models.transformer import Flux, SingleStreamBlock
from networks import flux_merge_lora
from tools.make_demo_dataset import make_demo_dataset
from tools.make_tiny_models import make_tiny_models

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FP8 = ("--fp8_base", "--mixed_precision", "bf16")
run_trainer = partial(cli_runs.run_trainer, "network")


def comfyui_dequantized(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The reference: ComfyUI's scaled-fp8 Linear casts the weight to the compute dtype, then multiplies by
    `scale_weight` cast to that dtype (its shape broadcast against the weight's)."""
    return weight.to(dtype) * scale.to(dtype)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny models; the transformer also as 4 double + 8 single blocks (block swap needs them) in fp32 and as
    fp8_scaled per tensor and per channel."""
    base = tmp_path_factory.mktemp("fp8s")
    models = make_tiny_models(base / "models")
    params = replace(analyze_checkpoint(models["flux"]).params, depth=4, depth_single_blocks=8)
    torch.manual_seed(3)
    sd = Flux(params).state_dict()
    out = {"fp32": base / "flux_fp32.safetensors"}
    save_file_atomic(sd, out["fp32"], {"tiny": "true"})
    for mode in fp8_scaled.MODES:
        out[mode] = base / f"flux_{mode}.safetensors"
        save_file_atomic(fp8_scaled.quantize_state_dict_fp8_scaled(sd, mode), out[mode], {"tiny": "true"})
    return models, out, make_demo_dataset(base / "data", count=2, size=32)


@pytest.mark.parametrize("mode", fp8_scaled.MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_loading_a_file_we_write_dequantises_with_comfyuis_formula(files, mode, dtype):
    _, paths, _ = files
    raw = load_file(str(paths[mode]))
    assert raw[fp8_scaled.MARKER].dtype == torch.float8_e4m3fn
    info = analyze_checkpoint(paths[mode])
    assert info.fp8_scaled and "img_in.weight" in info.scales and info.dtypes == {"F8_E4M3", "F32"}
    model = load_transformer(paths[mode], dtype)
    original = load_file(str(paths["fp32"]))
    for name, t in model.state_dict().items():
        if name in info.scales:
            scale = raw[fp8_scaled.scale_key(name)]
            assert scale.shape == (() if mode == "tensor" else (t.shape[0], 1))
            assert torch.equal(scale, scale.to(torch.bfloat16).float())  # our scales survive ComfyUI's cast
            assert torch.equal(t, comfyui_dequantized(raw[name], scale, dtype)), name
            err = (t.float() - original[name]).norm() / original[name].norm()
            assert err < 0.05, f"{name}: rel. error {err:.3f}"
        else:
            assert torch.equal(t, original[name].to(dtype)), name


def comfyui_style_file(path, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint laid out as ComfyUI saves a scaled-fp8 model: `model.diffusion_model.` prefix, an empty marker
    of the fp8 dtype, plain fp32 per-tensor scales (not rounded to bf16), `scale_input` beside them, bf16 others."""
    out = {"model.diffusion_model.scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for k, t in sd.items():
        key = "model.diffusion_model." + k
        if k.endswith(".weight") and t.dim() == 2:
            scale = t.abs().amax().float() / 448
            out[key] = (t.float() / scale).to(torch.float8_e4m3fn)
            out[key[: -len("weight")] + "scale_weight"] = scale
            out[key[: -len("weight")] + "scale_input"] = torch.ones(())
        else:
            out[key] = t.to(torch.bfloat16)
    save_file_atomic(out, path)
    return out


def test_a_file_written_the_way_comfyui_does_loads_and_computes_its_formula(files, tmp_path):
    _, paths, _ = files
    raw = comfyui_style_file(tmp_path / "comfy.safetensors", load_file(str(paths["fp32"])))
    info = analyze_checkpoint(tmp_path / "comfy.safetensors")
    assert info.prefix == "model.diffusion_model." and len(info.scales) == sum(k.endswith("scale_weight") for k in raw)
    dequantised = load_transformer(tmp_path / "comfy.safetensors", torch.bfloat16)
    for name, t in dequantised.state_dict().items():
        key = "model.diffusion_model." + name
        if name in info.scales:
            assert torch.equal(t, comfyui_dequantized(raw[key], raw[key[:-6] + "scale_weight"], torch.bfloat16))
        else:
            assert torch.equal(t, raw[key])
    stored = prepare_fp8(load_transformer(tmp_path / "comfy.safetensors"), compute_dtype=torch.bfloat16)
    assert stored.img_in.weight.dtype == torch.float8_e4m3fn and stored.img_in.scale.dtype == torch.float32
    inputs = tiny_inputs(dequantised.params)
    with torch.no_grad():
        assert torch.equal(stored(**inputs), dequantised(**inputs))


def tiny_inputs(params, tokens: int = 8, txt: int = 4, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(1)
    ids = torch.zeros(1, tokens, 3)
    ids[0, :, 2] = torch.arange(tokens)
    return dict(img=torch.randn(1, tokens, params.in_channels, generator=g).to(dtype), img_ids=ids,
                txt=torch.randn(1, txt, params.context_in_dim, generator=g).to(dtype), txt_ids=torch.zeros(1, txt, 3),
                timesteps=torch.tensor([0.5]), y=torch.randn(1, params.vec_in_dim, generator=g).to(dtype),
                guidance=torch.tensor([3.5]) if params.guidance_embed else None)


@pytest.mark.parametrize("mode", fp8_scaled.MODES)
def test_forward_and_input_gradient_equal_those_of_the_dequantised_weights(files, mode):
    _, paths, _ = files
    fp8 = prepare_fp8(load_transformer(paths[mode]), compute_dtype=torch.bfloat16).requires_grad_(False)
    plain = load_transformer(paths[mode], torch.bfloat16).requires_grad_(False)
    assert isinstance(fp8.double_blocks[0].img_attn.qkv, Fp8Linear)
    outs, grads = [], []
    for model in (fp8, plain):
        inputs = tiny_inputs(model.params)
        img = inputs["img"].requires_grad_()
        out = model(**{**inputs, "img": img})
        out.square().sum().backward()
        outs.append(out)
        grads.append(img.grad)
    assert torch.equal(outs[0], outs[1]) and torch.equal(grads[0], grads[1])


def test_prepare_fp8_scaled_quantises_a_loaded_model_as_the_writer_does(files):
    _, paths, _ = files
    model = prepare_fp8_scaled(load_transformer(paths["fp32"], torch.float32), "channel")
    raw = load_file(str(paths["channel"]))
    lin = model.single_blocks[0].linear1
    assert torch.equal(lin.weight.view(torch.uint8), raw["single_blocks.0.linear1.weight"].view(torch.uint8))
    assert torch.equal(lin.scale, raw["single_blocks.0.linear1.scale_weight"])


def train_argv(files, out, base, *extra):
    models, paths, toml = files
    return [*run_args({**models, "flux": paths[base]}, toml, out), "--network_module", "networks.lora_flux",
            "--network_dim", "4", "--learning_rate", "1e-2", "--max_train_steps", "3", "--network_train_unet_only",
            "--cache_latents", "--cache_text_encoder_outputs", "--gradient_checkpointing", *extra]


@pytest.fixture(scope="module")
def fp8_scaled_lora(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    assert run_trainer(train_argv(files, out, "channel", *FP8))[1] == 0
    return out / "last.safetensors"


def test_lora_training_on_an_fp8_scaled_base_with_block_swap_trains_the_same_weights(files, fp8_scaled_lora,
                                                                                      tmp_path):
    trainer, code = run_trainer(train_argv(files, tmp_path, "channel", *FP8, "--blocks_to_swap", "4"))
    assert code == 0
    assert trainer.block_swappers and torch.float8_e4m3fn in trainer.block_swappers[0].layout.dtypes
    got, ref = load_file(str(tmp_path / "last.safetensors")), load_file(str(fp8_scaled_lora))
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in got)
    assert all(v.isfinite().all() for v in got.values())


def test_lora_training_without_fp8_base_uses_the_dequantised_weights(files, tmp_path):
    models, paths, toml = files
    plain = tmp_path / "dequantised.safetensors"
    save_file_atomic(load_transformer(paths["tensor"], torch.float32).state_dict(), plain, {"tiny": "true"})
    runs = {}
    for name, base in (("scaled", paths["tensor"]), ("plain", plain)):
        argv = train_argv((models, {**paths, "x": base}, toml), tmp_path / name, "x")
        assert run_trainer(argv)[1] == 0
        runs[name] = load_file(str(tmp_path / name / "last.safetensors"))
    assert all(torch.equal(runs["scaled"][k], runs["plain"][k]) for k in runs["plain"])


def test_inference_with_fp8_weights_renders_what_the_dequantised_bf16_model_renders(files, tmp_path):
    models, paths, _ = files
    common = ["--ckpt_path", str(paths["channel"]), "--clip_l", str(models["clip_l"]), "--t5xxl",
              str(models["t5xxl"]), "--ae", str(models["ae"]), "--tokenizer_cache_dir", str(models["tokenizers"]),
              "--dtype", "bf16", "--width", "32", "--height", "32", "--steps", "2", "--seed", "5", "--device", "cpu",
              "--output_latents", "--t5xxl_max_token_length", "16"]
    for name, extra in (("fp8", ["--flux_dtype", "fp8", "--fp8_matmul"]), ("bf16", [])):
        assert flux_minimal_inference.main([*common, "--output_dir", str(tmp_path / name), *extra]) == 0
    a, b = (load_file(str(next((tmp_path / n).glob("*_latents.safetensors"))))["latents"] for n in ("fp8", "bf16"))
    assert a.isfinite().all() and torch.equal(a, b)
    assert list((tmp_path / "fp8").glob("*.png"))


def test_merge_with_fp8_scaled_writes_a_file_that_loads_back(files, fp8_scaled_lora, tmp_path):
    _, paths, _ = files
    common = ["--flux_model", str(paths["channel"]), "--models", str(fp8_scaled_lora)]
    assert flux_merge_lora.main([*common, "--save_to", str(tmp_path / "f32.safetensors"),
                                 "--save_precision", "float"]) == 0
    assert flux_merge_lora.main([*common, "--save_to", str(tmp_path / "t.safetensors"), "--fp8_scaled", "tensor",
                                 "--save_precision", "bf16"]) == 0
    assert flux_merge_lora.main([*common, "--save_to", str(tmp_path / "kept.safetensors")]) == 0
    merged = load_file(str(tmp_path / "f32.safetensors"))
    assert merged["img_in.weight"].dtype == torch.float32
    for name, mode in (("t", "tensor"), ("kept", "channel")):  # no --save_precision: a scaled base stays scaled
        info = analyze_checkpoint(tmp_path / f"{name}.safetensors")
        assert info.fp8_scaled and len(info.scales) == len(analyze_checkpoint(paths[mode]).scales)
        raw = load_file(str(tmp_path / f"{name}.safetensors"))
        for weight in info.scales:  # the merged fp32 weight, quantised
            q, s = fp8_scaled.quantize_weight(merged[weight], mode)
            assert torch.equal(raw[weight].view(torch.uint8), q.view(torch.uint8)) and torch.equal(raw[
                fp8_scaled.scale_key(weight)], s.reshape(raw[fp8_scaled.scale_key(weight)].shape)), weight
        load_transformer(tmp_path / f"{name}.safetensors", torch.bfloat16)
    assert flux_merge_lora.main([*common, "--save_to", str(tmp_path / "x.safetensors"), "--fp8_scaled", "tensor",
                                 "--save_precision", "fp8"]) == 2


@pytest.mark.parametrize("streaming", [False, True])
def test_full_fine_tuning_saves_scaled_fp8_quantised_from_the_trained_weights(files, tmp_path, streaming):
    from test_block_swap_training import run_full_training

    models, paths, toml = files
    setup = ({**models, "flux": paths["fp32"]}, toml)
    extra = ["--mem_eff_save"] if streaming else []
    _, trained = run_full_training(setup, tmp_path / "float", *extra)
    _, saved = run_full_training(setup, tmp_path / "scaled", "--fp8_scaled", "channel", "--save_precision", "bf16",
                                 *extra)
    info = analyze_checkpoint(tmp_path / "scaled" / "m.safetensors")
    assert info.fp8_scaled and saved[fp8_scaled.MARKER].numel() == 2
    for key, t in trained.items():
        if key in info.scales:
            q, s = fp8_scaled.quantize_weight(t, "channel")
            assert torch.equal(saved[key].view(torch.uint8), q.view(torch.uint8))
            assert torch.equal(saved[fp8_scaled.scale_key(key)], s)
        else:
            assert torch.equal(saved[key], t.to(torch.bfloat16)), key


def test_lora_merged_into_loaded_scaled_weights_requantises(files, fp8_scaled_lora):
    from library.lora.loading import apply_loras

    _, paths, _ = files
    model = prepare_fp8(load_transformer(paths["channel"]), compute_dtype=torch.float32)
    before = model.single_blocks[0].linear1.dequantized_weight().clone()
    apply_loras([str(fp8_scaled_lora)], model, None, None, True, "cpu")
    after = model.single_blocks[0].linear1.dequantized_weight()
    assert not torch.equal(before, after) and after.isfinite().all()


def test_a_scaled_t5_as_comfyui_ships_it_loads_and_encodes_as_its_dequantised_weights(files, tmp_path):
    from library.formats.safetensors_io import read_header
    from library.memory.fp8 import prepare_t5xxl_fp8
    from library.models.text_encoders import load_t5xxl

    models, _, _ = files
    t5 = load_t5xxl(models["t5xxl"], torch.float32)
    linear = {n + ".weight" for n, m in t5.named_modules() if isinstance(m, torch.nn.Linear)}
    sd = {k: v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    raw = fp8_scaled.quantize_state_dict_fp8_scaled(sd, "tensor", other_dtype=torch.bfloat16, linear_keys=linear)
    raw.update({fp8_scaled.scale_key(k)[: -len("weight")] + "input": torch.ones(()) for k in linear})
    save_file_atomic(raw, tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors", read_header(models["t5xxl"]).metadata)
    dequantised = load_t5xxl(tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors", torch.bfloat16)
    for k in linear:
        assert torch.equal(dequantised.state_dict()[k], comfyui_dequantized(raw[k], raw[fp8_scaled.scale_key(k)],
                                                                           torch.bfloat16)), k
    stored = prepare_t5xxl_fp8(load_t5xxl(tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors"))
    q = stored.encoder.block[0].layer[0].SelfAttention.q
    assert stored.shared.weight.dtype == torch.bfloat16 and q.weight.dtype == torch.float8_e4m3fn and q.scale.numel()
    ids = torch.randint(0, t5.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(stored(ids).last_hidden_state, dequantised(ids).last_hidden_state)


def test_a_scale_that_does_not_fit_its_weight_is_refused(files, tmp_path):
    _, paths, _ = files
    raw = load_file(str(paths["tensor"]))
    raw["img_in.scale_weight"] = torch.ones(3)
    save_file_atomic(raw, tmp_path / "bad.safetensors")
    with pytest.raises(ModelFileError, match=r"bad.safetensors: img_in.scale_weight: scale of shape \(3,\)"):
        analyze_checkpoint(tmp_path / "bad.safetensors")


def test_block_wise_scales_as_musubi_shapes_them_dequantise_per_block():
    w = torch.randn(32, 64)
    blocks = w.view(32, 4, 16)
    scale = blocks.abs().amax(dim=2, keepdim=True) / 448  # (out, blocks, 1)
    q = (blocks / scale).to(torch.float8_e4m3fn).view(32, 64)
    fp8_scaled.check_scale_shape("x.scale_weight", tuple(scale.shape), (32, 64))
    ref = (q.view(32, 4, 16).float() * scale).view(32, 64)
    assert torch.equal(fp8_scaled.dequantize(q, scale, torch.float32), ref)


@pytest.fixture(scope="module")
def real_width_block():
    """A FLUX.1-width single block's bf16 weights, inputs and bf16 output (built once for both modes)."""
    torch.manual_seed(0)
    block = SingleStreamBlock(3072, 24, 12288).to(torch.bfloat16).requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    ids = torch.zeros(1, 16, 3)
    ids[0, :, 2] = torch.arange(16)
    inputs = (torch.randn(1, 16, 3072, generator=g).to(torch.bfloat16),
              torch.randn(1, 3072, generator=g).to(torch.bfloat16), position_embedding(ids, (16, 56, 56), 10_000))
    return block.state_dict(), inputs, block(*inputs)


@pytest.mark.parametrize("mode", fp8_scaled.MODES)
def test_one_real_width_block_on_cpu(real_width_block, mode):
    weights, inputs, reference = real_width_block
    sd = fp8_scaled.quantize_state_dict_fp8_scaled(weights, mode)
    with torch.device("meta"):
        block = SingleStreamBlock(3072, 24, 12288)
    block.load_state_dict({k: v for k, v in sd.items() if not fp8_scaled.is_scale_key(k)}, assign=True)
    names = ("linear1", "linear2", "modulation.lin")
    for name in names:  # as load_transformer attaches a file's scales
        block.get_submodule(name).register_buffer("scale_weight", sd[name + ".scale_weight"], persistent=False)
    prepare_fp8(block.requires_grad_(False), compute_dtype=torch.bfloat16)
    for name in names:
        lin = block.get_submodule(name)
        assert torch.equal(lin.weight.view(torch.uint8), sd[name + ".weight"].view(torch.uint8))
        assert torch.equal(lin.dequantized_weight(), comfyui_dequantized(sd[name + ".weight"],
                                                                         sd[name + ".scale_weight"], torch.bfloat16))
    out = block(*inputs)
    err = float((out.float() - reference.float()).norm() / reference.float().norm())
    assert err < 0.05, f"{mode}: output rel-L2 {err:.4f} against bf16"


def _emulated_scaled_mm(a, b, *, scale_a, scale_b, out_dtype, bias=None):
    """torch._scaled_mm's contract on the CPU: fp8 row-major mat1 (sides multiples of 16), column-major mat2, fp32
    scales per tensor (0-dim) or per row of mat1 / column of mat2."""
    assert a.dtype == b.dtype == torch.float8_e4m3fn and a.is_contiguous() and b.stride(0) == 1
    assert a.shape[0] % 16 == 0 and a.shape[1] % 16 == 0 and b.shape[1] % 16 == 0
    assert scale_a.dtype == scale_b.dtype == torch.float32 and bias is None
    rowwise = scale_a.shape == (a.shape[0], 1) and scale_b.shape == (1, b.shape[1])
    assert scale_a.dim() == scale_b.dim() == 0 or rowwise
    return ((a.float() * scale_a) @ (b.float() * scale_b)).to(out_dtype)


@pytest.mark.parametrize("mode", [None, *fp8_scaled.MODES])
def test_scaled_mm_path_logic_with_an_emulated_kernel(monkeypatch, caplog, mode):
    """The fp8 compute path's shapes, padding, scales and bias, run on the CPU against an emulation of the kernel
    (the real one is checked by the gpu test below)."""
    from library.memory import fp8_matmul

    monkeypatch.setattr(fp8_matmul, "scaled_mm_reason", lambda device: None)
    monkeypatch.setattr(fp8_matmul, "_logged", set())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch, "_scaled_mm", _emulated_scaled_mm, raising=False)
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32).to(torch.bfloat16).requires_grad_(False)
    (prepare_fp8_scaled(lin, mode, fp8_matmul=True) if mode else prepare_fp8(lin, fp8_matmul=True))
    x = torch.randn(2, 5, 64).to(torch.bfloat16).requires_grad_()  # 10 rows: padded to 16
    with caplog.at_level("INFO", logger="library.memory.fp8_matmul"):
        fast = lin(x)
    assert "torch._scaled_mm" in caplog.text and fast.shape == (2, 5, 32) and fast._base is None
    fast.add_(0)  # the LoRA adds into the output in place
    fast.sum().backward()
    lin.fp8_matmul = False
    upcast = lin(x.detach())
    err = float((fast.detach().float() - upcast.float()).norm() / upcast.float().norm())
    assert err < 0.08, err
    assert torch.equal(x.grad, torch.ones(2, 5, 32, dtype=torch.bfloat16) @ lin.dequantized_weight())


@pytest.mark.gpu
@pytest.mark.parametrize("mode", fp8_scaled.MODES)
def test_scaled_mm_path_matches_the_upcast_path_on_gpu(mode, caplog):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("torch._scaled_mm needs compute capability 8.9+")
    if mode == "channel" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("row-wise scaling needs compute capability 9.0+")
    torch.manual_seed(0)
    lin = torch.nn.Linear(3072, 3072 * 4).cuda().to(torch.bfloat16).requires_grad_(False)
    prepare_fp8_scaled(lin, mode, fp8_matmul=True)
    x = torch.randn(2, 64, 3072, device="cuda", dtype=torch.bfloat16)
    with caplog.at_level("INFO", logger="library.memory.fp8_matmul"):
        fast = lin(x)
    assert "torch._scaled_mm" in caplog.text
    lin.fp8_matmul = False
    upcast = lin(x)
    err = float((fast.float() - upcast.float()).norm() / upcast.float().norm())
    assert fast.shape == upcast.shape and err < 0.05, err
