"""DoRA in our own LoRA network (`--network_args dora_wd=True`): its forward is DoRA's formula on bf16 and fp8 bases
and lycoris' own DoRA forward; trained through the CLI on an fp8 base, its file read back by our inference (as a
LyCORIS file) and merged gives what the network in memory gives."""

import copy
from functools import partial

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import cli_runs
from cli_runs import run_args
from model_helpers import flux_inputs, run
from networks import lora_flux
from networks.lora_modules import LoRAModule
from tools.make_demo_dataset import make_demo_dataset
from tools.make_tiny_models import make_tiny_models

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def randomise(network_or_module, seed=0):
    """Every LoRA factor random and dora_scale off its initial norms, so each part of the formula matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in network_or_module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(p * (1 + 0.1 * noise) if name.endswith("dora_scale") else 0.2 * noise)


def expected(linear_weight, bias, module, x, multiplier):
    """y = (W + k (W' - W)) x + b in float64, W' = m (W + s up down) / ||W + s up down||_row."""
    w = linear_weight.double()
    delta = module.scale * (module.lora_up.weight.double() @ module.lora_down.weight.double())
    merged = w + delta
    full = merged * (module.dora_scale.double() / (merged.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps))
    return x.double() @ (w + multiplier * (full - w)).T + bias.double()


@pytest.mark.parametrize("base", ["bf16", "fp8", "fp8_scaled", "nf4"])
@pytest.mark.parametrize("multiplier", [1.0, 0.6])
def test_dora_forward_is_the_formula_on_bf16_fp8_and_nf4_bases(base, multiplier):
    from library.memory.fp8 import Fp8Linear, prepare_fp8

    torch.manual_seed(0)
    linear = nn.Linear(64, 24)
    holder = nn.Sequential(linear).to(torch.bfloat16)
    if base.startswith("fp8"):
        prepare_fp8(holder, scaled="channel" if base == "fp8_scaled" else None)
        assert isinstance(holder[0], Fp8Linear) and (holder[0].scale is not None) == (base == "fp8_scaled")
    elif base == "nf4":
        pytest.importorskip("bitsandbytes.functional")
        from library.memory.quantized_linear import QuantizedLinear

        holder[0] = QuantizedLinear.from_linear(holder[0], "nf4", torch.bfloat16)
    linear = holder[0]
    w = linear.weight.float() if base == "bf16" else linear.dequantized_weight(torch.float32)
    module = LoRAModule("lora_unet_x", linear, multiplier, lora_dim=4, alpha=2.0, dora=True)
    assert module.dora_scale.shape == (24, 1) and module.dora_scale.dtype == torch.float32
    torch.testing.assert_close(module.dora_scale, w.norm(dim=1, keepdim=True))  # initialised to ||W||_row
    randomise(module)
    module.apply_to()
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    got = linear(x)
    assert got.dtype == torch.bfloat16
    want = expected(w, linear.bias.float(), module, x, multiplier)
    assert (want - x.double() @ w.double().T).abs().max() > 0.1  # DoRA changes the output
    # bf16 rounding of the base layer's own output and of the result
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)


def test_dora_with_split_qkv_is_refused_in_one_line(setup, tmp_path, capsys):
    import flux_train_network as cli

    assert cli.main([*run_args(*setup, tmp_path), "--network_module", "networks.lora_flux", "--max_train_steps", "1",
                     "--network_args", "dora_wd=True", "split_qkv=True"]) == 2
    assert "dora_wd=True cannot be combined with split_qkv" in capsys.readouterr().err


def test_dora_equals_lycoris_dora_and_merges_exactly(models, tmp_path):
    """On a base of bf16-representable weights (computed in fp32): lycoris' locon+DoRA network and ours loaded from
    lycoris' file give the same transformer output; our saved file has lycoris' keys and shapes; merging ours (own
    weights, or the file through our inference's merge) gives the hooked output."""
    lycoris_kohya = pytest.importorskip("lycoris.kohya")
    from library.lora.loading import apply_loras

    flux = models[0]
    with torch.no_grad():
        for p in flux.parameters():
            p.copy_(p.bfloat16().float())
    pristine = copy.deepcopy(flux)
    inputs = flux_inputs(flux)
    base = run(flux, inputs)

    lyco_flux = copy.deepcopy(pristine)
    lyco = lycoris_kohya.create_network(1.0, 2, 3.0, None, None, lyco_flux, algo="locon", dora_wd="True")
    lyco.apply_to(None, lyco_flux, apply_text_encoder=False, apply_unet=True)
    randomise(lyco)
    lyco_path = tmp_path / "lyco.safetensors"
    lyco.save_weights(str(lyco_path), torch.float32, {})
    reference = run(lyco_flux, inputs)

    ours_flux = copy.deepcopy(pristine)
    ours = lora_flux.create_network(1.0, 2, 3.0, None, None, ours_flux, dora_wd="True")
    ours.apply_to(None, ours_flux, False, True)
    info = ours.load_weights(lyco_path)
    assert not info.missing_keys and not info.unexpected_keys
    hooked = run(ours_flux, inputs)
    assert (reference - base).abs().max() > 1e-2
    torch.testing.assert_close(hooked, reference, rtol=1e-5, atol=1e-5)

    # the same gradients too: the norm is differentiated through, as lycoris does (not detached)
    for f in (lyco_flux, ours_flux):
        f(**inputs).square().mean().backward()
    theirs_by_name = {m.lora_name: m for m in lyco.unet_loras}
    for mine in ours.unet_loras:
        other = theirs_by_name[mine.lora_name]
        for leaf in ("lora_up.weight", "lora_down.weight", "dora_scale"):
            got, want = mine.get_parameter(leaf).grad, other.get_parameter(leaf).grad
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=f"{mine.lora_name}.{leaf}")

    path = tmp_path / "ours.safetensors"
    ours.save_weights(str(path), torch.float32, {})
    saved, theirs = load_file(str(path)), load_file(str(lyco_path))
    assert saved.keys() == theirs.keys()
    assert all(saved[k].shape == theirs[k].shape for k in saved)

    # a network shaped by the file (--dim_from_weights, inference) is DoRA and loads it whole
    shaped_flux = copy.deepcopy(pristine)
    shaped, sd = lora_flux.create_network_from_weights(1.0, path, None, None, shaped_flux, for_inference=True)
    shaped.apply_to(None, shaped_flux, False, True)
    assert shaped.load_state_dict(sd, strict=True)
    torch.testing.assert_close(run(shaped_flux, inputs), hooked, rtol=1e-5, atol=1e-5)

    ours.set_multiplier(0.6)  # at another strength the hooked file (ComfyUI's k (W' - W)) still agrees
    file_flux = copy.deepcopy(pristine)
    apply_loras([f"{path};0.6"], file_flux, None, None, merge=False, device="cpu")
    torch.testing.assert_close(run(file_flux, inputs), run(ours_flux, inputs), rtol=1e-5, atol=1e-5)
    ours.set_multiplier(1.0)

    ours.restore()
    ours.merge_to(None, ours_flux, None)  # the network's own weights
    file_sd = lora_flux.create_network(1.0, 2, 3.0, None, None, sd_flux := copy.deepcopy(pristine), dora_wd="True")
    file_sd.merge_to(None, sd_flux, load_file(str(path)))  # the file's tensors through sd-scripts' merge API
    file_flux = copy.deepcopy(pristine)
    assert apply_loras([str(path)], file_flux, None, None, merge=True, device="cpu") == []  # our inference
    for merged_flux in (ours_flux, sd_flux, file_flux):
        torch.testing.assert_close(run(merged_flux, inputs), hooked, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("dora")
    return make_tiny_models(base / "models"), make_demo_dataset(base / "data", count=2, size=32)


def test_cli_trains_dora_on_an_fp8_base_and_the_file_renders_the_same(setup, tmp_path):
    """flux_train_network.py --network_args dora_wd=True --fp8_base --mixed_precision bf16: dora_scale and the LoRA
    weights change, and the saved file hooked by our inference (library/lora/loading.py, which reads it as a LyCORIS
    file) gives the transformer output of the trained network applied in memory."""
    from library import flux_utils
    from library.lora.loading import apply_loras

    models, toml = setup
    out = tmp_path / "out"
    trainer, code = partial(cli_runs.run_trainer, "network")([
        *run_args(models, toml, out), "--network_module", "networks.lora_flux", "--network_dim", "4",
        "--network_alpha", "2", "--learning_rate", "1e-2", "--max_train_steps", "3", "--optimizer_type", "AdamW",
        "--network_train_unet_only", "--cache_latents", "--cache_text_encoder_outputs", "--fp8_base",
        "--mixed_precision", "bf16", "--save_precision", "float", "--output_name", "dora",
        "--network_args", "dora_wd=True"])
    assert code == 0
    trained = {k: v.detach().float().clone() for k, v in trainer.network.state_dict().items()}
    saved = load_file(str(out / "dora.safetensors"))
    assert saved.keys() == trained.keys()
    scales = [k for k in saved if k.endswith(".dora_scale")]
    assert len(scales) == len(trainer.network.unet_loras) > 0

    def fresh():
        return flux_utils.load_flow_model(models["flux"], torch.float32, "cpu")[1].eval()

    flux = fresh()
    initial = {f"{lora.lora_name}.{leaf}": t for lora in
               lora_flux.create_network(1.0, 4, 2.0, None, None, flux, dora_wd="True").unet_loras
               for leaf, t in lora.state_dict().items()}
    assert all(not torch.allclose(saved[k], initial[k]) for k in scales)  # every magnitude trained
    assert any(saved[k].abs().max() > 0 for k in saved if k.endswith("lora_up.weight"))
    assert not torch.equal(saved[next(k for k in saved if k.endswith("lora_down.weight"))],
                           initial[next(k for k in saved if k.endswith("lora_down.weight"))])

    inputs = flux_inputs(flux)
    base = run(flux, inputs)
    network = lora_flux.create_network(1.0, 4, 2.0, None, None, flux, dora_wd="True")
    network.apply_to(None, flux, False, True)
    network.load_state_dict(trained)
    in_memory = run(flux, inputs)
    file_flux = fresh()
    hooked = apply_loras([str(out / "dora.safetensors")], file_flux, None, None, merge=False, device="cpu")
    assert type(hooked[0]).__name__ == "LycorisFileNetwork"
    from_file = run(file_flux, inputs)
    assert (in_memory - base).abs().max() > 1e-3
    torch.testing.assert_close(from_file, in_memory, rtol=1e-4, atol=1e-4)

    # and flux_minimal_inference.py renders with it, hooked and merged alike
    from cli_runs import rendered_latents

    def latents(name, *extra):
        return rendered_latents(models, tmp_path / name, "--lora_weights", str(out / "dora.safetensors"), *extra)

    torch.testing.assert_close(latents("merged", "--merge_lora_weights"), latents("hooked"), rtol=1e-5, atol=1e-5)
