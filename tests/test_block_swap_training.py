"""--blocks_to_swap, --cpu_offload_checkpointing and --fp8_base through flux_train_network.py and inference, on CPU.

The transformer file here has 4 double and 8 single blocks (the tiny preset's 2 + 2 cannot swap any: each stack
keeps 2 blocks), so --blocks_to_swap goes up to 5. Compute and storage are both the CPU but separate memory (see
tests/test_block_swap.py), so a wrong schedule changes the trained weights.
"""

from functools import partial

import cli_runs
import pytest
import torch
from cli_runs import run_args
from safetensors.torch import load_file

import flux_minimal_inference
import flux_train_network as cli
from library.memory.checkpointing import is_cpu_offload_checkpointing
from library.training.arguments import verify_training_args
from library.training.errors import TrainingError
from library.training.recipes.command_lines import FULL


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return cli_runs.swappable_tiny_models(tmp_path_factory.mktemp("swap"))


def train_argv(setup, out, *extra):
    return [*run_args(*setup, out), "--network_module", "networks.lora_flux", "--network_dim", "4",
            "--learning_rate", "1e-2", "--max_train_steps", "3", "--network_train_unet_only", "--cache_latents",
            "--cache_text_encoder_outputs", *extra]


run_trainer = partial(cli_runs.run_trainer, "network")


def lora(out):
    return load_file(str(out / "last.safetensors"))


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    _, code = run_trainer(train_argv(setup, out, "--gradient_checkpointing"))
    assert code == 0
    return lora(out)


