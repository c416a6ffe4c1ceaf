"""Chroma end to end through the command lines, on tiny real-format files (tools/make_tiny_models.py
--model_type chroma): LoRA training with cached text-encoder outputs, the saved LoRA's keys and metadata against
sd-scripts' naming, inference with that LoRA, and the refusals."""

from __future__ import annotations

import re
from functools import partial

import cli_runs
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import flux_minimal_inference
from library.training.errors import TrainingError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def chroma(tmp_path_factory):
    from tools.make_demo_dataset import make_demo_dataset
    from tools.make_tiny_models import make_tiny_models

    base = tmp_path_factory.mktemp("chroma")
    models = make_tiny_models(base / "models", model_type="chroma")
    return models, make_demo_dataset(base / "data", count=2, size=32)


def chroma_model_args(models: dict) -> list[str]:
    """No --clip_l: Chroma has no CLIP-L input."""
    return ["--pretrained_model_name_or_path", str(models["flux"]), "--t5xxl", str(models["t5xxl"]),
            "--ae", str(models["ae"]), "--tokenizer_cache_dir", str(models["tokenizers"]),
            "--t5xxl_max_token_length", "16"]


def train_argv(setup, out, *extra) -> list[str]:
    models, toml = setup
    return [*chroma_model_args(models), "--dataset_config", str(toml), "--output_dir", str(out), "--seed", "7",
            "--max_data_loader_n_workers", "0", "--model_prediction_type", "raw", "--model_type", "chroma",
            "--network_module", "networks.lora_flux", "--network_dim", "4", "--learning_rate", "1e-2",
            "--max_train_steps", "3", "--network_train_unet_only", "--cache_latents",
            "--cache_text_encoder_outputs", "--cache_text_encoder_outputs_to_disk", *extra]


run_network = partial(cli_runs.run_trainer, "network")


