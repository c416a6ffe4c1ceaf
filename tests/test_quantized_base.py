"""nf4 / int8 bases (library/memory/quantized_linear.py, quantized_base.py): bitsandbytes' own bytes and
dequantization, forward and backward against the dequantised weights, LoRA training and inference through the CLIs,
block swap, and LoRA merges refused or dequantised."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from safetensors.torch import load_file

import cli_runs
import flux_minimal_inference as inference_cli
from cli_runs import run_args, swappable_tiny_models
from library.formats.safetensors_io import save_file_atomic
from library.memory import quantized_linear
from library.memory.quantized_base import block_linears, load_quantized_transformer
from library.memory.quantized_linear import QuantizedLinear, bytes_per_parameter, quantize
from library.models.checkpoint import load_transformer
from library.models.transformer import Flux
from library.training.errors import TrainingError
from model_helpers import flux_inputs
from tools.make_tiny_models import make_tiny_models

pytestmark = pytest.mark.usefixtures("one_torch_thread")
bnb_f = pytest.importorskip("bitsandbytes.functional")
QUANT_TYPES = ("nf4", "int8")


def bnb_reference(weight: torch.Tensor, quant_type: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bitsandbytes on the whole tensor at once: (data, scale, its own dequantization)."""
    if quant_type == "nf4":
        data, state = bnb_f.quantize_4bit(weight, blocksize=64, quant_type="nf4")
        return data, state.absmax, bnb_f.dequantize_4bit(data, state)
    data, scale, _ = bnb_f.int8_vectorwise_quant(weight)
    return data, scale, bnb_f.int8_vectorwise_dequant(data, scale).to(weight.dtype)


def check_against_bnb(weight: torch.Tensor, quant_type: str) -> None:
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data = weight
    q = QuantizedLinear.from_linear(linear, quant_type, weight.dtype)
    data, scale, ref = bnb_reference(weight, quant_type)
    assert torch.equal(q.qweight, data) and torch.equal(q.qscale, scale)
    assert torch.equal(q.dequantized_weight(), ref)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bytes_and_dequantization_are_bitsandbytes_own(quant_type, dtype, monkeypatch):
    monkeypatch.setattr(quantized_linear, "_CHUNK", 1000)  # several row chunks, one not a multiple of 64 rows
    monkeypatch.setattr(quantized_linear, "_DEQUANT_CHUNK", 1000)
    check_against_bnb(torch.randn(100, 96).to(dtype), quant_type)
    if quant_type == "nf4":  # bitsandbytes' own Linear4bit weight, dequantised by bitsandbytes
        import bitsandbytes as bnb

        w = torch.randn(48, 64, dtype=dtype)
        p = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", blocksize=64,
                                 compress_statistics=False)._quantize("cpu")
        q = QuantizedLinear(64, 48, False, "nf4", dtype)
        q.qweight.data, q.qscale.data = quantize(w, "nf4")
        assert torch.equal(q.dequantized_weight(), bnb_f.dequantize_4bit(p.data, p.quant_state))


@pytest.mark.slow
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_a_real_width_single_block_matches_bitsandbytes(quant_type):
    """FLUX.1's single block at width 3072 (linear1 21504 x 3072, linear2 3072 x 15360, modulation 9216 x 3072)."""
    from library.models.transformer import SingleStreamBlock

    with torch.device("meta"):
        block = SingleStreamBlock(3072, 24, 3072 * 4)
    g = torch.Generator().manual_seed(0)
    for name, linear in block.named_modules():
        if isinstance(linear, torch.nn.Linear):
            shape = (linear.out_features, linear.in_features)
            check_against_bnb((torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16), quant_type)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_models(tmp_path_factory.mktemp("qtiny"))


def dequantised_reference(path, quantized: Flux) -> Flux:
    """The file's model in float32 with each block Linear holding `quantized`'s dequantised weight."""
    ref = load_transformer(path, torch.float32)
    for name, linear in block_linears(ref):
        linear.weight.data = quantized.get_submodule(name).dequantized_weight()
    return ref


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_quantized_forward_and_backward_equal_the_dequantised_model(tiny, quant_type):
    q = load_quantized_transformer(tiny["flux"], quant_type, torch.float32)
    kinds = {type(m) for _, m in block_linears(load_transformer(tiny["flux"], torch.float32))}
    assert kinds == {torch.nn.Linear}
    assert sum(isinstance(m, QuantizedLinear) for m in q.modules()) == 26  # every Linear of the 2 + 2 blocks
    assert q.img_in.weight.dtype == torch.float32 and q.dtype == torch.float32
    ref = dequantised_reference(tiny["flux"], q)
    inputs = flux_inputs(q)
    outs, grads = [], []
    for model in (q, ref):
        model.requires_grad_(False)
        img = inputs["img"].clone().requires_grad_(True)
        out = model(**{**inputs, "img": img})
        out.square().sum().backward()
        outs.append(out.detach()), grads.append(img.grad)
    assert torch.equal(outs[0], outs[1])  # the same F.linear on the same weights
    assert torch.equal(grads[0], grads[1])  # the backward's grad @ W is F.linear's own input gradient


