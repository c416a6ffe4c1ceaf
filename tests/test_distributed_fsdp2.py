"""FSDP2 (library/distributed/fsdp2.py) on 2 CPU processes: `accelerate launch --config_file
tests/accelerate_fsdp2_cpu.yaml` with ACCELERATE_USE_CPU=1 (gloo), the way users launch it; tests/fsdp2_job.py reports
what each rank saw of the engine. Two processes must train exactly what one process trains with
--gradient_accumulation_steps 2 (the batches' noise is seeded by their global position), so the saved files are
compared with such a run. Refusals are checked in process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from cli_runs import rendered_latents, run_args, run_trainer
from library.distributed import choice, sharded_optimizer
from library.distributed.engine import EngineError
from library.distributed.fsdp2 import FSDP2Engine, accelerator_kwargs, fsdp_settings
from tools.make_demo_dataset import make_controlnet_demo_dataset, make_demo_dataset
from tools.make_tiny_models import make_tiny_models

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "tests" / "accelerate_fsdp2_cpu.yaml"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("fsdp2")
    models = make_tiny_models(base / "models")
    return models, make_demo_dataset(base / "data", count=2, size=32), make_controlnet_demo_dataset(
        base / "cn", count=2, size=32), make_demo_dataset(base / "four", count=4, size=32)


def launch(work: Path, kind: str, argv: list[str], port: int) -> list[dict]:
    """Two FSDP2 ranks through accelerate's launcher; each rank's report (tests/fsdp2_job.py)."""
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", FSDP2_JOB_TIMEOUT="240")
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG),
                        "--main_process_port", str(port), str(ROOT / "tests" / "fsdp2_job.py"), str(work), kind,
                        *argv], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads((work / f"rank{i}.json").read_text()) for i in range(2)]


def assert_sharded(facts: list[dict], trained: list[bool]) -> None:
    """FSDP2 really ran: every transformer weight a DTensor, each rank holding half of a block weight."""
    for f in facts:
        assert f["engine"] == "FSDP2Engine" and f["world"] == 2 and f["distributed_type"].endswith("MULTI_CPU")
        assert f["flux_all_dtensor"] and f["trained_dtensor"] == trained
        assert f["block_weight_local"] * 2 == f["block_weight_global"]


def assert_close(a: dict, b: dict, tol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= tol, worst


@pytest.mark.slow
def test_full_finetune_equals_one_process_resumes_from_shards_and_loads(setup, tmp_path):
    models, *_, toml = setup  # 4 images: each rank accumulates 2 micro-batches per step
    argv = [*run_args(models, toml, tmp_path / "one"), "--learning_rate", "1e-3", "--max_train_steps", "2",
            "--cache_latents", "--max_grad_norm", "0.5", "--gradient_checkpointing", "--cpu_offload_checkpointing"]
    one, code = run_trainer("full", [*argv, "--gradient_accumulation_steps", "4"])
    assert code == 0

    def out(name):
        return [*argv[:argv.index("--output_dir")], "--output_dir", str(tmp_path / name),
                *argv[argv.index("--output_dir") + 2:]]

    two = [*out("two"), "--gradient_accumulation_steps", "2"]
    facts = launch(tmp_path / "two", "full", [*two, "--save_every_n_steps", "1", "--save_state"], 29750)
    assert_sharded(facts, [True])
    # gradients reduce-scattered once per step and unit: not on the micro-batches that only accumulate
    assert all(f["reduce_scatters"] == 2 * f["units"] == 2 * 5 for f in facts)
    # the mean of the ranks' losses is the 1-process run's accumulated loss
    assert [sum(f["losses"][i] for f in facts) / 2 for i in range(2)] == pytest.approx(one.losses, abs=1e-5)
    final = load_file(str(tmp_path / "two" / "last.safetensors"))
    assert_close(load_file(str(tmp_path / "one" / "last.safetensors")), final, 1e-5)
    assert not torch.equal(final["img_in.weight"], load_file(str(models["flux"]))["img_in.weight"])

    state = tmp_path / "two" / "at-step00000001-state"
    names = sorted(p.name for p in state.iterdir())
    assert "optimizer_rank0_of_2.safetensors" in names and "optimizer_rank1_of_2.safetensors" in names
    assert not [n for n in names if n.startswith("optimizer") and n.endswith(".bin")]  # no rank-0 pickle
    launch(tmp_path / "resumed", "full", [*out("resumed"), "--gradient_accumulation_steps", "2", "--resume",
                                          str(state)], 29751)
    assert_close(final, load_file(str(tmp_path / "resumed" / "last.safetensors")), 1e-6)

    # the gathered file is a normal BFL-layout model: inference loads it, and it renders differently from the base
    trained = rendered_latents({**models, "flux": tmp_path / "two" / "last.safetensors"}, tmp_path / "render")
    assert not torch.equal(trained, rendered_latents(models, tmp_path / "base"))


@pytest.mark.slow
def test_lora_on_a_sharded_base_equals_one_process_and_validates_and_samples(setup, tmp_path):
    models, *_, toml = setup  # 4 images: 2 train, 2 validate (one per rank)
    lora = ["--learning_rate", "1e-2", "--max_train_steps", "2", "--network_module", "networks.lora_flux",
            "--network_dim", "4", "--network_train_unet_only", "--max_grad_norm", "0.5", "--validation_split", "0.5",
            "--validate_every_n_steps", "1"]
    _, code = run_trainer("network", [*run_args(models, toml, tmp_path / "one"), *lora,
                                      "--gradient_accumulation_steps", "2"])
    assert code == 0
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 32 --h 32 --s 2 --d 1\n")
    facts = launch(tmp_path / "two", "network", [*run_args(models, toml, tmp_path / "two"), *lora,
                                                 "--sample_prompts", str(prompts), "--sample_every_n_steps", "1"],
                   29752)
    assert_sharded(facts, [False])  # the frozen base sharded, the LoRA replicated
    assert all(f["reduce_scatters"] == 0 for f in facts)  # a frozen base has no gradients to reduce
    # validation ran on both ranks (one image each, sharded forwards in step) and was reduced: one value
    assert facts[0]["validation"] == facts[1]["validation"] and 0 < facts[0]["validation"] < 10
    saved = load_file(str(tmp_path / "two" / "last.safetensors"))
    assert_close(load_file(str(tmp_path / "one" / "last.safetensors")), saved, 1e-5)
    assert any(k.startswith("lora_unet_double_blocks_0_") for k in saved)
    assert len(list((tmp_path / "two" / "sample").glob("*.png"))) == 2  # rendered by both, written once
    lora_file = str(tmp_path / "two" / "last.safetensors")
    assert not torch.equal(rendered_latents(models, tmp_path / "lora", "--lora_weights", lora_file),
                           rendered_latents(models, tmp_path / "base"))


@pytest.mark.slow
def test_controlnet_trains_sharded_samples_and_saves_a_normal_file(setup, tmp_path):
    models, _, cn_toml, _ = setup
    control = next((cn_toml.parent / "conditioning").iterdir())
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a shape --w 32 --h 32 --s 2 --d 5 --cn {control}\n")
    argv = ["--learning_rate", "1e-3", "--max_train_steps", "2"]
    facts = launch(tmp_path / "two", "controlnet", [
        *run_args(models, cn_toml, tmp_path / "two"), *argv, "--sample_prompts", str(prompts),
        "--sample_every_n_steps", "2", "--save_every_n_steps", "1", "--save_state"], 29753)
    assert_sharded(facts, [True])  # the ControlNet sharded and trained, the base sharded frozen
    saved = load_file(str(tmp_path / "two" / "last.safetensors"))
    assert any(k.startswith("controlnet_blocks.") for k in saved) and "img_in.weight" in saved
    assert len(list((tmp_path / "two" / "sample").glob("*.png"))) == 1
    from library.models.controlnet_files import load_any_controlnet
    from library.models.checkpoint import analyze_checkpoint

    cn = load_any_controlnet(tmp_path / "two" / "last.safetensors", analyze_checkpoint(models["flux"]).params,
                             torch.float32, "cpu")
    assert sum(p.numel() for p in cn.parameters()) == sum(v.numel() for v in saved.values())
    step1 = load_file(str(tmp_path / "two" / "at-step00000001.safetensors"))
    assert not torch.equal(step1["controlnet_blocks.0.weight"], saved["controlnet_blocks.0.weight"])  # it trains
    # the state's gathered ControlNet goes back into the shards (each rank its part): the resumed run ends the same
    launch(tmp_path / "resumed", "controlnet", [*run_args(models, cn_toml, tmp_path / "resumed"), *argv, "--resume",
                                                str(tmp_path / "two" / "at-step00000001-state")], 29754)
    assert_close(saved, load_file(str(tmp_path / "resumed" / "last.safetensors")), 1e-6)


# --- in process: settings, refusals, state checks ------------------------------------------------------------------

def test_an_accelerate_fsdp_config_selects_fsdp2_and_accelerate_stands_aside(monkeypatch):
    environ = {"ACCELERATE_USE_FSDP": "true", "WORLD_SIZE": "2", "FSDP_RESHARD_AFTER_FORWARD": "false",
               "FSDP_OFFLOAD_PARAMS": "true"}
    assert choice.engine_kind(SimpleNamespace(deepspeed=False), environ) == "fsdp2"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert accelerator_kwargs(SimpleNamespace(), environ) == {}
    assert "ACCELERATE_USE_FSDP" not in os.environ and "ACCELERATE_USE_FSDP" not in environ
    assert fsdp_settings(environ) == fsdp_settings({"FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP",
                                                    "FSDP_OFFLOAD_PARAMS": "true"})
    assert fsdp_settings(environ).offload_params and not fsdp_settings(environ).reshard_after_forward


@pytest.mark.parametrize("environ, words", [
    ({"FSDP_SHARDING_STRATEGY": "HYBRID_SHARD"}, "HYBRID_SHARD"),
    ({"FSDP_RESHARD_AFTER_FORWARD": "NO_SHARD"}, "NO_SHARD"),
    ({"FSDP_ACTIVATION_CHECKPOINTING": "true"}, "--gradient_checkpointing"),
])
def test_unsupported_fsdp_settings_are_refused(environ, words):
    with pytest.raises(EngineError, match=words):
        fsdp_settings(environ)


def _args(**kw):
    base = dict(fused_backward_pass=False, blockwise_fused_optimizers=False, fp8_base=False, fp8_base_unet=False,
                base_quantization=None, pretrained_model_name_or_path="flux.safetensors", torch_compile=False,
                mixed_precision="bf16", full_fp16=False)
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize("option, trainer_swaps, words", [
    ({}, 4, "--blocks_to_swap.*fsdp_offload_params"),
    ({"fused_backward_pass": True}, 0, "--fused_backward_pass.*drop it"),
    ({"blockwise_fused_optimizers": True}, 0, "--blockwise_fused_optimizers"),
    ({"fp8_base": True}, 0, "--fp8_base.*bf16 base"),
    ({"base_quantization": "nf4"}, 0, "base_quantization nf4"),
    ({"pretrained_model_name_or_path": "flux-Q8.gguf"}, 0, "gguf"),
    ({"torch_compile": True}, 0, "--torch_compile"),
    ({"mixed_precision": "fp16"}, 0, "--mixed_precision bf16"),
])
def test_combinations_that_cannot_shard_are_refused_in_one_line(option, trainer_swaps, words):
    engine = FSDP2Engine(SimpleNamespace(), _args(**option))
    with pytest.raises(EngineError, match=words) as e:
        engine.check(SimpleNamespace(settings=SimpleNamespace(blocks_to_swap=trainer_swaps)))
    assert "\n" not in str(e.value)
    FSDP2Engine(SimpleNamespace(), _args()).check(SimpleNamespace(settings=SimpleNamespace(blocks_to_swap=0)))


def test_an_fp8_base_file_is_refused_before_sharding():
    from library.distributed.fsdp2 import _refuse_unshardable

    module = torch.nn.Linear(4, 4)
    _refuse_unshardable(module)
    module.weight.data = module.weight.data.to(torch.float8_e4m3fn)
    with pytest.raises(EngineError, match="weight is stored as torch.float8_e4m3fn"):
        _refuse_unshardable(module)


def test_a_sharded_state_resumes_only_with_its_world_size(tmp_path):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.step()
    sharded_optimizer.save_sharded(opt, tmp_path, 0, 1)
    sharded_optimizer.check_saved(tmp_path, 0, 1)
    with pytest.raises(EngineError, match="sharded over 1 processes, this run has 2; resume with --num_processes 1"):
        sharded_optimizer.check_saved(tmp_path, 0, 2)
    with pytest.raises(EngineError, match="not saved by an FSDP2 run"):
        sharded_optimizer.check_saved(tmp_path / "nothing", 0, 1)
    fresh = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=0.5)
    sharded_optimizer.load_sharded(fresh, tmp_path, 0, 1)  # plain tensors round-trip too (a replicated LoRA)
    assert fresh.param_groups[0]["lr"] == 0.1
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    (tmp_path / sharded_optimizer.shard_name(0, 1)).write_bytes(b"cut")
    with pytest.raises(EngineError, match="cannot be read"):
        sharded_optimizer.check_saved(tmp_path, 0, 1)


def test_one_rank_of_a_tiny_dataset_still_steps():
    """Fewer batches than processes: the rank without one repeats the epoch's first instead of training no step
    (it would wait forever in the other's next collective)."""
    from library.data.datasets import EpochBatchSampler

    class OneBatch:
        def __len__(self):
            return 1

        def epoch_order(self, epoch):
            return ["only"]

    ranks = [EpochBatchSampler(OneBatch(), process_index=r, num_processes=2) for r in range(2)]
    assert [[key for _, key, _ in s] for s in ranks] == [["only"], ["only"]]
