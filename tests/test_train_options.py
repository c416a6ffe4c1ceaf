"""flux_train_network.py options through the CLI on tiny models: each one changes what it should.

The formulas behind the options have unit tests of their own (test_flow_matching, test_optimizers, test_lora_flux);
these tests check that the command line reaches them: what the trainer builds, feeds the model, steps and saves.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import flux_train_network as cli
from library.memory.checkpointing import is_gradient_checkpointing
from library.models.transformer import Flux
from library.training.loss import FluxLossComputer
from library.training.loop import Trainer
from test_train_network import run_trainer, train_args
from tools.make_demo_dataset import make_demo_dataset
from tools.make_tiny_models import make_tiny_models


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("options")
    return make_tiny_models(base / "models"), make_demo_dataset(base / "data", count=2, size=32)


def unet_lora(path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(path)).items() if k.startswith("lora_unet_")}


def module_deltas(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """up @ down * alpha / rank per module: the weight change a loader applies."""
    out = {}
    for key, down in weights.items():
        if key.endswith(".lora_down.weight"):
            name = key[: -len(".lora_down.weight")]
            up = weights[f"{name}.lora_up.weight"].float()
            alpha = weights[f"{name}.alpha"].item()
            out[name] = up @ down.float() * (alpha / down.shape[0])
    return out


def test_full_bf16_trains_and_saves_bf16_weights(setup, tmp_path):
    trainer, code = run_trainer(train_args(setup, tmp_path, "--mixed_precision", "bf16", "--full_bf16",
                                           "--network_train_unet_only", "--max_train_steps", "2"))
    assert code == 0
    assert {p.dtype for p in trainer.network.parameters()} == {torch.bfloat16}
    saved = load_file(str(tmp_path / "last.safetensors"))
    assert saved["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].dtype == torch.bfloat16


def test_gradient_accumulation_steps_the_optimizer_every_n_batches(setup, tmp_path, monkeypatch):
    calls = []
    original = FluxLossComputer.__call__
    monkeypatch.setattr(FluxLossComputer, "__call__",
                        lambda self, batch, **kw: calls.append(1) or original(self, batch, **kw))
    trainer, code = run_trainer(train_args(setup, tmp_path, "--gradient_accumulation_steps", "2",
                                           "--max_train_steps", "2", "--network_train_unet_only"))
    assert code == 0
    assert len(calls) == 4 and len(trainer.losses) == 2 and trainer.global_step == 2


def test_gradient_checkpointing_gives_the_same_weights(setup, tmp_path):
    common = ("--network_train_unet_only", "--max_train_steps", "2")
    trainer, code = run_trainer(train_args(setup, tmp_path / "ckpt", *common, "--gradient_checkpointing"))
    assert code == 0 and is_gradient_checkpointing(trainer.models.flux)
    _, code = run_trainer(train_args(setup, tmp_path / "plain", *common))
    assert code == 0
    a, b = unet_lora(tmp_path / "ckpt" / "last.safetensors"), unet_lora(tmp_path / "plain" / "last.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_optimizer_class_args_and_learning_rates_per_part(setup, tmp_path):
    trainer, code = run_trainer(train_args(setup, tmp_path, "--optimizer_type", "torch.optim.SGD",
                                           "--optimizer_args", "momentum=0.5", "nesterov=True",
                                           "--unet_lr", "2e-3", "--text_encoder_lr", "5e-4", "--max_train_steps", "1"))
    assert code == 0
    opt = trainer.optimizer.optimizer
    assert isinstance(opt, torch.optim.SGD)
    assert {g["momentum"] for g in opt.param_groups} == {0.5} and all(g["nesterov"] for g in opt.param_groups)
    lrs = dict(zip(trainer.lr_descriptions, (g["initial_lr"] if "initial_lr" in g else g["lr"]
                                             for g in opt.param_groups)))
    assert lrs == {"textencoder": 5e-4, "unet": 2e-3} or set(lrs.values()) == {5e-4, 2e-3}, lrs


def test_scheduler_and_warmup_shape_the_logged_learning_rate(setup, tmp_path, monkeypatch):
    logged = []
    original = Trainer._log
    monkeypatch.setattr(Trainer, "_log", lambda self, values, step=None: (
        logged.append(values) if "loss/current" in values else None, original(self, values, step))[1])
    _, code = run_trainer(train_args(setup, tmp_path, "--lr_scheduler", "linear", "--lr_warmup_steps", "2",
                                     "--max_train_steps", "4", "--network_train_unet_only"))
    assert code == 0
    lrs = [v["lr/unet"] for v in logged]
    # after optimizer step s the scheduler is at s: warm-up 1/2, 2/2, then linear decay over the 2 remaining steps
    assert lrs == pytest.approx([5e-4, 1e-3, 5e-4, 0.0])


def test_max_grad_norm_bounds_the_update(setup, tmp_path):
    common = ("--optimizer_type", "torch.optim.SGD", "--learning_rate", "1", "--max_train_steps", "1",
              "--network_train_unet_only")
    _, code = run_trainer(train_args(setup, tmp_path / "clipped", *common, "--max_grad_norm", "1e-4"))
    assert code == 0
    _, code = run_trainer(train_args(setup, tmp_path / "free", *common, "--max_grad_norm", "0"))
    assert code == 0

    def up_norm(path):  # lora_up starts at zero: after one SGD step it is -lr * (clipped) gradient
        w = unet_lora(path)
        return torch.sqrt(sum((v.float() ** 2).sum() for k, v in w.items() if k.endswith("lora_up.weight")))

    assert up_norm(tmp_path / "clipped" / "last.safetensors") <= 1e-4 * 1.001
    assert up_norm(tmp_path / "free" / "last.safetensors") > 1e-3  # ~6e-3 unclipped


def test_text_encoder_only_network_alpha_and_dropout_metadata(setup, tmp_path):
    _, code = run_trainer(train_args(setup, tmp_path, "--network_train_text_encoder_only", "--network_alpha", "2",
                                     "--network_dropout", "0.1", "--max_train_steps", "1"))
    assert code == 0
    weights = load_file(str(tmp_path / "last.safetensors"))
    assert weights and all(k.startswith(("lora_te1_", "lora_te3_")) for k in weights)
    assert {v.item() for k, v in weights.items() if k.endswith(".alpha")} == {2.0}
    with safe_open(str(tmp_path / "last.safetensors"), "pt") as f:
        md = f.metadata()
    assert md["ss_network_alpha"] == "2.0" and md["ss_network_dropout"] == "0.1"


def test_network_weights_dim_from_weights_and_base_weights(setup, tmp_path):
    first = tmp_path / "first"
    _, code = run_trainer(train_args(setup, first, "--network_dim", "8", "--network_alpha", "4",
                                     "--network_train_unet_only", "--max_train_steps", "2", "--learning_rate", "1e-2"))
    assert code == 0
    trained = first / "last.safetensors"

    # continue from the file with a negligible learning rate: the dims come from the file and nothing moves
    _, code = run_trainer(train_args(setup, tmp_path / "cont", "--network_weights", str(trained),
                                     "--dim_from_weights", "--learning_rate", "1e-30", "--network_train_unet_only",
                                     "--max_train_steps", "1"))
    assert code == 0
    a, b = unet_lora(trained), unet_lora(tmp_path / "cont" / "last.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-20, rtol=1e-6)
    # a learning rate of 0 everywhere trains nothing: said before any step
    assert cli.main(train_args(setup, tmp_path / "zero", "--learning_rate", "0", "--network_train_unet_only")) == 2
    assert b["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape[0] == 8

    # --base_weights merges the file into the frozen base before training
    trainer, code = run_trainer(train_args(setup, tmp_path / "based", "--base_weights", str(trained),
                                           "--base_weights_multiplier", "0.5", "--network_train_unet_only",
                                           "--max_train_steps", "1"))
    assert code == 0
    base = load_file(str(setup[0]["flux"]))
    delta = module_deltas(a)["lora_unet_double_blocks_0_img_attn_qkv"]
    merged = trainer.models.flux.double_blocks[0].img_attn.qkv.weight.detach().float()
    torch.testing.assert_close(merged, base["double_blocks.0.img_attn.qkv.weight"] + 0.5 * delta, atol=1e-5, rtol=0)


def test_scale_weight_norms_caps_every_module(setup, tmp_path):
    _, code = run_trainer(train_args(setup, tmp_path, "--scale_weight_norms", "0.01", "--learning_rate", "5e-2",
                                     "--network_train_unet_only", "--max_train_steps", "3"))
    assert code == 0
    norms = [d.norm().item() for d in module_deltas(unet_lora(tmp_path / "last.safetensors")).values()]
    assert max(norms) <= 0.01 * 1.001 and max(norms) > 0.005  # capped, and the cap was reached


def test_model_inputs_follow_guidance_t5_length_and_mask_options(setup, tmp_path, monkeypatch):
    seen = []
    original = Flux.forward

    def spy(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, txt_attention_mask=None, **kw):
        seen.append({"guidance": guidance, "txt_len": txt.shape[1], "mask": txt_attention_mask})
        return original(self, img, img_ids, txt, txt_ids, timesteps, y, guidance, txt_attention_mask, **kw)

    monkeypatch.setattr(Flux, "forward", spy)
    _, code = run_trainer(train_args(setup, tmp_path / "a", "--guidance_scale", "2.5", "--t5xxl_max_token_length",
                                     "32", "--apply_t5_attn_mask", "--max_train_steps", "1"))
    assert code == 0
    assert torch.all(seen[-1]["guidance"] == 2.5) and seen[-1]["txt_len"] == 32
    mask = seen[-1]["mask"]
    assert mask is not None and mask.shape[-1] == 32 and 0 < mask.sum() < mask.numel()  # padding masked out

    seen.clear()
    _, code = run_trainer(train_args(setup, tmp_path / "b", "--max_train_steps", "1"))
    assert code == 0
    assert torch.all(seen[-1]["guidance"] == 3.5) and seen[-1]["mask"] is None and seen[-1]["txt_len"] == 16


def test_training_math_options_reach_the_loss(setup, tmp_path):
    trainer, code = run_trainer(train_args(
        setup, tmp_path, "--timestep_sampling", "shift", "--discrete_flow_shift", "2.0", "--sigmoid_scale", "1.5",
        "--weighting_scheme", "logit_normal", "--loss_type", "huber", "--huber_schedule", "constant", "--huber_c",
        "0.3", "--ip_noise_gamma", "0.05", "--max_train_steps", "1"))
    assert code == 0
    s = trainer.loss_fn.settings
    assert (s.timestep_sampling, s.discrete_flow_shift, s.sigmoid_scale, s.weighting_scheme, s.loss_type,
            s.huber_schedule, s.huber_c, s.ip_noise_gamma, s.model_prediction_type) == (
        "shift", 2.0, 1.5, "logit_normal", "huber", "constant", 0.3, 0.05, "raw")


def test_epoch_saves_and_save_last_n_epochs(setup, tmp_path):
    # two images, batch 1: two steps per epoch; three epochs
    _, code = run_trainer(train_args(setup, tmp_path, "--max_train_epochs", "3", "--save_every_n_epochs", "1",
                                     "--save_last_n_epochs", "1", "--output_name", "ep", "--network_train_unet_only"))
    assert code == 0
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["ep-000002.safetensors", "ep.safetensors"]
    with safe_open(str(tmp_path / "ep.safetensors"), "pt") as f:
        md = f.metadata()
    assert md["ss_epoch"] == "3" and md["ss_steps"] == "6"


# --- trackers ------------------------------------------------------------------------------------------------------

FAKE_WANDB = '''
import json, os
_LOG = os.environ["FAKE_WANDB_LOG"]
def _record(kind, **data):
    with open(_LOG, "a") as f:
        f.write(json.dumps({"kind": kind, **data}, default=str) + "\\n")
def login(key=None, **kw):
    _record("login", key=key)
class _Config:
    def update(self, values, allow_val_change=False):
        _record("config", values=values)
config = _Config()
class Image:
    def __init__(self, data, caption=None):
        self.size, self.caption = data.size, caption
    def __repr__(self):
        return f"Image({self.size}, {self.caption!r})"
class _Run:
    def log(self, values, step=None, **kw):
        _record("log", values={k: repr(v) if isinstance(v, Image) else v for k, v in values.items()}, step=step)
    def finish(self):
        _record("finish")
def init(project=None, **kw):
    _record("init", project=project, **kw)
    return _Run()
'''


def test_wandb_gets_name_login_tracker_config_losses_and_samples(setup, tmp_path):
    """Through a stand-in `wandb` package (with dist-info, as accelerate checks at import) that records every call;
    in a subprocess, since accelerate lists the installed trackers once, when it is imported."""
    import os
    import subprocess

    from conftest import ROOT

    site = tmp_path / "site"
    (site / "wandb").mkdir(parents=True)
    (site / "wandb" / "__init__.py").write_text(FAKE_WANDB)
    (site / "wandb-0.0.0.dist-info").mkdir()
    (site / "wandb-0.0.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: wandb\nVersion: 0.0.0\n")
    log = tmp_path / "wandb_calls.jsonl"
    tracker_toml = tmp_path / "trackers.toml"
    tracker_toml.write_text('[wandb]\nentity = "my-team"\ntags = ["flux"]\n')
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 32 --h 32 --s 2 --d 1\n")
    argv = train_args(setup, tmp_path / "out", "--log_with", "wandb", "--wandb_run_name", "run-1", "--wandb_api_key",
                      "secret", "--log_tracker_config", str(tracker_toml), "--log_tracker_name", "proj",
                      "--sample_prompts", str(prompts), "--sample_every_n_steps", "2", "--max_train_steps", "2",
                      "--network_train_unet_only")
    env = dict(os.environ, FAKE_WANDB_LOG=str(log), PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]))
    r = subprocess.run([sys.executable, str(ROOT / "flux_train_network.py"), *argv], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls[0]["kind"] == "login" and calls[0]["key"] == "secret"
    init = next(c for c in calls if c["kind"] == "init")
    assert (init["project"], init["name"], init["entity"], init["tags"]) == ("proj", "run-1", "my-team", ["flux"])
    logs = [c for c in calls if c["kind"] == "log"]
    assert [c["step"] for c in logs if "loss/current" in c["values"]] == [1, 2]
    images = [c for c in logs if "sample_0" in c["values"]]
    assert len(images) == 1 and images[0]["step"] == 2 and "a red circle" in images[0]["values"]["sample_0"]


def test_missing_tracker_package_and_bad_tracker_config_fail_early(setup, tmp_path, capsys, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    assert cli.main(train_args(setup, tmp_path, "--log_with", "wandb")) == 2
    assert "wandb is not installed (pip install wandb)" in capsys.readouterr().err

    bad = tmp_path / "trackers.toml"
    bad.write_text("wandb = 3\n")
    assert cli.main(train_args(setup, tmp_path, "--logging_dir", str(tmp_path / "logs"), "--log_tracker_config",
                               str(bad))) == 2
    assert "should be a table" in capsys.readouterr().err
    assert cli.main(train_args(setup, tmp_path, "--log_with", "tensorboard")) == 2
    assert "TensorBoard needs --logging_dir" in capsys.readouterr().err


def test_fp16_training_and_the_full_fp16_eps_trap(setup, tmp_path, capsys):
    trainer, code = run_trainer(train_args(setup, tmp_path / "amp", "--mixed_precision", "fp16",
                                           "--network_train_unet_only", "--max_train_steps", "2"))
    assert code == 0 and all(torch.isfinite(torch.tensor(trainer.losses)))
    # torch AdamW's default eps (1e-8) is 0 in fp16: refused with the way out, instead of NaN weights
    assert cli.main(train_args(setup, tmp_path / "full", "--mixed_precision", "fp16", "--full_fp16",
                               "--network_train_unet_only")) == 2
    assert "eps 1e-08 is 0 in fp16" in capsys.readouterr().err
    trainer, code = run_trainer(train_args(setup, tmp_path / "eps", "--mixed_precision", "fp16", "--full_fp16",
                                           "--optimizer_args", "eps=1e-4", "--network_train_unet_only",
                                           "--max_train_steps", "2"))
    assert code == 0 and {p.dtype for p in trainer.network.parameters()} == {torch.float16}
    weights = load_file(str(tmp_path / "eps" / "last.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_initial_step_starts_the_count_schedule_and_data_there(setup, tmp_path, monkeypatch):
    """--initial_step 4 --skip_until_initial_step runs steps 5..6 of the uninterrupted run: its batches and learning
    rates; without the skip flag the step count and schedule start at 4 but its epoch starts from the beginning."""
    seen, logged = [], []
    original_call, original_log = FluxLossComputer.__call__, Trainer._log
    monkeypatch.setattr(FluxLossComputer, "__call__",
                        lambda self, batch, **kw: seen.append(tuple(batch.image_keys))
                        or original_call(self, batch, **kw))
    monkeypatch.setattr(Trainer, "_log", lambda self, values, step=None: (
        logged.append(values["lr/unet"]) if "loss/current" in values else None, original_log(self, values, step))[1])
    common = ("--lr_scheduler", "cosine", "--network_train_unet_only", "--max_train_steps", "6")

    trainer, code = run_trainer(train_args(setup, tmp_path / "full", *common))
    assert code == 0
    full_batches, full_lrs = list(seen), list(logged)
    seen.clear(), logged.clear()
    trainer, code = run_trainer(train_args(setup, tmp_path / "skip", *common, "--initial_step", "4",
                                           "--skip_until_initial_step"))
    assert code == 0 and trainer.global_step == 6 and len(trainer.losses) == 2
    assert seen == full_batches[4:] and logged == pytest.approx(full_lrs[4:])
    with safe_open(str(tmp_path / "skip" / "last.safetensors"), "pt") as f:
        assert f.metadata()["ss_steps"] == "6"

    seen.clear(), logged.clear()
    trainer, code = run_trainer(train_args(setup, tmp_path / "noskip", *common, "--initial_epoch", "2"))
    assert code == 0 and trainer.global_step == 6 and len(trainer.losses) == 4  # epoch 2 starts at step 2
    assert logged == pytest.approx(full_lrs[2:]) and seen[:2] == full_batches[2:4]

    seen.clear(), logged.clear()
    _, code = run_trainer(train_args(setup, tmp_path / "mid", *common, "--initial_step", "3"))
    assert code == 0 and logged == pytest.approx(full_lrs[3:])
    assert seen[:2] == full_batches[2:4]  # step 4 is in epoch 2, which starts from its first batch (no skip)

    assert cli.main(train_args(setup, tmp_path / "bad", *common, "--initial_epoch", "4")) == 2  # step 6 of 6


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_trains_the_same_lora(setup, tmp_path, backend):
    """--torch_compile compiles each block's forward (dynamo tracing; aot_eager also traces the backward) and
    changes nothing but speed; inductor's code generation is left to GPU runs."""
    import torch._dynamo

    common = ("--network_train_unet_only", "--max_train_steps", "2", "--gradient_checkpointing")
    _, code = run_trainer(train_args(setup, tmp_path / "plain", *common))
    assert code == 0
    torch._dynamo.reset()
    trainer, code = run_trainer(train_args(setup, tmp_path / "compiled", *common, "--torch_compile",
                                           "--dynamo_backend", backend))
    assert code == 0
    flux = trainer.models.flux
    assert all(hasattr(b.forward, "_torchdynamo_orig_callable") for b in (*flux.double_blocks, *flux.single_blocks))
    a, b = unet_lora(tmp_path / "plain" / "last.safetensors"), unet_lora(tmp_path / "compiled" / "last.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    torch._dynamo.reset()


def test_loss_csv_has_one_row_per_step(setup, tmp_path):
    csv_path = tmp_path / "logs" / "loss.csv"
    _, code = run_trainer(train_args(setup, tmp_path, "--network_train_unet_only", "--max_train_steps", "3",
                                     "--loss_csv", str(csv_path)))
    assert code == 0
    lines = csv_path.read_text().splitlines()
    assert lines[0] == "step,loss,lr" and [line.split(",")[0] for line in lines[1:]] == ["1", "2", "3"]
    assert all(float(line.split(",")[1]) >= 0 for line in lines[1:])
