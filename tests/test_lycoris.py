"""LyCORIS adapters: `--network_module lycoris.kohya` through flux_train_network.py, and LoKr/LoHa/LoCon files in our
inference, merge tool and converters (their updates by the formulas ComfyUI's loader uses)."""

import json
from functools import partial

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import cli_runs
from cli_runs import rendered_latents, run_args
from tools.make_demo_dataset import make_demo_dataset
from tools.make_tiny_models import make_tiny_models

lycoris_kohya = pytest.importorskip("lycoris.kohya")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

run_trainer = partial(cli_runs.run_trainer, "network")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("lycoris")
    models = make_tiny_models(base / "models")
    toml = make_demo_dataset(base / "data", count=2, size=32)
    return models, toml


def lycoris_args(setup, out, algo="lokr", *extra, net_args=("factor=4",)):
    return [*run_args(*setup, out), "--network_module", "lycoris.kohya", "--network_dim", "4",
            "--network_alpha", "2", "--learning_rate", "1e-2", "--max_train_steps", "4", "--optimizer_type", "AdamW",
            "--max_grad_norm", "0", "--network_train_unet_only", "--cache_latents", "--cache_text_encoder_outputs",
            *extra, "--network_args", f"algo={algo}", *net_args]


@pytest.mark.parametrize("algo,net_args,key", [("lokr", {"factor": "4"}, "lokr_w1"),
                                              ("loha", {"dora_wd": "True"}, "dora_scale")], ids=["lokr", "loha_dora"])
