"""flux_train_network.py end to end on tiny models: files, metadata, options, resume, interruption, NaN."""

import json
from functools import partial
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import flux_train_network as cli
import cli_runs
from cli_runs import run_args
from conftest import ROOT
from test_atomic_io import dead_pid
from tools.make_demo_dataset import make_demo_dataset
from tools.make_tiny_models import make_tiny_models


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("train")
    models = make_tiny_models(base / "models")
    toml = make_demo_dataset(base / "data", count=2, size=32)
    return models, toml


def train_args(setup, out, *extra):
    return [*run_args(*setup, out), "--network_module", "networks.lora_flux", "--network_dim", "4",
            "--learning_rate", "1e-3", "--max_train_steps", "6", *extra]


run_trainer = partial(cli_runs.run_trainer, "network")


def test_cli_writes_kohya_lora_with_metadata_checkpoints_and_samples(setup, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 32 --h 32 --s 2 --d 1\n")
    r = subprocess.run([sys.executable, str(ROOT / "flux_train_network.py"),
                        *train_args(setup, tmp_path / "out", "--output_name", "demo", "--save_every_n_steps", "2",
                                    "--save_last_n_steps", "1", "--sample_prompts", str(prompts),
                                    "--sample_every_n_steps", "3", "--xformers")],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--xformers has no effect" in r.stderr
    out = tmp_path / "out"
    # step checkpoints every 2 steps; --save_last_n_steps 1 removes step 2 when step 4 is saved; then the final file
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["demo-step00000004.safetensors", "demo.safetensors"]
    weights = load_file(str(out / "demo.safetensors"))
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in weights
    assert "lora_unet_single_blocks_1_linear1.lora_up.weight" in weights
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_") for k in weights)
    assert weights["lora_unet_double_blocks_0_img_attn_qkv.alpha"].dtype == torch.float32
    assert weights["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape[0] == 4
    with safe_open(str(out / "demo.safetensors"), "pt") as f:
        md = f.metadata()
    assert md["ss_network_module"] == "networks.lora_flux" and md["ss_network_dim"] == "4"
    assert md["ss_base_model_version"] == "flux1" and md["ss_steps"] == "6" and md["ss_seed"] == "7"
    assert md["modelspec.architecture"] == "flux-1-dev/lora" and md["modelspec.sai_model_spec"] == "1.0.1"
    assert "sshs_model_hash" in md and json.loads(md["ss_datasets"])[0]["num_train_images"] == 2
    samples = sorted((out / "sample").glob("*.png"))
    assert [p.name.split("_")[1] for p in samples] == ["000003", "000006"]  # demo_000003_00_<time>_1.png


def test_options_change_what_is_trained_and_saved(setup, tmp_path):
    _, code = run_trainer(train_args(setup, tmp_path / "a", "--network_train_unet_only", "--save_precision", "bf16",
                                     "--network_args", "train_blocks=single", "--max_train_steps", "2"))
    assert code == 0
    weights = load_file(str(tmp_path / "a" / "last.safetensors"))
    assert all(k.startswith("lora_unet_single_blocks_") for k in weights)
    assert weights["lora_unet_single_blocks_0_linear1.lora_down.weight"].dtype == torch.bfloat16


def test_loss_decreases_on_a_fixed_seed(setup, tmp_path):
    trainer, code = run_trainer(train_args(setup, tmp_path, "--max_train_steps", "200", "--learning_rate", "5e-3",
                                           "--network_train_unet_only", "--cache_latents"))
    assert code == 0
    first, last = trainer.losses[:30], trainer.losses[-30:]
    assert sum(last) / len(last) < 0.85 * sum(first) / len(first)


def lora_tensors(path):
    return load_file(str(path))


def test_resume_equals_uninterrupted(setup, tmp_path):
    common = ("--lr_scheduler", "cosine", "--save_every_n_steps", "3", "--save_state", "--output_name", "r")
    _, code = run_trainer(train_args(setup, tmp_path / "full", *common))
    assert code == 0
    state = tmp_path / "full" / "r-step00000003-state"
    assert json.loads((state / "train_state.json").read_text())["current_step"] == 3
    # the trained weights are safetensors, not one of accelerate's fully unpickled custom checkpoints
    assert (state / "trainable_weights.safetensors").exists() and not list(state.glob("custom_checkpoint*"))
    _, code = run_trainer(train_args(setup, tmp_path / "resumed", *common, "--resume", str(state)))
    assert code == 0
    a, b = lora_tensors(tmp_path / "full" / "r.safetensors"), lora_tensors(tmp_path / "resumed" / "r.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_interruption_saves_a_resumable_state(setup, tmp_path, monkeypatch):
    from library.training.recipes.lora import LoRATrainer

    _, code = run_trainer(train_args(setup, tmp_path / "ref", "--output_name", "x"))
    original = LoRATrainer.after_step

    def stop_at_two(self):
        original(self)
        if self.global_step == 2:
            self.stop_requested = "SIGINT"

    monkeypatch.setattr(LoRATrainer, "after_step", stop_at_two)
    trainer, code = run_trainer(train_args(setup, tmp_path / "cut", "--output_name", "x"))
    assert code == 130 and not (tmp_path / "cut" / "x.safetensors").exists()
    state = tmp_path / "cut" / "x-step00000002-state"
    assert state.is_dir()
    monkeypatch.setattr(LoRATrainer, "after_step", original)
    _, code = run_trainer(train_args(setup, tmp_path / "cut", "--output_name", "x", "--resume", str(state)))
    assert code == 0
    a, b = lora_tensors(tmp_path / "ref" / "x.safetensors"), lora_tensors(tmp_path / "cut" / "x.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_with_the_step_named(setup, tmp_path, monkeypatch, capsys):
    from library.training.loss import FluxLossComputer

    original = FluxLossComputer.__call__
    calls = []

    def poisoned(self, batch, **kw):
        calls.append(1)
        loss = original(self, batch, **kw)
        return loss * float("nan") if len(calls) == 4 else loss

    monkeypatch.setattr(FluxLossComputer, "__call__", poisoned)
    code = cli.main(train_args(setup, tmp_path, "--save_every_n_steps", "2", "--output_name", "n"))
    err = capsys.readouterr().err
    assert code == 2 and "loss became nan at step 4" in err and "n-step00000002.safetensors" in err
    assert (tmp_path / "n-step00000002.safetensors").exists() and not (tmp_path / "n.safetensors").exists()


def test_bad_dataset_fails_before_models_load(setup, tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[datasets]]\nresolution = 32\n[[datasets.subsets]]\nimage_dir = "/nonexistent"\n')
    argv = train_args(setup, tmp_path)
    argv[argv.index("--dataset_config") + 1] = str(bad)
    argv[argv.index("--pretrained_model_name_or_path") + 1] = "/also/missing.safetensors"
    (tmp_path / "n-state").mkdir()  # a run killed while saving left its temporaries; start-up removes them
    stale = [tmp_path / f".n.safetensors.flux-tmp-{dead_pid()}-abcdefgh.tmp",
             tmp_path / "n-state" / f".train_state.json.flux-tmp-{dead_pid()}-abcdefgh.tmp"]
    for p in stale:
        p.write_text("half")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "/nonexistent" in err and "missing.safetensors" not in err
    assert not any(p.exists() for p in stale)


def test_unimplemented_options_are_refused_not_ignored(setup, tmp_path, capsys):
    assert cli.main(train_args(setup, tmp_path, "--face_crop_aug_range", "2,4")) == 2
    err = capsys.readouterr().err
    assert "--face_crop_aug_range" in err and "not supported yet" in err
    # the dataset TOML key too
    models, toml = setup
    with_face_crop = tmp_path / "face.toml"
    with_face_crop.write_text(toml.read_text().replace(
        "[[datasets.subsets]]", "[[datasets.subsets]]\n  face_crop_aug_range = [2.0, 4.0]", 1))
    assert cli.main(train_args((models, with_face_crop), tmp_path)) == 2
    assert "face_crop_aug_range: face-crop augmentation is not implemented" in capsys.readouterr().err


def test_validation_loss_tensorboard_and_fp8_base(setup, tmp_path):
    trainer, code = run_trainer(train_args(setup, tmp_path, "--validation_split", "0.5",
                                           "--validate_every_n_steps", "2", "--logging_dir", str(tmp_path / "logs"),
                                           "--fp8_base", "--mixed_precision", "bf16", "--network_train_unet_only"))
    assert code == 0
    assert trainer.val_group is not None and len(trainer.val_group.items) == 1
    assert trainer.models.flux.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
    first = trainer.validate("step")
    assert first == trainer.validate("step")  # fixed sigmas and seeded noise: the same number every time
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*"))


@pytest.mark.slow
def test_two_processes_train_identical_weights_and_only_rank0_writes(setup, tmp_path):
    """Two CPU ranks through `accelerate launch` (gloo): each sees half of every epoch, gradients are averaged."""
    argv = train_args(setup, tmp_path / "out", "--output_name", "dist", "--save_every_n_steps", "2",
                      "--network_train_unet_only")
    a, b = cli_runs.launch_two_ranks(tmp_path, argv, port=29517)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["dist-step00000002.safetensors", "dist-step00000004.safetensors", "dist.safetensors"]
    final = load_file(str(tmp_path / "out" / "dist.safetensors"))
    assert torch.equal(final["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"],
                       a["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"])


def test_a_moved_dataset_trains_the_same_lora(setup, tmp_path):
    """The same images and seed in another folder give bit-identical weights (issue 14, defect 9: the posterior
    sample of cached latents was seeded from the absolute image path)."""
    models, _ = setup
    weights = []
    for folder in (tmp_path / "a", tmp_path / "somewhere" / "else"):
        toml = make_demo_dataset(folder / "data", count=2, size=32)
        _, code = run_trainer([*run_args(models, toml, folder / "out"), "--network_module", "networks.lora_flux",
                               "--network_dim", "4", "--learning_rate", "1e-2", "--max_train_steps", "2",
                               "--network_train_unet_only", "--cache_latents", "--cache_latents_to_disk"])
        assert code == 0
        weights.append(lora_tensors(folder / "out" / "last.safetensors"))
    a, b = weights
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