def test_bytes_per_parameter():
    assert bytes_per_parameter("nf4", 3072) == 0.5 + 4 / 64
    assert bytes_per_parameter("int8", 3072) == 1 + 4 / 3072
    with pytest.raises(ValueError, match="unknown weight quantization 'nf2'"):
        quantize(torch.zeros(2, 2), "nf2")


# --- through the command lines -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swap_setup(tmp_path_factory):
    """4 double + 8 single blocks (so that --blocks_to_swap can swap some)."""
    return swappable_tiny_models(tmp_path_factory.mktemp("qswap"))


def train_argv(setup, out, *extra):
    return [*run_args(*setup, out), "--network_module", "networks.lora_flux", "--network_dim", "4",
            "--learning_rate", "1e-2", "--max_train_steps", "3", "--network_train_unet_only", "--cache_latents",
            "--cache_text_encoder_outputs", *extra]


run_trainer = partial(cli_runs.run_trainer, "network")


@pytest.mark.parametrize("quant_type, precision", [("nf4", "no"), ("int8", "no"), ("nf4", "bf16")])
def test_lora_training_on_a_quantized_base_with_and_without_block_swap(swap_setup, tmp_path, quant_type, precision):
    loras = []
    for name, extra in (("plain", ()), ("swap", ("--gradient_checkpointing", "--blocks_to_swap", "5"))):
        trainer, code = run_trainer(train_argv(swap_setup, tmp_path / name, "--base_quantization", quant_type,
                                               "--mixed_precision", precision, *extra))
        assert code == 0
        assert trainer.settings.quantized_base == quant_type
        qkv = trainer.models.flux.double_blocks[0].img_attn.qkv
        assert isinstance(qkv, QuantizedLinear) and qkv.quant_type == quant_type
        loras.append(load_file(str(tmp_path / name / "last.safetensors")))
    plain, swapped = loras
    assert plain and all(torch.equal(plain[k], swapped[k]) for k in plain), "block swap changed the trained LoRA"
    ups = [v for k, v in plain.items() if k.endswith("lora_up.weight")]
    assert any(u.abs().sum() > 0 for u in ups)  # it trained


def test_quantization_options_are_checked(swap_setup, tmp_path):
    trainer, code = run_trainer(train_argv(swap_setup, tmp_path / "scaled", "--base_quantization", "fp8_scaled",
                                           "--mixed_precision", "bf16", "--max_train_steps", "1"))
    qkv = trainer.models.flux.double_blocks[0].img_attn.qkv  # fp8 with a float32 scale of its own
    assert code == 0 and qkv.weight.dtype == torch.float8_e4m3fn and qkv.scale_weight.dtype == torch.float32
    with pytest.raises(Exception, match="--base_quantization nf4 and --fp8_base / --fp8_base_unet exclude"):
        run_trainer(train_argv(swap_setup, tmp_path, "--base_quantization", "nf4", "--fp8_base"))
    trainer, code = run_trainer(train_argv(swap_setup, tmp_path / "fp8", "--base_quantization", "fp8",
                                           "--mixed_precision", "bf16", "--max_train_steps", "1"))
    assert code == 0 and trainer.settings.fp8_base and trainer.settings.quantized_base is None


def inference_argv(setup, out, *extra):
    models, _ = setup
    return ["--ckpt_path", str(models["flux"]), "--clip_l", str(models["clip_l"]), "--t5xxl", str(models["t5xxl"]),
            "--ae", str(models["ae"]), "--tokenizer_cache_dir", str(models["tokenizers"]), "--dtype", "fp32",
            "--width", "32", "--height", "32", "--steps", "2", "--seed", "5", "--device", "cpu", "--output_latents",
            "--t5xxl_max_token_length", "16", "--output_dir", str(out), *extra]


def latents(out):
    return load_file(str(next(out.glob("*_latents.safetensors"))))["latents"]


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_inference_renders_and_block_swap_changes_nothing(swap_setup, tmp_path, quant_type):
    for name, extra in (("plain", ()), ("swap", ("--blocks_to_swap", "5"))):
        assert inference_cli.main(inference_argv(swap_setup, tmp_path / name, "--base_quantization", quant_type,
                                                 *extra)) == 0
        assert next((tmp_path / name).glob("*.png")).stat().st_size > 0
    assert torch.equal(latents(tmp_path / "plain"), latents(tmp_path / "swap"))
    # scaled fp8 at load (a scale per tensor): renders too
    assert inference_cli.main(inference_argv(swap_setup, tmp_path / "scaled", "--base_quantization", "fp8_scaled")) == 0
    assert next((tmp_path / "scaled").glob("*.png")).stat().st_size > 0


