"""Flex.2 with the memory tools: block swapping and the fp8 base on a file with Flex.2's uneven stacks (fewer double
than single blocks, as its 8 + 38), and the memory planner on a 196-feature transformer against a real CPU step."""

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

import cli_runs
from cli_runs import run_args
from library.formats.safetensors_io import save_file_atomic
from library.models.checkpoint import analyze_checkpoint
from library.models.transformer import FLUX_PRESETS, Flux
from library.planner.plan import PlanSettings, plan_memory
from library.planner.report import measure_cpu_step
from tools.make_demo_dataset import make_controlnet_demo_dataset
from tools.make_tiny_models import make_tiny_models

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A Flex.2-like file with 4 double + 8 single blocks (swappable) and a ControlNet-style dataset."""
    base = tmp_path_factory.mktemp("flex2swap")
    models = make_tiny_models(base / "models", model_type="flex2")
    params = replace(analyze_checkpoint(models["flux"]).params, depth=4, depth_single_blocks=8)
    torch.manual_seed(3)
    models["flux"] = base / "models" / "flex2_12_blocks.safetensors"
    save_file_atomic(Flux(params).state_dict(), models["flux"], {"modelspec.architecture": "flex-2-preview"})
    return models, make_controlnet_demo_dataset(base / "data", count=2, size=32)


def train(setup, out, *extra):
    argv = [*run_args(*setup, out), "--network_module", "networks.lora_flux", "--network_dim", "4",
            "--learning_rate", "1e-2", "--max_train_steps", "2", "--network_train_unet_only", "--cache_latents",
            "--cache_text_encoder_outputs", "--gradient_checkpointing", "--fp8_base", "--mixed_precision", "bf16",
            *extra]
    trainer, code = cli_runs.run_trainer("network", argv)
    assert code == 0 and trainer.flex2
    return trainer, load_file(str(out / "last.safetensors"))


def test_block_swap_with_an_fp8_base_trains_the_same_flex2_lora(setup, tmp_path):
    _, reference = train(setup, tmp_path / "ref")
    trainer, swapped = train(setup, tmp_path / "swap", "--blocks_to_swap", "3")
    assert all(torch.equal(swapped[k], reference[k]) for k in reference), "block swapping changed the LoRA"
    double, single = trainer.block_swappers
    assert (double.schedule.num_blocks, single.schedule.num_blocks) == (4, 8)  # the file's depths
    assert (double.schedule.num_swapped, single.schedule.num_swapped) == (1, 4)
    assert trainer.models.flux.img_in.weight.dtype == torch.float8_e4m3fn


def test_the_planner_runs_the_196_feature_model_as_the_recipe_does():
    params = replace(FLUX_PRESETS["tiny"], in_channels=196, depth=4, depth_single_blocks=4)
    s = PlanSettings(model="test", params=params, width=128, height=128, t5_tokens=64, mixed_precision="no",
                     target="cpu", blocks_to_swap=2, fp8_base=True)
    plan = plan_memory(s)
    measured = measure_cpu_step(s)
    assert plan.peak_bytes == pytest.approx(measured["peak_bytes"], rel=0.10)


def test_inference_with_block_swap_renders_the_same_flex2_latents(setup, tmp_path):
    import flux_minimal_inference

    models, toml = setup
    control = next((toml.parent / "conditioning").glob("*.png"))

    def render(name, *extra):
        out = tmp_path / name
        assert flux_minimal_inference.main([
            "--ckpt_path", str(models["flux"]), "--ae", str(models["ae"]), "--clip_l", str(models["clip_l"]),
            "--t5xxl", str(models["t5xxl"]), "--tokenizer_cache_dir", str(models["tokenizers"]),
            "--t5xxl_max_token_length", "16", "--dtype", "fp32", "--device", "cpu", "--steps", "3", "--seed", "1",
            "--control_image", str(control), "--control_stop", "0.5", "--output_dir", str(out), "--output_latents",
            *extra]) == 0
        return load_file(str(next(out.glob("*_latents.safetensors"))))["latents"]

    assert torch.equal(render("plain"), render("swapped", "--blocks_to_swap", "3"))


def test_the_flex2_preset_has_flex2s_published_size():
    """ostris' card: about 8B parameters (8 double + 38 single blocks, img_in 196 wide)."""
    with torch.device("meta"):
        flux = Flux(FLUX_PRESETS["flex2"])
    assert sum(p.numel() for p in flux.parameters()) == 8_163_669_568
    assert tuple(flux.img_in.weight.shape) == (3072, 196) and len(flux.double_blocks) == 8


def test_plan_memory_for_the_flex2_preset():
    """tools/plan_memory.py --model_preset flex2 (real shapes on meta, ~12 s): the fp8 base's resident bytes are
    Flex.2's parameters (weights of norms and biases stay bf16)."""
    s = PlanSettings(model="flex2", params=FLUX_PRESETS["flex2"], width=512, height=512, fp8_base=True,
                     network_dim=16, network_alpha=16)
    plan = plan_memory(s)
    assert 8.0e9 < plan.parts["resident_base_weights"] < 8.3e9
