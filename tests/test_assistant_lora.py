"""--assistant_lora (library/training/assistant.py): a schnell de-distillation LoRA hooked while a LoRA trains,
switched off for sample images, never saved; composes with --fp8_base and --blocks_to_swap; refused elsewhere."""

from dataclasses import replace
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import cli_runs
import flux_minimal_inference as inference
import flux_train_network as cli
from cli_runs import model_args, run_args
from library import flux_utils
from library.formats.lora_formats import convert_state_dict
from library.formats.safetensors_io import save_file_atomic
from library.lora.loading import apply_loras
from library.models.checkpoint import analyze_checkpoint
from library.models.transformer import Flux
from library.training.arguments import TrainingArgumentError
from library.training.errors import TrainingError
from model_helpers import flux_inputs, run
from networks import lora_flux
from tools.make_demo_dataset import make_demo_dataset
from tools.make_tiny_models import make_tiny_models

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_assistant(flux_path, path, seed=5):
    """A random, non-zero LoRA over every Linear of the transformer in ai-toolkit's (diffusers/PEFT) layout, as
    ostris/FLUX.1-schnell-training-adapter is stored."""
    _, flux = flux_utils.load_flow_model(flux_path, torch.float32, "cpu")
    network = lora_flux.create_network(1.0, 4, 4.0, None, None, flux)
    network.apply_to(None, flux, apply_text_encoder=False, apply_unet=True)  # registers the modules
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    weights = convert_state_dict(network.state_dict(), "ai-toolkit")
    save_file_atomic(weights, path)
    assert all(k.startswith("transformer.") for k in weights) and any(".lora_A." in k for k in weights)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("assistant")
    schnell = make_tiny_models(base / "schnell", preset="tiny-schnell")
    # 4 double + 8 single blocks, so blocks can be swapped (the tiny preset keeps its 2 + 2 resident)
    swappable = dict(schnell, flux=base / "schnell" / "flux_12_blocks.safetensors")
    params = replace(analyze_checkpoint(schnell["flux"]).params, depth=4, depth_single_blocks=8)
    torch.manual_seed(3)
    save_file_atomic(Flux(params).state_dict(), swappable["flux"], {"tiny": "true"})
    return {"schnell": schnell, "swappable": swappable, "dev": make_tiny_models(base / "dev"),
            "data": make_demo_dataset(base / "data", count=2, size=32),
            "assistant": write_assistant(schnell["flux"], base / "assistant.safetensors"),
            "swappable_assistant": write_assistant(swappable["flux"], base / "assistant12.safetensors")}


def train_argv(tiny, model, out, *extra):
    return [*run_args(tiny[model], tiny["data"], out), "--network_module", "networks.lora_flux", "--network_dim",
            "4", "--learning_rate", "1e-2", "--max_train_steps", "2", "--network_train_unet_only", "--cache_latents",
            *extra]


run_trainer = partial(cli_runs.run_trainer, "network")


