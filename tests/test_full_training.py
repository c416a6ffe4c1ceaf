"""flux_train.py end to end on tiny models: the saved BFL file (metadata, loaders, inference, diffusers), learning,
resume, and what the fused optimizer and saving options change."""

import logging
import subprocess
import sys
from functools import partial

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import cli_runs
from cli_runs import run_args
import flux_train as cli
from conftest import ROOT
from library.training.recipes.command_lines import FULL
from library.training.arguments import TrainingArgumentError, verify_training_args
from tools.make_demo_dataset import make_demo_dataset
from tools.make_tiny_models import make_tiny_models


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("full")
    models = make_tiny_models(base / "models")
    toml = make_demo_dataset(base / "data", count=2, size=32)
    return models, toml


def ft_args(setup, out, *extra):
    return [*run_args(*setup, out), "--learning_rate", "1e-3", "--max_train_steps", "4", "--cache_latents", *extra]


run_trainer = partial(cli_runs.run_trainer, "full")


def test_cli_saves_a_bfl_model_that_our_inference_loads(setup, tmp_path):
    models, _ = setup
    out = tmp_path / "out"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 32 --h 32 --s 2 --d 1\n")
    r = subprocess.run([sys.executable, str(ROOT / "flux_train.py"),
                        *ft_args(setup, out, "--output_name", "ft", "--save_every_n_steps", "2",
                                 "--save_last_n_steps", "1", "--max_train_steps", "6", "--fp8_base",
                                 "--sample_prompts", str(prompts), "--sample_every_n_steps", "6")],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--fp8_base has no effect" in r.stderr
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["ft-step00000004.safetensors", "ft.safetensors"]
    base, trained = load_file(str(models["flux"])), load_file(str(out / "ft.safetensors"))
    assert trained.keys() == base.keys()  # BFL keys, no prefix, every tensor of the transformer
    assert all(t.dtype == torch.float32 for t in trained.values())
    assert not torch.equal(trained["double_blocks.0.img_attn.qkv.weight"], base["double_blocks.0.img_attn.qkv.weight"])
    with safe_open(str(out / "ft.safetensors"), "pt") as f:
        md = f.metadata()
    assert md["modelspec.architecture"] == "flux-1-dev" and md["modelspec.sai_model_spec"] == "1.0.1"
    assert md["modelspec.title"] == "ft" and md["modelspec.resolution"] == "32x32"
    assert not any(k.startswith("ss_") for k in md)
    assert [p.name.split("_")[1] for p in (out / "sample").glob("*.png")] == ["000006"]  # preview of the trained model

    import flux_minimal_inference as inference

    assert inference.main(["--ckpt_path", str(out / "ft.safetensors"), "--ae", str(models["ae"]), "--clip_l",
                           str(models["clip_l"]), "--t5xxl", str(models["t5xxl"]), "--tokenizer_cache_dir",
                           str(models["tokenizers"]), "--dtype", "fp32", "--width", "32", "--height", "32",
                           "--steps", "2", "--seed", "1", "--output_dir", str(tmp_path / "images")]) == 0
    assert len(list((tmp_path / "images").glob("*.png"))) == 1


def test_schnell_model_is_saved_as_schnell(tmp_path, setup):
    from library import flux_utils

    schnell = make_tiny_models(tmp_path / "schnell", preset="tiny-schnell")
    argv = ft_args(setup, tmp_path / "out", "--max_train_steps", "1", "--save_precision", "bf16", "--mem_eff_save")
    argv[argv.index("--pretrained_model_name_or_path") + 1] = str(schnell["flux"])
    trainer, code = run_trainer(argv)
    assert code == 0
    saved = tmp_path / "out" / "last.safetensors"  # sd-scripts' default name without --output_name
    with safe_open(str(saved), "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "flux-1-schnell"
        assert f.get_tensor("img_in.weight").dtype == torch.bfloat16  # --save_precision
    assert flux_utils.analyze_checkpoint(saved).is_schnell
    # the streamed file holds exactly what the plain writer writes
    trainer.args.mem_eff_save = False
    trainer.save_weights(tmp_path / "plain.safetensors", 1, 1, final=True)
    a, b = load_file(str(saved)), load_file(str(tmp_path / "plain.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_loss_decreases_on_a_fixed_seed(setup, tmp_path):
    trainer, code = run_trainer(ft_args(setup, tmp_path, "--max_train_steps", "40"))
    assert code == 0
    first, last = trainer.losses[:10], trainer.losses[-10:]
    assert sum(last) / len(last) < 0.85 * sum(first) / len(first)  # 0.79 when written


def final_weights(folder, name="r"):
    return load_file(str(folder / f"{name}.safetensors"))


@pytest.mark.parametrize("mode", [("--blockwise_fused_optimizers",),
                                  ("--fused_backward_pass", "--optimizer_type", "adafactor")])
def test_resume_equals_uninterrupted(setup, tmp_path, mode):
    common = (*mode, "--lr_scheduler", "cosine", "--save_every_n_steps", "2", "--save_state", "--output_name", "r")
    full, code = run_trainer(ft_args(setup, tmp_path / "full", *common))
    assert code == 0
    state = tmp_path / "full" / "r-step00000002-state"
    assert (state / "transformer.safetensors").exists() and not list(state.glob("custom_checkpoint_*"))
    resumed, code = run_trainer(ft_args(setup, tmp_path / "resumed", *common, "--resume", str(state)))
    assert code == 0 and resumed.global_step == 4 and len(resumed.losses) == 2  # continues at step 3
    assert resumed.losses == full.losses[2:]
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fused, plain", [
    (("--fused_backward_pass", "--optimizer_type", "adafactor", "--cpu_offload_checkpointing"),
     ("--optimizer_type", "adafactor", "--gradient_checkpointing")),
    (("--blockwise_fused_optimizers", "--gradient_accumulation_steps", "2"), ("--gradient_accumulation_steps", "2")),
])
def test_fused_modes_train_what_a_plain_step_trains(setup, tmp_path, fused, plain):
    """With clipping off (the fused modes clip per tensor / per block) the updates are the same as stepping the
    whole model after backward, through the whole CLI path (hooks, accelerate, accumulation, recomputation in
    backward with --cpu_offload_checkpointing)."""
    common = ("--max_grad_norm", "0", "--max_train_steps", "2", "--output_name", "r")
    fused_trainer, code = run_trainer(ft_args(setup, tmp_path / "fused", *common, *fused))
    assert code == 0 and fused_trainer.fused_optimizer is not None
    _, code = run_trainer(ft_args(setup, tmp_path / "plain", *common, *plain))
    assert code == 0
    a, b = final_weights(tmp_path / "fused"), final_weights(tmp_path / "plain")
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)


def test_trained_weights_are_float32_unless_full_bf16(setup, tmp_path):
    mixed, code = run_trainer(ft_args(setup, tmp_path / "a", "--mixed_precision", "bf16", "--max_train_steps", "1"))
    assert code == 0 and mixed.models.flux.dtype == torch.float32
    assert mixed.models.t5xxl.dtype == torch.bfloat16  # frozen text encoders in the weight dtype
    full, code = run_trainer(ft_args(setup, tmp_path / "b", "--mixed_precision", "bf16", "--full_bf16",
                                     "--max_train_steps", "1", "--optimizer_type", "adafactor",
                                     "--fused_backward_pass"))
    assert code == 0 and full.models.flux.dtype == torch.bfloat16
    assert load_file(str(tmp_path / "b" / "last.safetensors"))["img_in.weight"].dtype == torch.bfloat16


def test_argument_checks_and_deprecated_swap_options(setup, tmp_path, caplog):
    parse = lambda *extra: cli.setup_parser().parse_args(ft_args(setup, tmp_path, *extra))  # noqa: E731
    with caplog.at_level(logging.WARNING):
        args = verify_training_args(parse("--double_blocks_to_swap", "6", "--single_blocks_to_swap", "9"), FULL)
    assert args.blocks_to_swap == 6 + 9 // 2 and "deprecated" in caplog.text
    with pytest.raises(TrainingArgumentError) as e:
        verify_training_args(parse("--fused_backward_pass", "--mixed_precision", "fp16"), FULL)
    assert "requires --optimizer_type adafactor" in str(e.value) and "fp16" in str(e.value)
    with pytest.raises(TrainingArgumentError, match="gradient_accumulation_steps 1"):
        verify_training_args(parse("--fused_backward_pass", "--optimizer_type", "adafactor",
                                   "--gradient_accumulation_steps", "2"), FULL)
    assert cli.main(ft_args(setup, tmp_path, "--blockwise_fused_optimizers", "--optimizer_type",
                            "AdamWScheduleFree")) == 2


def test_saved_model_loads_in_diffusers_with_the_same_outputs(setup, tmp_path):
    """diffusers' FluxTransformer2DModel.from_single_file on the saved file, offline with a local config. Its own
    BFL->diffusers converter is hard-wired to FLUX.1's width (3072); tests/test_flux_model.py shows our key table
    is identical to it at that width, so here the table stands in for it at the tiny width."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders import single_file_model

    from library import flux_utils
    from library.formats.diffusers_keys import bfl_to_diffusers

    _, code = run_trainer(ft_args(setup, tmp_path, "--max_train_steps", "1"))
    assert code == 0
    saved = tmp_path / "last.safetensors"
    _, ours = flux_utils.load_flow_model(saved, torch.float32, "cpu")
    p = ours.params
    FluxTransformer2DModel(
        patch_size=1, in_channels=p.in_channels, out_channels=p.out_channels, num_layers=p.depth,
        num_single_layers=p.depth_single_blocks, attention_head_dim=p.head_dim, num_attention_heads=p.num_heads,
        joint_attention_dim=p.context_in_dim, pooled_projection_dim=p.vec_in_dim, guidance_embeds=p.guidance_embed,
        axes_dims_rope=p.axes_dim).save_config(tmp_path / "config" / "transformer")
    entry = single_file_model.SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"]
    original = entry["checkpoint_mapping_fn"]
    entry["checkpoint_mapping_fn"] = lambda checkpoint, **kw: bfl_to_diffusers(checkpoint, p.hidden_size)
    try:
        theirs = FluxTransformer2DModel.from_single_file(str(saved), config=str(tmp_path / "config"),
                                                         subfolder="transformer", local_files_only=True,
                                                         torch_dtype=torch.float32).eval()
    finally:
        entry["checkpoint_mapping_fn"] = original
    g = torch.Generator().manual_seed(0)
    img, txt, y = (torch.randn(1, 16, 64, generator=g), torch.randn(1, 8, p.context_in_dim, generator=g),
                   torch.randn(1, p.vec_in_dim, generator=g))
    ids = torch.zeros(16, 3)
    ids[:, 1], ids[:, 2] = torch.arange(16) // 4, torch.arange(16) % 4
    with torch.no_grad():
        a = ours.eval()(img=img, img_ids=ids[None], txt=txt, txt_ids=torch.zeros(1, 8, 3),
                        timesteps=torch.tensor([0.7]), y=y, guidance=torch.tensor([3.5]))
        b = theirs(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=torch.tensor([0.7]),
                   img_ids=ids, txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]), return_dict=False)[0]
    assert (a - b).abs().max() < 2e-5


@pytest.fixture(scope="module")
def deep_flux(setup, tmp_path_factory):
    """The tiny transformer with 4 double and 6 single blocks, so that blocks can be swapped (each stack keeps at
    least 2 blocks resident)."""
    from dataclasses import replace

    from library import flux_utils
    from library.models.transformer import Flux
    from library.formats.safetensors_io import save_file_atomic

    models, _ = setup
    _, tiny = flux_utils.load_flow_model(models["flux"], torch.float32, "cpu")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("deep") / "flux.safetensors"
    save_file_atomic(Flux(replace(tiny.params, depth=4, depth_single_blocks=6)).state_dict(), path)
    return path


@pytest.mark.parametrize("mode", [(), ("--fused_backward_pass", "--optimizer_type", "adafactor")])
def test_blocks_to_swap_trains_the_same_weights(setup, deep_flux, tmp_path, mode):
    def train(out, *extra):
        argv = ft_args(setup, out, "--max_train_steps", "3", *mode, *extra)
        argv[argv.index("--pretrained_model_name_or_path") + 1] = str(deep_flux)
        trainer, code = run_trainer(argv)
        assert code == 0
        return trainer

    plain = train(tmp_path / "plain")
    swap = ("--blocks_to_swap", "3", "--save_every_n_steps", "2", "--save_state")
    swapped = train(tmp_path / "swap", *swap)
    assert [s.schedule.num_swapped for s in swapped.block_swappers] == [1, 4]  # 3 // 2 double, (3 - 3 // 2) * 2 single
    assert swapped.losses == plain.losses
    # resuming loads the state's weights into the swapped blocks' CPU storage and the resident ones alike
    train(tmp_path / "resumed", *swap, "--resume", str(tmp_path / "swap" / "at-step00000002-state"))
    a = final_weights(tmp_path / "plain", "last")
    for run in ("swap", "resumed"):
        b = final_weights(tmp_path / run, "last")
        assert all(torch.equal(a[k], b[k]) for k in a), run


@pytest.mark.slow
@pytest.mark.parametrize("mode", [(), ("--fused_backward_pass", "--optimizer_type", "adafactor")])
def test_two_processes_train_identical_transformers(setup, tmp_path, mode):
    """Two CPU ranks through `accelerate launch` (gloo): the transformer's gradients are averaged by hand (after
    backward, or inside it by the fused hooks), so both ranks end with the same weights; only rank 0 writes."""
    models, _ = setup
    argv = ft_args(setup, tmp_path / "out", "--output_name", "dist", "--max_train_steps", "2", *mode)
    a, b = cli_runs.launch_two_ranks(tmp_path, argv, port=29527)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["img_in.weight"], load_file(str(models["flux"]))["img_in.weight"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["dist.safetensors"]