@pytest.fixture(scope="module")
def trained_lora(swap_setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("qlora")
    _, code = run_trainer(train_argv(swap_setup, out, "--max_train_steps", "2"))
    assert code == 0
    return out / "last.safetensors"


def test_merging_a_lora_into_a_quantized_base_is_refused_or_dequantised(swap_setup, trained_lora, tmp_path, capsys):
    merge = ("--base_quantization", "nf4", "--lora_weights", str(trained_lora), "--merge_lora_weights")
    assert inference_cli.main(inference_argv(swap_setup, tmp_path / "refused", *merge)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "the base is stored in nf4" in err and "--dequantize_merged_layers" in err
    assert inference_cli.main(inference_argv(swap_setup, tmp_path / "merged", *merge,
                                             "--dequantize_merged_layers")) == 0
    hooked = ("--base_quantization", "nf4", "--lora_weights", str(trained_lora))
    assert inference_cli.main(inference_argv(swap_setup, tmp_path / "hooked", *hooked)) == 0
    a, b = latents(tmp_path / "merged"), latents(tmp_path / "hooked")
    assert torch.allclose(a, b, rtol=0, atol=1e-4)  # merged into the dequantised weight = hooked on the nf4 one

    with pytest.raises(TrainingError, match=r"--base_weights .*: the base is stored in int8.*--dequantize_merged"):
        run_trainer(train_argv(swap_setup, tmp_path / "t", "--base_quantization", "int8", "--base_weights",
                               str(trained_lora)))
    trainer, code = run_trainer(train_argv(swap_setup, tmp_path / "t2", "--base_quantization", "int8",
                                           "--base_weights", str(trained_lora), "--dequantize_merged_layers",
                                           "--max_train_steps", "1"))
    assert code == 0 and type(trainer.models.flux.double_blocks[0].img_attn.qkv) is torch.nn.Linear


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_a_diffusers_file_quantizes_part_by_part_to_the_same_bytes(tiny, tmp_path, quant_type):
    """The diffusers layout stores q, k, v (and the single blocks' MLP input) apart and the final modulation's halves
    swapped: quantised part by part they give the bytes of the fused BFL weight."""
    from library.formats.diffusers_keys import bfl_to_diffusers

    sd = load_file(str(tiny["flux"]))
    folder = tmp_path / "diffusers" / "transformer"
    save_file_atomic(bfl_to_diffusers(sd, sd["img_in.weight"].shape[0]), folder / "diffusion_pytorch_model.safetensors")
    bfl = load_quantized_transformer(tiny["flux"], quant_type, torch.float32).state_dict()
    diffusers = load_quantized_transformer(tmp_path / "diffusers", quant_type, torch.float32).state_dict()
    assert bfl.keys() == diffusers.keys() and all(torch.equal(bfl[k], diffusers[k]) for k in bfl)


def test_quantized_load_of_params_the_file_does_not_match_names_the_file(tiny, tmp_path):
    wrong = tmp_path / "wrong.safetensors"
    sd = load_file(str(tiny["flux"]))
    sd["double_blocks.0.img_attn.qkv.weight"] = sd["double_blocks.0.img_attn.qkv.weight"][:, :32].contiguous()
    save_file_atomic(sd, wrong)
    with pytest.raises(Exception, match=r"wrong.safetensors"):
        load_quantized_transformer(wrong, "nf4", torch.float32)


@pytest.mark.slow
def test_a_lora_trained_on_an_nf4_base_lands_closer_to_its_training_latents(tmp_path):
    """tests/test_lora_learning.py's run (trained-like tiny models, two images) with the base stored in nf4 for
    training and for sampling both the base and the LoRA image."""
    from test_lora_learning import MIN_RATIO, train_and_measure

    results = train_and_measure(tmp_path, extra=("--base_quantization", "nf4"))
    for stem, r in results.items():
        print(f"{stem}: nf4 base {r['mse_base']:.4f}, LoRA {r['mse_lora']:.4f} ({r['mse_base'] / r['mse_lora']:.1f}x)")
    for stem, r in results.items():
        assert r["mse_base"] / r["mse_lora"] >= MIN_RATIO, (stem, r)
        assert r["mse_lora"] < r["mse_lora_other"], (stem, r)