@pytest.mark.parametrize("n", [1, 5])
def test_lora_training_with_block_swap_trains_the_same_weights(setup, reference, tmp_path, n):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 32 --h 32 --s 2 --d 1\n")
    trainer, code = run_trainer(train_argv(setup, tmp_path, "--gradient_checkpointing", "--blocks_to_swap", str(n),
                                           "--sample_prompts", str(prompts), "--sample_every_n_steps", "2"))
    assert code == 0
    got = lora(tmp_path)
    assert got.keys() == reference.keys()
    assert all(torch.equal(got[k], reference[k]) for k in got), "block swapping changed the trained LoRA"
    double, single = trainer.block_swappers
    assert (double.schedule.num_swapped, single.schedule.num_swapped) == (n // 2, (n - n // 2) * 2)
    for s in trainer.block_swappers:
        assert s.host_to_device_only and s.stats.d2h_bytes == 0  # a frozen base is never copied back
        assert s.resident() == s.schedule.initial
    assert single.stats.h2d_bytes > 0
    assert len(list((tmp_path / "sample").glob("*.png"))) == 1  # sampling ran on the swapped model


def test_lora_training_with_block_swap_without_checkpointing(setup, tmp_path):
    ref_out, swap_out = tmp_path / "ref", tmp_path / "swap"
    assert run_trainer(train_argv(setup, ref_out))[1] == 0
    assert run_trainer(train_argv(setup, swap_out, "--blocks_to_swap", "3"))[1] == 0
    a, b = lora(ref_out), lora(swap_out)
    assert all(torch.equal(a[k], b[k]) for k in a)


FP8 = ("--fp8_base", "--mixed_precision", "bf16")


@pytest.fixture(scope="module")
def fp8_reference(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp8_ref")
    assert run_trainer(train_argv(setup, out, *FP8, "--gradient_checkpointing"))[1] == 0
    return lora(out)


def test_fp8_base_with_block_swap_trains_the_same_weights(setup, fp8_reference, tmp_path):
    trainer, code = run_trainer(train_argv(setup, tmp_path, *FP8, "--gradient_checkpointing", "--blocks_to_swap", "4"))
    assert code == 0
    assert torch.float8_e4m3fn in trainer.block_swappers[0].layout.dtypes
    got = lora(tmp_path)
    assert all(torch.equal(got[k], fp8_reference[k]) for k in got)


@pytest.mark.parametrize("n, precision", [(4, FP8), (5, ())], ids=["fp8-bf16", "fp32"])
def test_block_swap_with_offloaded_checkpointing_trains_the_same_weights(setup, request, tmp_path, n, precision):
    """The blocks run forward without a graph (their inputs wait on the CPU) and are recomputed in backward: the
    swappers still follow the training schedule and bring each block back before its recomputation (they raise
    otherwise), so the LoRA is the one of plain checkpointing without swapping, bit for bit."""
    reference = request.getfixturevalue("fp8_reference" if precision else "reference")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 32 --h 32 --s 2 --d 1\n")
    trainer, code = run_trainer(train_argv(setup, tmp_path, *precision, "--cpu_offload_checkpointing",
                                           "--blocks_to_swap", str(n), "--sample_prompts", str(prompts),
                                           "--sample_every_n_steps", "2"))
    assert code == 0
    assert is_cpu_offload_checkpointing(trainer.models.flux)
    got = lora(tmp_path)
    assert got.keys() == reference.keys()
    assert all(torch.equal(got[k], reference[k]) for k in got), "swap + offloaded checkpointing changed the LoRA"
    for s in trainer.block_swappers:
        # 3 steps, each moving every swapped block in and out once, plus the sample's forward-only passes
        assert s.stats.moves > 3 * 2 * s.schedule.num_swapped > 0 and s.stats.h2d_bytes > 0
        assert s.stats.d2h_bytes == 0 and s.stats.restores == 0
        assert s.resident() == s.schedule.initial
    assert len(list((tmp_path / "sample").glob("*.png"))) == 1  # sampling ran on the swapped, offloaded model


def test_cpu_offload_checkpointing_trains_the_same_weights(setup, reference, tmp_path):
    trainer, code = run_trainer(train_argv(setup, tmp_path, "--cpu_offload_checkpointing"))
    assert code == 0
    assert is_cpu_offload_checkpointing(trainer.models.flux)  # implied --gradient_checkpointing, offload on
    got = lora(tmp_path)
    for k in got:
        torch.testing.assert_close(got[k], reference[k], rtol=1e-5, atol=1e-7)


def test_out_of_range_options_are_refused(setup, tmp_path):
    with pytest.raises(TrainingError, match=r"--blocks_to_swap 6 is out of range: .* can swap 1 to 5 blocks"):
        run_trainer(train_argv(setup, tmp_path, "--blocks_to_swap", "6"))
    code = cli.main(train_argv(setup, tmp_path, "--blocks_to_swap", "9"))
    assert code == 2


def test_auto_asks_the_planner(setup, tmp_path, monkeypatch):
    import flux_train_control_net
    from library.cli.main import run_settings
    from library.planner import plan as memory_plan
    from library.training.recipes.controlnet import ControlNetTrainer
    from library.training.recipes.lora import LoRATrainer

    args = cli.setup_parser().parse_args(train_argv(setup, tmp_path, "--blocks_to_swap", "auto"))
    assert args.blocks_to_swap == "auto"
    asked = []
    monkeypatch.setattr(memory_plan, "choose_blocks_to_swap", lambda a, trainer: asked.append(trainer) or 4)
    assert run_settings(args, cli.COMMAND_LINE, LoRATrainer.memory_profile).blocks_to_swap == 4
    assert asked == ["network"] and args.blocks_to_swap == "auto"  # the arguments keep what the user asked for

    cn_args = flux_train_control_net.setup_parser().parse_args(["--blocks_to_swap", "auto"])
    assert run_settings(cn_args, flux_train_control_net.COMMAND_LINE,
                        ControlNetTrainer.memory_profile).blocks_to_swap == 4  # ControlNet training is planned too
    assert asked == ["network", "controlnet"]


def test_minimal_inference_with_block_swap_renders_the_same_image(setup, tmp_path):
    models, _ = setup
    common = ["--ckpt_path", str(models["flux"]), "--clip_l", str(models["clip_l"]), "--t5xxl",
              str(models["t5xxl"]), "--ae", str(models["ae"]), "--tokenizer_cache_dir", str(models["tokenizers"]),
              "--dtype", "fp32", "--width", "32", "--height", "32", "--steps", "3", "--seed", "5", "--device", "cpu",
              "--output_latents", "--t5xxl_max_token_length", "16"]
    for name, extra in (("plain", []), ("swap", ["--blocks_to_swap", "5"])):
        assert flux_minimal_inference.main([*common, "--output_dir", str(tmp_path / name), *extra]) == 0
    a, b = (load_file(str(next((tmp_path / n).glob("*_latents.safetensors"))))["latents"] for n in ("plain", "swap"))
    assert torch.equal(a, b)
    assert flux_minimal_inference.main([*common, "--output_dir", str(tmp_path / "bad"), "--blocks_to_swap", "6"]) == 2


def test_fp8_checkpoints_other_than_e4m3fn_are_refused_for_fp8_base():
    from types import SimpleNamespace

    from library.training.setup import check_fp8_checkpoint

    path = "flux_e5m2.safetensors"
    with pytest.raises(TrainingError, match=r"flux_e5m2.safetensors stores F8_E5M2 weights: --fp8_base .* e4m3fn"):
        check_fp8_checkpoint(True, path, SimpleNamespace(dtypes={"F8_E5M2", "BF16"}))
    check_fp8_checkpoint(True, path, SimpleNamespace(dtypes={"F8_E4M3", "BF16"}))  # used as stored
    check_fp8_checkpoint(False, "x", SimpleNamespace(dtypes={"F8_E5M2"}))  # without --fp8_base it is upcast on load


def test_blocks_to_swap_from_a_config_file(setup, tmp_path):
    from library.training.config_file import read_config_from_file

    parser = cli.setup_parser()
    for value, want in (("18", 18), ('"auto"', "auto")):
        config = tmp_path / "c.toml"
        config.write_text(f"blocks_to_swap = {value}\n")
        argv = ["--config_file", str(config)]
        args = read_config_from_file(parser.parse_args(argv), parser, argv)
        assert args.blocks_to_swap == want


def run_full_training(setup, out, *extra):
    """flux_train.py (the trainer object and the saved model) with train_argv's settings, 2 steps."""
    import flux_train
    from library.training.recipes.full import FullTrainer

    argv = train_argv(setup, out, "--output_name", "m", "--max_train_steps", "2", *extra)
    argv = [a for a in argv if a not in ("--network_module", "networks.lora_flux", "--network_dim", "4",
                                         "--network_train_unet_only")]
    args = flux_train.setup_parser().parse_args(argv)
    verify_training_args(args, FULL)
    trainer = FullTrainer(args)
    assert trainer.run() == 0
    return trainer, load_file(str(out / "m.safetensors"))


@pytest.fixture(scope="module")
def full_reference(setup, tmp_path_factory):
    return run_full_training(setup, tmp_path_factory.mktemp("full_ref"))[1]


def test_full_fine_tuning_with_block_swap_trains_the_same_model(setup, full_reference, tmp_path, caplog):
    """flux_train.py: the blocks' own weights train, so the swappers write back (chosen from requires_grad)."""
    trainer, got = run_full_training(setup, tmp_path, "--blocks_to_swap", "5")
    assert all(torch.equal(full_reference[k], got[k]) for k in full_reference)
    assert all(not s.host_to_device_only and s.stats.d2h_bytes > 0 for s in trainer.block_swappers)
    assert "updates them on the CPU" in caplog.text  # the optimizer steps after backward: said once


def test_full_fine_tuning_with_block_swap_and_offloaded_checkpointing(setup, full_reference, tmp_path):
    """Write-back swapping with offloaded checkpointing trains what offloaded checkpointing alone trains, bit for
    bit, and close to plain autograd (see below)."""
    _, want = run_full_training(setup, tmp_path / "offload", "--cpu_offload_checkpointing")
    trainer, got = run_full_training(setup, tmp_path / "swap", "--cpu_offload_checkpointing", "--blocks_to_swap", "5")
    assert is_cpu_offload_checkpointing(trainer.models.flux)
    assert got.keys() == want.keys() == full_reference.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    for s in trainer.block_swappers:
        assert not s.host_to_device_only and s.stats.d2h_bytes > 0 and s.stats.restores == 0
        assert s.resident() == s.schedule.initial
    # Not bit for bit against plain autograd: an offloaded block returns one gradient of the conditioning vector vec
    # (in a double block the sum of its two modulations'), where autograd adds each use's gradient in turn. So
    # time_in, vector_in and guidance_in differ in the last bits after the first step, and every weight after the
    # second (through vec); a block trained with wrong weights would be off by about the learning rate (1e-2).
    # LoRA trains none of these (unless in_dims asks for them): its tests above are bit for bit.
    for k, w in full_reference.items():
        torch.testing.assert_close(got[k], w, rtol=0, atol=5e-4)
