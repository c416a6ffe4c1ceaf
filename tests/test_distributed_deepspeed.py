"""DeepSpeed ZeRO through accelerate on 2 CPU processes (gloo) and the tiny models: each run ends with the weights of
a 1-process run with --gradient_accumulation_steps 2 (the same global batches), the engine is asserted real
(DeepSpeed's engine, ZeRO-3 parameters partitioned), the saved files load in inference, a resume from the sharded
state equals the uninterrupted run; and the combinations DeepSpeed cannot run are refused at start-up.

The first DeepSpeed run compiles a small communication extension (about 50 s, cached in TORCH_EXTENSIONS_DIR)."""

import json
import os
import subprocess
import sys
from argparse import Namespace
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import cli_runs
from cli_runs import run_args
from conftest import ROOT
from library.distributed.engine import EngineError
from library.training.errors import TrainingError
from tools.make_demo_dataset import make_controlnet_demo_dataset, make_demo_dataset
from tools.make_tiny_models import make_tiny_models

ZERO3_CONFIG = ROOT / "tests" / "accelerate_deepspeed_zero3.yaml"  # persistence threshold 0: all is partitioned
ZERO2_CONFIG = ROOT / "tests" / "accelerate_deepspeed_zero2.yaml"
PORTS = iter(range(29722, 29740))  # this file's port range (29720-29739)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("deepspeed")
    models = make_tiny_models(base / "models")
    return models, make_demo_dataset(base / "data", count=2, size=32)


def full_args(setup, out, *extra):
    return [*run_args(*setup, out), "--learning_rate", "1e-3", "--max_train_steps", "4", "--cache_latents",
            "--output_name", "r", *extra]


def lora_args(setup, out, *extra):
    return full_args(setup, out, "--network_module", "networks.lora_flux", "--network_dim", "4",
                     "--network_train_unet_only", *extra)