def test_the_step_sees_the_assistant_the_saved_lora_and_samples_do_not(tiny, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 64 --h 64 --s 2 --d 3\n")
    out = tmp_path / "with"
    trainer, code = run_trainer(train_argv(tiny, "schnell", out, "--assistant_lora", str(tiny["assistant"]),
                                           "--sample_prompts", str(prompts), "--sample_every_n_steps", "2"))
    assert code == 0
    plain, code = run_trainer(train_argv(tiny, "schnell", tmp_path / "without"))
    assert code == 0

    # the saved file holds the trained network and nothing else: the same keys as a run without the assistant
    saved = load_file(str(out / "last.safetensors"))
    without = load_file(str(tmp_path / "without" / "last.safetensors"))
    assert saved.keys() == without.keys()
    network = trainer.network.state_dict()
    assert saved.keys() == network.keys() and all(torch.equal(saved[k], network[k].cpu()) for k in saved)
    with safe_open(str(out / "last.safetensors"), "pt") as f:
        assert f.metadata()["ss_assistant_lora"] == "assistant.safetensors"  # recorded, not included
        assert f.metadata()["modelspec.architecture"] == "flux-1-schnell/lora"

    # the model the loss calls = plain schnell + trained LoRA + assistant; switched off = plain schnell + saved LoRA
    flux = trainer.models.flux
    assert trainer.loss_fn.model is flux and trainer.assistant.enabled
    inputs = {**flux_inputs(flux, batch=1), "guidance": None}
    trained_on = run(flux, inputs)
    with trainer.assistant.switched_off():
        trained_off = run(flux, inputs)
    assert trainer.assistant.enabled
    _, fresh = flux_utils.load_flow_model(tiny["schnell"]["flux"], torch.float32, "cpu")
    fresh.eval()
    applied = apply_loras([str(out / "last.safetensors")], fresh, None, None, merge=False, device="cpu")
    assert torch.allclose(run(fresh, inputs), trained_off, atol=1e-5)
    applied += apply_loras([str(tiny["assistant"])], fresh, None, None, merge=False, device="cpu")
    assert torch.allclose(run(fresh, inputs), trained_on, atol=1e-5)
    assert (trained_on - trained_off).abs().max() > 1e-2  # the assistant's delta is real

    # sample images render without it (ai-toolkit samples schnell with the assistant removed)
    seen = []
    hook = flux.register_forward_pre_hook(lambda m, a, kw: seen.append(trainer.assistant.enabled), with_kwargs=True)
    try:
        trainer._maybe_sample(step=2)  # as the loop samples: in the recipe's sampling_context
    finally:
        hook.remove()
    assert seen == [False, False] and trainer.assistant.enabled
    # ... so the preview is inference with plain schnell and the saved LoRA, not with the assistant too
    images = tmp_path / "images"
    assert inference.main(["--ckpt_path", str(tiny["schnell"]["flux"]), *model_args(tiny["schnell"])[2:],
                           "--dtype", "fp32", "--width", "64", "--height", "64", "--steps", "2", "--seed", "3",
                           "--prompt", "a red circle",
                           "--lora_weights", str(out / "last.safetensors"), "--output_dir", str(images)]) == 0
    preview = sorted((out / "sample").glob("*.png"))
    assert len(preview) == 2  # the run's own (step 2) and the one above, both of the final LoRA
    assert inference.main(["--ckpt_path", str(tiny["schnell"]["flux"]), *model_args(tiny["schnell"])[2:],
                           "--dtype", "fp32", "--width", "64", "--height", "64", "--steps", "2", "--seed", "3",
                           "--prompt", "a red circle",
                           "--lora_weights", str(out / "last.safetensors"), str(tiny["assistant"]),
                           "--output_dir", str(tmp_path / "assisted")]) == 0

    def pixels(folder_or_path):
        path = next(folder_or_path.glob("*.png")) if folder_or_path.is_dir() else folder_or_path
        return np.asarray(Image.open(path)).astype(float)

    for path in preview:
        without, assisted = (np.abs(pixels(path) - pixels(d)).mean() for d in (images, tmp_path / "assisted"))
        assert without < 0.1 and assisted > 5  # the same render (up to float order); the assistant moves it a lot


FP8 = ("--fp8_base", "--mixed_precision", "bf16")


@pytest.mark.parametrize("precision", [(), FP8], ids=["fp32", "fp8-bf16"])
def test_the_assistant_composes_with_block_swap_and_fp8(tiny, tmp_path, precision):
    common = ("--assistant_lora", str(tiny["swappable_assistant"]), "--gradient_checkpointing", *precision)
    reference, code = run_trainer(train_argv(tiny, "swappable", tmp_path / "ref", *common))
    assert code == 0
    swapped, code = run_trainer(train_argv(tiny, "swappable", tmp_path / "swap", *common, "--blocks_to_swap", "4"))
    assert code == 0
    if precision:
        assert torch.float8_e4m3fn in swapped.block_swappers[0].layout.dtypes
    assert swapped.assistant.enabled and swapped.block_swappers
    a, b = (load_file(str(tmp_path / d / "last.safetensors")) for d in ("ref", "swap"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "block swapping changed the LoRA"
    assert reference.losses == swapped.losses
    # and the assistant is in the swapped (fp8) model's forward
    inputs = {**flux_inputs(swapped.models.flux, batch=1, n_img=4), "guidance": None}
    with torch.autocast("cpu", torch.bfloat16, enabled=bool(precision)):
        on = run(swapped.models.flux, inputs)
        with swapped.assistant.switched_off():
            off = run(swapped.models.flux, inputs)
    assert (on.float() - off.float()).abs().max() > 1e-2


def test_refused_for_other_models_and_trainers(tiny, tmp_path, capsys):
    with pytest.raises(TrainingError, match=r"^--assistant_lora is for FLUX.1-schnell, but this base is FLUX.1 dev"):
        run_trainer(train_argv(tiny, "dev", tmp_path / "dev", "--assistant_lora", str(tiny["assistant"])))
    assert cli.main(train_argv(tiny, "dev", tmp_path / "dev", "--assistant_lora", str(tiny["assistant"]))) == 2
    err = capsys.readouterr().err
    assert "--assistant_lora is for FLUX.1-schnell" in err and "Traceback" not in err
    with pytest.raises(TrainingError, match="no such file"):
        run_trainer(train_argv(tiny, "schnell", tmp_path / "x", "--assistant_lora", str(tmp_path / "missing.st")))
    full = [*run_args(tiny["schnell"], tiny["data"], tmp_path / "full"), "--assistant_lora", str(tiny["assistant"])]
    with pytest.raises(TrainingArgumentError, match="--assistant_lora is for LoRA training"):
        cli_runs.run_trainer("full", full)