@pytest.fixture(scope="module")
def trained(chroma, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    prompts = out / "prompts.txt"
    prompts.write_text("a red circle --w 32 --h 32 --s 2 --d 1 --n blurry --l 4.0\n")
    trainer, code = run_network(train_argv(chroma, out, "--sample_prompts", str(prompts),
                                           "--sample_every_n_steps", "2"))
    assert code == 0
    return trainer, out


def test_lora_training_runs_caches_text_and_samples(chroma, trained):
    trainer, out = trained
    assert trainer.models.variant.name == "chroma" and type(trainer.models.flux).__name__ == "Chroma"
    caches = sorted(chroma[1].parent.rglob("*_flux_te.npz"))
    assert len(caches) == 2
    import numpy as np

    with np.load(caches[0]) as npz:
        assert bool(npz["apply_t5_attn_mask"])  # implied for Chroma
        assert not npz["l_pooled"].any()  # no CLIP-L: zeros
        assert npz["t5_out"].shape == (16, trainer.models.flux.params.context_in_dim)
    assert len(list((out / "sample").glob("*.png"))) == 1
    assert trainer.loss_fn.settings.guidance_scale == 0.0  # the model's default


def test_saved_lora_has_sd_scripts_chroma_names_and_metadata(trained):
    _, out = trained
    path = out / "last.safetensors"
    sd = load_file(str(path))
    names = {k.split(".")[0] for k in sd}
    # sd-scripts names Chroma's LoRA modules as FLUX's (lora_unet_ + BFL path, dots -> _); Chroma's blocks have no
    # modulation Linears, so none of *_mod_lin / *_modulation_lin
    double = {f"lora_unet_double_blocks_{i}_{s}_{m}" for i in range(2) for s in ("img", "txt")
              for m in ("attn_qkv", "attn_proj", "mlp_0", "mlp_2")}
    single = {f"lora_unet_single_blocks_{i}_{m}" for i in range(2) for m in ("linear1", "linear2")}
    assert names == double | single
    assert not any(re.search(r"mod_lin|modulation|distilled|te1|te3", n) for n in names)
    assert sd["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (4, 64)
    assert sd["lora_unet_single_blocks_1_linear1.lora_up.weight"].shape == (3 * 64 + 256, 4)
    with safe_open(str(path), "pt") as f:
        md = f.metadata()
    assert (md["ss_model_type"], md["ss_base_model_version"]) == ("chroma", "chroma")
    assert md["modelspec.architecture"] == "chroma/lora"
    assert md["modelspec.implementation"] == "https://huggingface.co/lodestones/Chroma"
    assert (md["ss_apply_t5_attn_mask"], md["ss_guidance_scale"]) == ("True", "0.0")
    assert any(not torch.equal(sd[k], torch.zeros_like(sd[k])) for k in sd if "lora_up" in k)  # it trained


def render(models: dict, folder, *extra: str):
    assert flux_minimal_inference.main([
        "--ckpt_path", str(models["flux"]), "--ae", str(models["ae"]), "--t5xxl", str(models["t5xxl"]),
        "--tokenizer_cache_dir", str(models["tokenizers"]), "--t5xxl_max_token_length", "16", "--dtype", "fp32",
        "--device", "cpu", "--width", "32", "--height", "32", "--steps", "2", "--seed", "1",
        "--prompt", "a red circle", "--output_dir", str(folder), "--output_latents", *extra]) == 0
    (file,) = folder.glob("*_latents.safetensors")
    (png,) = folder.glob("*.png")
    return load_file(str(file))["latents"].float(), png


def test_inference_renders_with_the_trained_lora(chroma, trained, tmp_path):
    models, _ = chroma
    _, out = trained
    base, png = render(models, tmp_path / "base", "--model_type", "chroma", "--negative_prompt", "blurry")
    assert png.stat().st_size > 0 and torch.isfinite(base).all()
    with_lora, _ = render(models, tmp_path / "lora", "--negative_prompt", "blurry",
                          "--lora_weights", str(out / "last.safetensors"))
    assert (with_lora - base).abs().max() > 1e-4  # the LoRA changes the image; --model_type from the keys
    merged, _ = render(models, tmp_path / "merged", "--negative_prompt", "blurry", "--merge_lora_weights",
                       "--lora_weights", str(out / "last.safetensors"))
    torch.testing.assert_close(merged, with_lora, rtol=1e-4, atol=1e-4)
    no_cfg, _ = render(models, tmp_path / "nocfg", "--cfg_scale", "1")
    assert (no_cfg - base).abs().max() > 1e-4  # Chroma's default true CFG (5.0) was on


def test_model_type_mismatches_are_refused_in_one_line(chroma, tmp_path, capsys):
    from tools.make_tiny_models import make_tiny_models

    flux = make_tiny_models(tmp_path / "flux")
    models, toml = chroma
    with pytest.raises(TrainingError, match=r"--model_type chroma expects a chroma transformer, but .*flux\.safe"
                                            r"tensors has flux keys"):
        run_network(train_argv(({**models, "flux": flux["flux"]}, toml), tmp_path / "a"))
    argv = train_argv(chroma, tmp_path / "b")
    argv[argv.index("--model_type") + 1] = "dev"
    with pytest.raises(TrainingError, match=r"--model_type dev expects a flux transformer, but .* has chroma keys"):
        run_network(argv)
    common = ["--ae", str(flux["ae"]), "--t5xxl", str(flux["t5xxl"]), "--tokenizer_cache_dir",
              str(flux["tokenizers"]), "--output_dir", str(tmp_path)]
    assert flux_minimal_inference.main(["--ckpt_path", str(flux["flux"]), "--model_type", "chroma", *common]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.fullmatch(r"error: --model_type chroma expects a chroma transformer, but \S+flux"
                                          r"\.safetensors has flux keys; use --model_type flux", err[0]), err
    assert flux_minimal_inference.main(["--ckpt_path", str(flux["flux"]), *common]) != 0  # FLUX needs --clip_l
    assert "--clip_l is required for dev" in capsys.readouterr().err


def test_full_fine_tuning_saves_a_chroma_file(chroma, tmp_path):
    from library.models.checkpoint import analyze_checkpoint

    models, toml = chroma
    argv = [*chroma_model_args(models), "--dataset_config", str(toml), "--output_dir", str(tmp_path), "--seed", "7",
            "--max_data_loader_n_workers", "0", "--model_prediction_type", "raw", "--learning_rate", "1e-3",
            "--max_train_steps", "2", "--cache_latents", "--cache_text_encoder_outputs", "--output_name", "ft",
            "--gradient_checkpointing"]
    trainer, code = cli_runs.run_trainer("full", argv)
    assert code == 0 and trainer.models.variant.name == "chroma"  # recognised from the keys
    info = analyze_checkpoint(tmp_path / "ft.safetensors")
    assert info.family == "chroma" and info.metadata["modelspec.architecture"] == "chroma"
    before, after = load_file(str(models["flux"])), load_file(str(tmp_path / "ft.safetensors"))
    assert set(before) == set(after)
    assert not torch.equal(before["double_blocks.0.img_attn.qkv.weight"], after["double_blocks.0.img_attn.qkv.weight"])


def test_controlnet_training_refuses_chroma(chroma, tmp_path, capsys):
    import flux_train_control_net
    from tools.make_demo_dataset import make_controlnet_demo_dataset

    models, _ = chroma
    toml = make_controlnet_demo_dataset(tmp_path / "data", count=1, size=32)
    argv = [*chroma_model_args(models), "--dataset_config", str(toml), "--output_dir", str(tmp_path),
            "--max_train_steps", "1"]
    assert flux_train_control_net.main([*argv, "--model_type", "chroma"]) != 0
    err = capsys.readouterr().err
    assert "--model_type chroma is not supported by flux_train_control_net.py" in err
    with pytest.raises(TrainingError, match=r"is a chroma transformer: flux_train_control_net.py trains ControlNets "
                                            r"for dev, krea, schnell only"):
        cli_runs.run_trainer("controlnet", argv)


def test_inference_with_block_swap_renders_the_same(chroma, tmp_path):
    """A Chroma file with 4 double + 8 single blocks (the tiny 2 + 2 cannot swap any): --blocks_to_swap 3 renders
    the same latents, bit for bit, on the CPU."""
    from dataclasses import replace

    from library.formats.safetensors_io import save_file_atomic
    from library.models.checkpoint import analyze_checkpoint
    from library.models.chroma import Chroma

    models, _ = chroma
    params = replace(analyze_checkpoint(models["flux"]).params, depth=4, depth_single_blocks=8)
    torch.manual_seed(5)
    deep = {**models, "flux": tmp_path / "chroma_12_blocks.safetensors"}
    save_file_atomic(Chroma(params).state_dict(), deep["flux"], {"tiny": "true"})
    plain, _ = render(deep, tmp_path / "plain", "--negative_prompt", "blurry")
    swapped, _ = render(deep, tmp_path / "swapped", "--negative_prompt", "blurry", "--blocks_to_swap", "3")
    assert torch.equal(plain, swapped)


def test_lora_training_on_an_fp8_base_with_live_text_encoding(chroma, tmp_path):
    """--fp8_base, bf16, gradient checkpointing, T5 run every step (no cache) and no --network_train_unet_only:
    Chroma has no CLIP-L, so no text-encoder LoRA modules appear."""
    argv = [a for a in train_argv(chroma, tmp_path) if a not in ("--network_train_unet_only",
                                                                 "--cache_text_encoder_outputs",
                                                                 "--cache_text_encoder_outputs_to_disk")]
    trainer, code = run_network([*argv, "--fp8_base", "--mixed_precision", "bf16", "--gradient_checkpointing"])
    assert code == 0 and not trainer.trains_text_encoder
    assert trainer.models.flux.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
    assert all(k.startswith("lora_unet_") for k in load_file(str(tmp_path / "last.safetensors")))


def test_readme_chroma_command_lines_parse_and_verify():
    import shlex

    import flux_train_network
    from conftest import ROOT
    from library.training.arguments import verify_training_args

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("\n## Chroma\n")
    section = text[start:text.index("\n## ", start + 1)]
    (block,) = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    commands = [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    assert [c[:3] for c in commands] == [["python", "flux_minimal_inference.py", "--model_type"],
                                         ["accelerate", "launch", "flux_train_network.py"]]
    inference = flux_minimal_inference.setup_parser().parse_args(commands[0][2:])
    assert inference.model_type == "chroma" and inference.clip_l is None and inference.cfg_scale is None
    args = verify_training_args(flux_train_network.setup_parser().parse_args(commands[1][3:]),
                                flux_train_network.COMMAND_LINE)
    assert args.model_type == "chroma" and args.clip_l is None and args.guidance_scale is None


def test_a_lora_extracted_from_chroma_says_chroma(chroma, tmp_path):
    """flux_extract_lora.py names the base's variant in the metadata, as the trainer does (sd-scripts' values)."""
    from library.formats.safetensors_io import load_tensors, save_file_atomic
    from networks import flux_extract_lora

    models, _ = chroma
    tuned = load_tensors(models["flux"])
    key = next(k for k in tuned if k.startswith("double_blocks.0.") and k.endswith("qkv.weight"))
    tuned[key] = tuned[key] + 0.05 * torch.randn_like(tuned[key])
    save_file_atomic(tuned, tmp_path / "tuned.safetensors")
    out = tmp_path / "extracted.safetensors"
    assert flux_extract_lora.main(["--model_org", str(models["flux"]), "--model_tuned",
                                   str(tmp_path / "tuned.safetensors"), "--save_to", str(out), "--dim", "2"]) == 0
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "chroma/lora" and meta["ss_base_model_version"] == "chroma"