def launch(work, kind: str, argv: list[str], config=None):
    """tests/deepspeed_job.py on 2 CPU processes under `accelerate launch`: with `config` (an accelerate DeepSpeed
    config with use_cpu), else plain `--multi_gpu` (the argv then carries --deepspeed). ACCELERATE_USE_CPU would
    turn DeepSpeed off, so it is removed. Returns each rank's report."""
    work.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("ACCELERATE_USE_CPU", "ACCELERATE_USE_DEEPSPEED")}
    env["OMP_NUM_THREADS"] = "1"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(next(PORTS))]
    launcher += ["--config_file", str(config)] if config else [
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no"]
    r = subprocess.run([*launcher, str(ROOT / "tests" / "deepspeed_job.py"), str(work), kind, *argv],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    reports = [json.loads((work / f"rank{i}.json").read_text()) for i in range(2)]
    for report in reports:  # DeepSpeed really ran: its engine around the TrainStep, over both processes
        assert report["engine"] == "DeepSpeedEngine" and report["wrapped"] == "DeepSpeedEngine"
        assert report["distributed_type"] == "DistributedType.DEEPSPEED" and report["world"] == 2
    return reports


def assert_close(a: dict, b: dict, atol=1e-5):
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, worst


@pytest.fixture(scope="module")
def validated(setup, tmp_path_factory):
    """4 images, 2 of them for validation (the ZeRO-3 run validates every epoch: every rank runs its forwards)."""
    models, _ = setup
    toml = make_demo_dataset(tmp_path_factory.mktemp("validated"), count=4, size=32)
    toml.write_text(toml.read_text().replace("batch_size = 1", "batch_size = 1\nvalidation_split = 0.5"))
    return models, toml


@pytest.mark.slow
def test_zero3_full_fine_tuning_partitions_saves_samples_and_resumes(validated, tmp_path):
    """ZeRO-3 from an accelerate DeepSpeed config (no --deepspeed): parameters partitioned, the gathered BFL file
    equals the 1-process run and loads in inference, sample images render on both ranks without deadlock (main
    writes), and a resume from the sharded state equals the uninterrupted run."""
    setup = validated
    models, _ = setup
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 32 --h 32 --s 2 --d 1\n")
    common = ("--save_every_n_steps", "2", "--save_state", "--sample_prompts", str(prompts),
              "--sample_every_n_steps", "2", "--gradient_checkpointing")  # checkpointed blocks gather their shards
    reports = launch(tmp_path / "full", "full", full_args(setup, tmp_path / "full" / "out", *common), ZERO3_CONFIG)
    for report in reports:
        assert "ZeRO-3" in report["describe"] and report["validates"]
        assert report["local_numel"] == 0 < report["full_numel"]  # the rank holds only its partition
    out = tmp_path / "full" / "out"
    final = load_file(str(out / "r.safetensors"))
    # the same 4 global batches of 2 as 2 processes with 1 each
    _, code = cli_runs.run_trainer("full", full_args(setup, tmp_path / "one", "--gradient_accumulation_steps", "2"))
    assert code == 0
    assert_close(final, load_file(str(tmp_path / "one" / "r.safetensors")))
    assert not torch.equal(final["img_in.weight"], load_file(str(models["flux"]))["img_in.weight"])
    assert len(list((out / "sample").glob("*.png"))) == 2  # steps 2 and 4, written once
    state = out / "r-step00000002-state"
    assert (state / "pytorch_model").is_dir() and not list(state.glob("*.safetensors"))  # DeepSpeed's checkpoint

    resumed = launch(tmp_path / "resumed", "full",
                     full_args(setup, tmp_path / "resumed" / "out", "--resume", str(state)),
                     ZERO3_CONFIG)
    assert resumed[0]["global_step"] == 4 and resumed[0]["losses"] == reports[0]["losses"][2:]
    assert_close(load_file(str(tmp_path / "resumed" / "out" / "r.safetensors")), final, atol=0)

    latents = cli_runs.rendered_latents({**models, "flux": out / "r.safetensors"}, tmp_path / "render")
    assert torch.isfinite(latents).all()

    # a DeepSpeed state is refused, in one line, by a run without DeepSpeed (it has no weights file for it)
    with pytest.raises(TrainingError, match="trainable|transformer|missing"):
        cli_runs.run_trainer("full", full_args(setup, tmp_path / "plain", "--resume", str(state)))


@pytest.mark.slow
def test_zero2_full_fine_tuning_from_sd_scripts_arguments(setup, tmp_path):
    """--deepspeed --zero_stage 2 under a plain multi-process launch, with accumulation and clipping tight enough to
    act: the micro-batches accumulated up to DeepSpeed's boundary and clipped by DeepSpeed on their global norm, as one
    process with 4-fold accumulation clips them. Parameters are not partitioned in stage 2."""
    models, _ = setup
    four = (models, make_demo_dataset(tmp_path / "data", count=4, size=32))
    common = ("--max_train_steps", "2", "--max_grad_norm", "0.01")
    reports = launch(tmp_path, "full", full_args(four, tmp_path / "out", *common, "--gradient_accumulation_steps", "2",
                                                 "--deepspeed", "--zero_stage", "2"))
    assert all("ZeRO-2" in r["describe"] and r["local_numel"] == r["full_numel"] > 0 for r in reports)
    for name, extra in (("clipped", ()), ("unclipped", ("--max_grad_norm", "0"))):
        _, code = cli_runs.run_trainer("full", full_args(four, tmp_path / name, *common, *extra,
                                                         "--gradient_accumulation_steps", "4"))
        assert code == 0
    ds, clipped = (load_file(str(tmp_path / n / "r.safetensors")) for n in ("out", "clipped"))
    assert_close(ds, clipped)
    unclipped = load_file(str(tmp_path / "unclipped" / "r.safetensors"))
    assert not torch.allclose(unclipped["img_in.weight"], clipped["img_in.weight"], atol=1e-4)  # clipping acted


@pytest.mark.slow
def test_zero2_lora_equals_one_process_and_loads_in_inference(setup, tmp_path):
    """A ZeRO-2 LoRA (--deepspeed), equal to the 1-process run, loadable by flux_minimal_inference."""
    models, _ = setup
    launch(tmp_path / "ds", "network", lora_args(setup, tmp_path / "ds" / "out", "--deepspeed", "--zero_stage", "2"))
    _, code = cli_runs.run_trainer("network", lora_args(setup, tmp_path / "one", "--gradient_accumulation_steps", "2"))
    assert code == 0
    lora = tmp_path / "ds" / "out" / "r.safetensors"
    trained = load_file(str(lora))
    assert trained["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].abs().sum() > 0  # zero at the start
    assert_close(trained, load_file(str(tmp_path / "one" / "r.safetensors")))
    with_lora = cli_runs.rendered_latents(models, tmp_path / "render", "--lora_weights", str(lora))
    assert torch.isfinite(with_lora).all()


@pytest.mark.slow
def test_zero2_controlnet(tmp_path_factory, tmp_path):
    """A ControlNet under ZeRO-2 from an accelerate config with the DeepSpeed settings inline trains what one process
    trains."""
    base = tmp_path_factory.mktemp("cn")
    setup = make_tiny_models(base / "models"), make_controlnet_demo_dataset(base / "data", count=2, size=32)
    reports = launch(tmp_path / "ds", "controlnet", full_args(setup, tmp_path / "ds" / "out"), ZERO2_CONFIG)
    assert "ZeRO-2" in reports[0]["describe"]
    _, code = cli_runs.run_trainer("controlnet", full_args(setup, tmp_path / "one", "--gradient_accumulation_steps",
                                                           "2"))
    assert code == 0
    trained = load_file(str(tmp_path / "ds" / "out" / "r.safetensors"))
    assert trained["controlnet_blocks.1.weight"].abs().sum() > 0  # trained away from its zero start
    assert_close(trained, load_file(str(tmp_path / "one" / "r.safetensors")))


# --- refusals (in process, no DeepSpeed started) ---------------------------------------------------------------------

def ds_args(**overrides) -> Namespace:
    args = dict(deepspeed=True, zero_stage=2, offload_optimizer_device=None, offload_optimizer_nvme_path=None,
                offload_param_device=None, offload_param_nvme_path=None, zero3_init_flag=False,
                zero3_save_16bit_model=False, fp16_master_weights_and_gradients=False, gradient_accumulation_steps=1,
                max_grad_norm=1.0, train_batch_size=1, mixed_precision="no", fused_backward_pass=False,
                blockwise_fused_optimizers=False, fp8_base=False, base_quantization=None, optimizer_type="")
    return Namespace(**{**args, **overrides})


def checked(args, script="flux_train.py", blocks_to_swap=0):
    """DeepSpeedEngine.check on an accelerator that says DeepSpeed runs, with the plugin from `args`."""
    from accelerate.utils import DistributedType

    from library.distributed.deepspeed_engine import DeepSpeedEngine, accelerator_kwargs

    plugin = accelerator_kwargs(args)["deepspeed_plugin"]
    accelerator = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=2,
                                  state=SimpleNamespace(deepspeed_plugin=plugin))
    trainer = SimpleNamespace(settings=SimpleNamespace(blocks_to_swap=blocks_to_swap),
                              command_line=SimpleNamespace(script=script))
    engine = DeepSpeedEngine(accelerator, args)
    engine.check(trainer)
    return engine


@pytest.mark.parametrize("overrides, script, swap, message", [
    ({}, "flux_train.py", 4, "--blocks_to_swap: DeepSpeed"),
    ({"fused_backward_pass": True}, "flux_train.py", 0, "--fused_backward_pass: DeepSpeed runs the optimizer step"),
    ({"blockwise_fused_optimizers": True}, "flux_train.py", 0, "--blockwise_fused_optimizers: DeepSpeed"),
    ({"zero_stage": 3}, "flux_train_network.py", 0, "ZeRO-3 with a LoRA.*use --zero_stage 2"),
    ({"zero_stage": 3, "fp8_base": True}, "flux_train_network.py", 0, "--fp8_base.*use --zero_stage 2"),
    ({"zero_stage": 3, "offload_param_device": "nvme"}, "flux_train.py", 0, "--offload_param_nvme_path"),
    ({"offload_optimizer_device": "nvme"}, "flux_train.py", 0, "needs --offload_optimizer_nvme_path"),
    ({"offload_param_device": "cpu"}, "flux_train.py", 0, "--offload_param_device needs --zero_stage 3"),
    ({"fp16_master_weights_and_gradients": True}, "flux_train.py", 0, "works only with --mixed_precision fp16"),
    ({"optimizer_type": "AdamWScheduleFree"}, "flux_train.py", 0, "ZeRO steps the optimizer on flat copies"),
])
def test_combinations_deepspeed_cannot_run_are_refused(overrides, script, swap, message):
    with pytest.raises(EngineError, match=message):
        checked(ds_args(**overrides), script, swap)


def test_deepspeed_arguments_with_a_deepspeed_json_are_refused():
    from library.distributed.deepspeed_engine import accelerator_kwargs

    environ = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "ds.json"}
    with pytest.raises(EngineError, match=r"deepspeed_config_file \(ds.json\).*leave out --deepspeed"):
        accelerator_kwargs(ds_args(), environ)
    assert accelerator_kwargs(ds_args(deepspeed=False), environ) == {}  # the file's plugin comes from accelerate


def test_what_deepspeed_can_run_passes_and_the_plugin_follows_sd_scripts():
    engine = checked(ds_args(zero_stage=3, offload_param_device="cpu", offload_optimizer_device="cpu",
                             max_grad_norm=0.5, gradient_accumulation_steps=4, train_batch_size=3))
    assert engine.shards_parameters and engine.stage == 3
    config = engine.plugin.deepspeed_config
    assert config["gradient_clipping"] == 0.5 and config["train_micro_batch_size_per_gpu"] == 3
    assert config["gradient_accumulation_steps"] == 4
    assert config["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert not checked(ds_args(zero_stage=2), "flux_train_network.py").shards_parameters  # a ZeRO-2 LoRA is fine
    checked(ds_args(fp16_master_weights_and_gradients=True, mixed_precision="fp16", offload_optimizer_device="cpu"))


def test_a_deepspeed_checkpoint_for_other_parameters_or_processes_is_refused(tmp_path):
    """What --resume checks in a DeepSpeed checkpoint before DeepSpeed loads it (a real one passes in the ZeRO-3
    test): DeepSpeed's files of this rank present (a state saved without DeepSpeed has none), the saved parameter
    shapes against this run's, and one optimizer partition per process."""
    from library.distributed.train_step import TrainStep
    from library.training.state_check import verify_state

    folder = tmp_path / "pytorch_model"
    folder.mkdir()
    torch.save({"param_shapes": [{"trained.0.weight": torch.Size([4, 3]), "trained.0.bias": torch.Size([4])}]},
               folder / "mp_rank_00_model_states.pt")
    for rank in range(2):
        torch.save({}, folder / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    engine = checked(ds_args())
    engine.model = SimpleNamespace(_get_ckpt_name=lambda *a: "mp_rank_00_model_states.pt",
                                   _get_zero_ckpt_name=lambda *a: "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    engine.accelerator.__dict__.update(_optimizers=[object()], _schedulers=[object()], scaler=None)
    archives = engine.state_archives()
    assert archives == ["scheduler.bin", "pytorch_model/mp_rank_00_model_states.pt",
                        "pytorch_model/zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    plain = tmp_path / "plain"  # a state of a run without DeepSpeed: accelerate's files and our weights
    plain.mkdir()
    for name in ("optimizer.bin", "scheduler.bin"):
        torch.save({}, plain / name)
    (plain / "train_state.json").write_text('{"current_step": 2}')
    with pytest.raises(TrainingError, match="pytorch_model/mp_rank_00_model_states.pt: missing"):
        verify_state(plain, None, {}, None, archives, plain / "random_states_0.pkl")
    engine.step = TrainStep([torch.nn.Linear(3, 4)], None)
    engine.check_state(tmp_path)
    engine.step = TrainStep([torch.nn.Linear(3, 5)], None)
    with pytest.raises(EngineError, match=r"trained parameters differ from this run's \(bias, weight\)"):
        engine.check_state(tmp_path)
    engine.step, engine.accelerator.num_processes = TrainStep([torch.nn.Linear(3, 4)], None), 4
    with pytest.raises(EngineError, match="a DeepSpeed checkpoint of 2 process.*this run has 4"):
        engine.check_state(tmp_path)


def test_deepspeed_turned_off_by_accelerate_is_refused(setup, tmp_path, monkeypatch):
    """ACCELERATE_USE_CPU makes accelerate drop DeepSpeed silently; the run stops instead of training without it."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")  # accelerate sets it; restored after the test
    with pytest.raises(TrainingError, match="accelerate did not start it"):
        cli_runs.run_trainer("network", lora_args(setup, tmp_path, "--deepspeed"))