def test_cli_lokr_equals_a_plain_loop_with_the_same_lycoris_modules(setup, tmp_path, monkeypatch, algo, net_args,
                                                                    key):
    """The CLI's LoKr (and LoHa with DoRA) after 4 AdamW steps equals lycoris' own modules trained by a hand-written
    loop (flux forward, MSE to noise - latents, AdamW) on the batches, noise and sigmas the CLI drew, bit for bit:
    the trainer adds nothing."""
    from library.flux_utils import load_flow_model
    from library.models.packing import pack_latents, prepare_img_ids, unpack_latents
    from library.training import loss as loss_module
    from library.training.recipes.lora import LoRATrainer

    steps, texts, initial = [], [], {}
    original_noisy, original_text = loss_module.noisy_input, loss_module.FluxLossComputer.text
    monkeypatch.setattr(loss_module, "noisy_input", lambda latents, noise, sigmas, *a: (
        steps.append({"latents": latents.clone(), "noise": noise.clone(), "sigmas": sigmas.clone()})
        or original_noisy(latents, noise, sigmas, *a)))
    monkeypatch.setattr(loss_module.FluxLossComputer, "text", lambda self, batch: (
        lambda text: texts.append(text) or text)(original_text(self, batch)))
    original_build = LoRATrainer.build_trainable

    def build_and_keep_initial(self, models):
        trainable = original_build(self, models)
        initial.update({k: v.detach().clone() for k, v in self.network.state_dict().items()})
        return trainable

    monkeypatch.setattr(LoRATrainer, "build_trainable", build_and_keep_initial)
    _, code = run_trainer(lycoris_args(setup, tmp_path, algo, net_args=[f"{k}={v}" for k, v in net_args.items()]))
    assert code == 0 and len(steps) == 4
    cli_weights = load_file(str(tmp_path / "last.safetensors"))
    assert f"lora_unet_double_blocks_0_img_attn_qkv.{key}" in cli_weights
    with safe_open(str(tmp_path / "last.safetensors"), "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_network_module"] == "lycoris.kohya" and "sshs_model_hash" in metadata
    assert json.loads(metadata["ss_network_args"])["algo"] == algo

    _, flux = load_flow_model(setup[0]["flux"], torch.float32, "cpu")
    flux.requires_grad_(False)
    network = lycoris_kohya.create_network(1.0, 4, 2.0, None, None, flux, algo=algo, **net_args)
    network.apply_to(None, flux, apply_text_encoder=False, apply_unet=True)
    network.load_state_dict(initial)
    params, _ = network.prepare_optimizer_params(None, None, 1e-2)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for s, text in zip(steps, texts, strict=True):
        x0, noise, sigma = s["latents"], s["noise"], s["sigmas"]
        b, _, h, w = x0.shape
        t = sigma.view(-1, 1, 1, 1)
        pred = flux(img=pack_latents((1 - t) * x0 + t * noise), img_ids=prepare_img_ids(b, h // 2, w // 2),
                    txt=text.t5_out, txt_ids=text.txt_ids, timesteps=sigma, y=text.l_pooled,
                    guidance=torch.full((b,), 3.5))  # --guidance_scale default
        loss = torch.nn.functional.mse_loss(unpack_latents(pred, h // 2, w // 2), noise - x0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    plain = {k: v.detach() for k, v in network.state_dict().items()}
    assert plain.keys() == cli_weights.keys()
    assert all(torch.equal(plain[k], cli_weights[k]) for k in plain), "the trainer changed what lycoris trains"
    moved = max(float((plain[k] - initial[k]).abs().max()) for k in plain)
    assert moved > 1e-3  # the comparison is of trained weights, not of two untouched initialisations


# ---------------------------------------------------------------------------------------------------------------
# Files: the updates by ComfyUI's formulas, in our inference and merge tool

# (algo, --network_dim, network_args): LoKr with w2 factored (alpha / r applies), with both halves whole (scale 1),
# with both factored; LoHa; LoCon; each algo again with DoRA
ALGOS = [("lokr", 2, {"factor": "4"}), ("lokr", 4, {"factor": "4"}),
         ("lokr", 1, {"factor": "4", "decompose_both": "True"}), ("loha", 2, {}), ("locon", 2, {}),
         ("lokr", 2, {"factor": "4", "dora_wd": "True"}), ("loha", 2, {"dora_wd": "True"}),
         ("locon", 2, {"dora_wd": "True"})]


def load_flux(path):
    from library import flux_utils

    return flux_utils.load_flow_model(path, torch.float32, "cpu")[1].eval()


def random_lycoris(flux, algo, dim, args, seed=0):
    """lycoris' own network over `flux` (transformer only), every factor random so each update is non-zero."""
    network = lycoris_kohya.create_network(1.0, dim, 3.0, None, None, flux, algo=algo, **args)
    network.apply_to(None, flux, apply_text_encoder=False, apply_unet=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in network.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(p * (1 + 0.1 * noise) if name.endswith("dora_scale") else 0.2 * noise)
    return network


@pytest.mark.parametrize("algo,dim,args", ALGOS, ids=lambda v: str(v))
def test_file_updates_by_comfyui_formulas_equal_what_lycoris_applies(models, tmp_path, algo, dim, args):
    """Each module's update read from the saved file (library/formats/lycoris_weights.py: ComfyUI's formulas) equals
    what lycoris' module adds in its forward (at multiplier 1, where DoRA's multiplier conventions agree); at
    multiplier 0.7 it is 0.7 times that."""
    from library.formats.lycoris_weights import read_lycoris

    flux = models[0]
    network = random_lycoris(flux, algo, dim, args)
    path = tmp_path / "lyco.safetensors"
    network.save_weights(str(path), torch.float32, {})
    modules = read_lycoris(load_file(str(path)))
    assert len(modules) == len(network.unet_loras) == 26
    kinds = {m.algo for m in modules.values()}
    assert kinds == {"lora" if algo == "locon" else algo}
    worst = 0.0
    with torch.no_grad():
        for lyco in network.unet_loras:
            linear = lyco.org_module[0]
            eye = torch.eye(linear.in_features)
            applied = (lyco(eye) - lyco.org_forward(eye)).T  # the weight change lycoris' forward makes
            w = linear.weight
            ours, ours_07 = (modules[lyco.lora_name].updated(w, k) - w for k in (1.0, 0.7))
            assert applied.abs().max() > 1e-3
            for got, want in ((ours, applied), (ours_07, 0.7 * applied)):
                worst = max(worst, float((got - want).abs().max() / applied.abs().max()))
    assert worst < 1e-5, worst


def hooked_and_merged_outputs(flux_path, lora_path, inputs, multiplier):
    from library.lora.loading import apply_loras
    from model_helpers import run

    flux = load_flux(flux_path)
    networks = apply_loras([f"{lora_path};{multiplier}"], flux, None, None, merge=False, device="cpu")
    hooked = run(flux, inputs)
    networks[0].set_multiplier(0.0)
    off = run(flux, inputs)
    flux = load_flux(flux_path)
    assert apply_loras([f"{lora_path};{multiplier}"], flux, None, None, merge=True, device="cpu") == []
    return hooked, off, run(flux, inputs)


@pytest.mark.parametrize("algo,dim,args", [ALGOS[0], ALGOS[3], ALGOS[4], ALGOS[5]], ids=lambda v: str(v))
def test_lycoris_file_in_our_inference_and_merge_tool(tiny_paths, tmp_path, algo, dim, args):
    """A LoKr / LoHa / LoCon / LoKr+DoRA file in --lora_weights (hooked and merged) and in flux_merge_lora.py gives the
    output of lycoris' own modules at the same multiplier (1 for DoRA, whose lycoris multiplier differs), not the
    base model's; hooked at multiplier 0 it is the base model."""
    from model_helpers import flux_inputs, run
    from networks import flux_merge_lora

    flux = load_flux(tiny_paths["flux"])
    inputs = flux_inputs(flux)
    base = run(flux, inputs)
    network = random_lycoris(flux, algo, dim, args)
    path = tmp_path / "lyco.safetensors"
    network.save_weights(str(path), torch.float32, {})
    multiplier = 1.0 if "dora_wd" in args else 0.8
    network.set_multiplier(multiplier)
    reference = run(flux, inputs)
    hooked, off, merged = hooked_and_merged_outputs(tiny_paths["flux"], path, inputs, multiplier)
    out = tmp_path / "merged.safetensors"
    assert flux_merge_lora.main(["--flux_model", str(tiny_paths["flux"]), "--save_to", str(out), "--models",
                                 str(path), "--ratios", str(multiplier)]) == 0
    tool = run(load_flux(out), inputs)
    assert (reference - base).abs().max() > 1e-2
    for name, got in (("hooked", hooked), ("merged", merged), ("merge tool", tool)):
        assert float((got - reference).abs().max()) < 1e-5, name
    assert torch.allclose(off, base, atol=1e-6)  # multiplier 0 switches the hooked file off


# ---------------------------------------------------------------------------------------------------------------
# Memory options


@pytest.fixture(scope="module")
def twelve_blocks(setup, tmp_path_factory):
    """The tiny transformer with 4 double and 8 single blocks: the 2 + 2 preset cannot swap any block."""
    from dataclasses import replace

    from library.formats.safetensors_io import save_file_atomic
    from library.models.checkpoint import analyze_checkpoint
    from library.models.transformer import Flux

    models, toml = setup
    params = replace(analyze_checkpoint(models["flux"]).params, depth=4, depth_single_blocks=8)
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("swap") / "flux_12_blocks.safetensors"
    save_file_atomic(Flux(params).state_dict(), path, {"tiny": "true"})
    return {**models, "flux": path}, toml


@pytest.mark.parametrize("fp8", [False, True], ids=["fp32", "fp8_base"])
def test_block_swap_trains_the_same_lokr(twelve_blocks, tmp_path, fp8):
    """--blocks_to_swap 5 (with gradient checkpointing; and with --fp8_base, which needs lycoris' bypass_mode: its
    branch computed beside the fp8 base layer) trains the LoKr bit for bit as without swapping."""
    extra = ["--gradient_checkpointing", *(["--fp8_base", "--mixed_precision", "bf16"] if fp8 else [])]
    net_args = ("factor=4", *(["bypass_mode=True"] if fp8 else []))
    weights = []
    for swap in ([], ["--blocks_to_swap", "5"]):
        out = tmp_path / ("swap" if swap else "ref")
        trainer, code = run_trainer(lycoris_args(twelve_blocks, out, "lokr", *extra, *swap, net_args=net_args))
        assert code == 0
        weights.append(load_file(str(out / "last.safetensors")))
        if fp8:
            assert trainer.models.flux.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
        if swap:
            assert [s.schedule.num_swapped for s in trainer.block_swappers] == [2, 6]
    ref, got = weights
    assert ref.keys() == got.keys() and sum(k.endswith(".alpha") for k in ref) == 4 * 10 + 8 * 3
    assert all(torch.equal(ref[k], got[k]) for k in ref), "block swapping changed the trained LoKr"
    trained = [k for k in ref if k.endswith("lokr_w2_b")]  # zero-initialised
    assert len(trained) > 30 and all(float(ref[k].abs().max()) > 0 for k in trained)


def test_lycoris_base_weights_are_merged_by_the_formulas(setup, tmp_path):
    """--base_weights with a LoKr file merges W' = W + m·ΔW into the frozen base before training (lycoris' own
    merge_to would scale a factored LoKr by alpha / r twice: lycoris 4.1.3's get_diff_weight)."""
    from library.formats.lycoris_weights import read_lycoris

    flux = load_flux(setup[0]["flux"])
    path = tmp_path / "lokr.safetensors"
    random_lycoris(flux, "lokr", 2, {"factor": "4"}).save_weights(str(path), torch.float32, {})
    base = load_flux(setup[0]["flux"])
    trainer, code = run_trainer(lycoris_args(setup, tmp_path / "out", "lokr", "--max_train_steps", "1",
                                             "--base_weights", str(path), "--base_weights_multiplier", "0.5"))
    assert code == 0
    module = read_lycoris(load_file(str(path)))["lora_unet_double_blocks_0_img_attn_qkv"]
    w = base.double_blocks[0].img_attn.qkv.weight
    merged = trainer.models.flux.double_blocks[0].img_attn.qkv.weight
    assert (merged - w).abs().max() > 1e-2
    assert torch.allclose(merged, module.updated(w, 0.5), atol=1e-6)


@pytest.mark.parametrize("extra,net_args,message", [
    (["--fp8_base"], (), "--fp8_base with --network_module lycoris.kohya needs --network_args bypass_mode=True"),
    ([], ("dora_wd=True", "bypass_mode=True"), "does not apply DoRA while training"),
])
def test_lycoris_options_that_would_fail_mid_step_are_refused_first(setup, tmp_path, capsys, extra, net_args,
                                                                     message):
    import flux_train_network as cli

    assert cli.main(lycoris_args(setup, tmp_path, "lokr", *extra, net_args=net_args)) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_lokr_sample_lands_closer_to_its_training_latents_than_the_base_model(tmp_path):
    """tests/test_lora_learning.py's recipe (trained-like tiny models, 1000 steps over two captioned images, sampled
    through flux_minimal_inference.py --lora_weights) with a LoKr in LyCORIS' full-matrix mode (network_dim above
    every factor size, factor=8). Measured: 4.1x closer for both images (our rank-16 LoRA: 18-24x); a rank-16 LoKr
    with factor=8 gets 2.8-3.1x."""
    from test_lora_learning import train_and_measure

    network = ("--network_module", "lycoris.kohya", "--network_dim", "100000", "--network_alpha", "1",
               "--network_args", "algo=lokr", "factor=8")
    results = train_and_measure(tmp_path, network=network)
    for stem, r in results.items():
        print(f"{stem}: MSE to training latents: base {r['mse_base']:.4f}, LoKr {r['mse_lora']:.4f} "
              f"(ratio {r['mse_base'] / r['mse_lora']:.1f}x)")
        assert r["mse_base"] / r["mse_lora"] >= 3.0, (stem, r)
        assert r["mse_lora"] < r["mse_lora_other"], (stem, r)


def test_merge_tool_refactorises_a_lokr_into_a_lora_and_converters_refuse_it(models, tmp_path, capsys):
    """flux_merge_lora.py --new_rank turns a LoKr into a plain LoRA by SVD (exact at full rank); the converter, which
    writes plain LoRA layouts only, refuses it in one line."""
    from library.formats.lora_formats import load_lora
    from library.formats.lycoris_weights import read_lycoris
    from networks import convert_flux_lora, flux_merge_lora

    path, out = tmp_path / "lokr.safetensors", tmp_path / "lora.safetensors"
    random_lycoris(models[0], "lokr", 2, {"factor": "4"}).save_weights(str(path), torch.float32, {})
    assert flux_merge_lora.main(["--save_to", str(out), "--models", str(path), "--new_rank", "128"]) == 0
    lora, _, _ = load_lora(out)
    lokr = read_lycoris(load_file(str(path)))
    assert lora.keys() == lokr.keys()
    assert all(torch.allclose(lora[n].delta(), lokr[n].delta(), atol=1e-5) for n in lokr)
    assert convert_flux_lora.main(["--src", "auto", "--src_path", str(path), "--dst_path",
                                   str(tmp_path / "x.safetensors")]) != 0
    assert "LoKr" in capsys.readouterr().err


def test_lokr_resume_equals_uninterrupted(setup, tmp_path):
    """--save_state / --resume with lycoris' network: the resumed run ends with the uninterrupted run's LoKr."""
    common = ("--save_every_n_steps", "2", "--save_state", "--output_name", "r")
    _, code = run_trainer(lycoris_args(setup, tmp_path / "full", "lokr", *common))
    assert code == 0
    state = tmp_path / "full" / "r-step00000002-state"
    _, code = run_trainer(lycoris_args(setup, tmp_path / "resumed", "lokr", *common, "--resume", str(state)))
    assert code == 0
    a, b = (load_file(str(tmp_path / d / "r.safetensors")) for d in ("full", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_flux_minimal_inference_renders_a_lokr_hooked_and_merged_alike(setup, tmp_path):
    """flux_minimal_inference.py --lora_weights FILE;0.8, hooked and with --merge_lora_weights: the same latents,
    not the base model's."""
    models = setup[0]
    path = tmp_path / "lokr.safetensors"
    random_lycoris(load_flux(models["flux"]), "lokr", 2, {"factor": "4"}).save_weights(str(path), torch.float32, {})

    def latents(name, *extra):
        return rendered_latents(models, tmp_path / name, *extra, steps=3)

    base = latents("base")
    hooked = latents("hooked", "--lora_weights", f"{path};0.8")
    merged = latents("merged", "--lora_weights", f"{path};0.8", "--merge_lora_weights")
    assert (hooked - base).abs().max() > 1e-2
    assert torch.allclose(hooked, merged, atol=1e-5)
