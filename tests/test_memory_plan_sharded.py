"""The memory planner per GPU of a multi-process run (library/planner/sharding.py): DDP, the reducer, DeepSpeed
ZeRO 0-3 and FSDP2 by --num_processes, from the trainer's arguments or an accelerate config."""

import json
from dataclasses import replace

import pytest
import torch

from library.models.transformer import FLUX_PRESETS, Flux
from library.planner.plan import GIB, PlanSettings, choose_blocks_to_swap, plan_many, plan_memory
from library.planner.settings import accelerate_environ, settings_from_args
from library.planner.sharding import DDP_BUCKET_BYTES, REDUCER_BUCKETS_IN_FLIGHT, engine_of
from library.training.recipes.command_lines import FULL, LORA

TINY_DEEP = replace(FLUX_PRESETS["tiny"], depth=4, depth_single_blocks=4)
CONFIGS = "configs/accelerate"


def tiny(**kw) -> PlanSettings:
    return PlanSettings(**{"model": "test", "params": TINY_DEEP, "width": 128, "height": 128, "t5_tokens": 64,
                           "mixed_precision": "no", "trainer": "full", "optimizer_type": "AdamW", **kw})


def per_gpu(base: PlanSettings, rows: list[dict]) -> list:
    return plan_many([replace(base, **row) for row in rows])


def test_one_process_under_zero0_ddp_or_fsdp_settings_equals_the_plain_plan():
    base = tiny()
    plain, zero0, ddp1 = per_gpu(base, [{}, dict(engine="deepspeed", zero_stage=0), dict(num_processes=1)])
    assert zero0.parts == plain.parts and zero0.peak_bytes == plain.peak_bytes
    assert ddp1.parts == plain.parts and engine_of(ddp1.settings) == "single"


def test_sharded_engines_fall_per_gpu_as_processes_grow():
    base = tiny()
    counts = (1, 2, 4, 8)
    for engine in (dict(engine="deepspeed", zero_stage=3), dict(engine="fsdp2")):
        plans = per_gpu(base, [dict(engine, num_processes=n) for n in counts])
        peaks = [p.peak_bytes for p in plans]
        assert peaks == sorted(peaks, reverse=True) and len(set(peaks)) == len(peaks)
        for n, plan in zip(counts, plans):  # the shards are 1/N of the one-process bytes
            assert plan.parts["trainable_weights"] == plans[0].parts["trainable_weights"] // n
            assert plan.parts["optimizer_states"] == plans[0].parts["optimizer_states"] // n
    # at 8 processes each stage keeps less than the one below it (weights + gradients + states)
    stages = per_gpu(base, [dict(engine="deepspeed", zero_stage=z, num_processes=8) for z in range(4)])
    kept = [sum(p.parts.get(k, 0) for k in ("trainable_weights", "gradients", "optimizer_states")) for p in stages]
    assert kept == sorted(kept, reverse=True) and len(set(kept)) == 4


def test_ddp_keeps_replicas_and_its_bucket_copy_of_the_gradients():
    base = tiny()
    plain, ddp, view, swapped = per_gpu(base, [{}, dict(num_processes=2),
                                               dict(num_processes=2, ddp_gradient_as_bucket_view=True),
                                               dict(num_processes=2, blocks_to_swap=1)])
    trained = sum(p.numel() * p.element_size() for p in Flux(TINY_DEEP).parameters())
    assert engine_of(ddp.settings) == "ddp" and ddp.parts["ddp_buckets"] == trained
    assert ddp.peak_bytes - plain.peak_bytes == trained  # everything else replicated as on one GPU
    assert view.parts["ddp_buckets"] == 0 and view.peak_bytes == plain.peak_bytes
    assert engine_of(swapped.settings) == "reducer"  # block swapping keeps DDP out
    assert swapped.parts["reducer_buckets"] == REDUCER_BUCKETS_IN_FLIGHT * DDP_BUCKET_BYTES


def test_offload_moves_states_and_shards_off_the_gpu():
    base = tiny(mixed_precision="bf16", full_bf16=True)
    z3, z3_cpu, fsdp_cpu = per_gpu(base, [dict(engine="deepspeed", zero_stage=3, num_processes=4),
                                          dict(engine="deepspeed", zero_stage=3, num_processes=4,
                                               offload_optimizer="cpu"),
                                          dict(engine="fsdp2", num_processes=4, offload_params="cpu")])
    assert z3.parts["optimizer_states"] > 0 and z3.parts["fp32_master_weights"] > 0
    assert z3_cpu.parts["optimizer_states"] == z3_cpu.parts["fp32_master_weights"] == 0
    assert z3_cpu.parts["trainable_weights"] == z3.parts["trainable_weights"] > 0
    assert fsdp_cpu.parts["trainable_weights"] == fsdp_cpu.parts["gradients"] == 0
    assert fsdp_cpu.parts["optimizer_states"] == 0 and fsdp_cpu.parts["unsharded_blocks"] > 0


def test_lora_under_fsdp2_shards_the_frozen_base_and_replicates_the_lora():
    base = tiny(trainer="network", network_dim=4, optimizer_type="AdamW")
    plain, fsdp, zero2 = per_gpu(base, [{}, dict(engine="fsdp2", num_processes=4),
                                        dict(engine="deepspeed", zero_stage=2, num_processes=4)])
    assert fsdp.parts["resident_base_weights"] == plain.parts["resident_base_weights"] // 4
    for part in ("trainable_weights", "gradients", "optimizer_states"):
        assert fsdp.parts[part] == plain.parts[part]
    assert zero2.parts["resident_base_weights"] == plain.parts["resident_base_weights"]  # no engine holds the base
    assert zero2.parts["optimizer_states"] == plain.parts["optimizer_states"] // 4


@pytest.mark.parametrize("changes,match", [
    (dict(engine="deepspeed", zero_stage=2, blocks_to_swap=1), "--blocks_to_swap"),
    (dict(engine="fsdp2", fused_backward_pass=True, optimizer_type="Adafactor"), "--fused_backward_pass"),
    (dict(engine="deepspeed", zero_stage=3, trainer="network"), "LoRA training under DeepSpeed ZeRO-3"),
    (dict(engine="fsdp2", trainer="network", fp8_base=True, mixed_precision="bf16"), "fp8 or quantized base"),
    (dict(engine="deepspeed", zero_stage=2, offload_params="cpu"), "only under ZeRO-3"),
])
def test_combinations_the_engines_refuse_are_refused(changes, match):
    with pytest.raises(ValueError, match=match):
        plan_memory(replace(tiny(num_processes=2), **changes))


@pytest.mark.slow  # 18 s alone, 36 s beside other jobs
def test_12b_adamw_full_finetune_at_8_gpus_under_zero2_keeps_an_eighth_of_the_states():
    """FLUX.1-dev (11.9B trained parameters), AdamW: one GPU keeps 8 bytes of states per parameter; ZeRO-2 on 8
    GPUs 1/8 of them. Under bf16 DeepSpeed steps fp32 masters (4 bytes per parameter, also 1/8) whose AdamW states
    are fp32 even with --full_bf16."""
    base = PlanSettings(trainer="full", optimizer_type="AdamW", mixed_precision="no", width=512, height=512)
    plain, zero2 = per_gpu(base, [{}, dict(engine="deepspeed", zero_stage=2, num_processes=8)])
    with torch.device("meta"):
        trained = sum(p.numel() for p in Flux(FLUX_PRESETS["dev"]).parameters())
    assert 11.8e9 < trained < 12.0e9 and plain.parts["optimizer_states"] == 8 * trained
    assert zero2.parts["optimizer_states"] == plain.parts["optimizer_states"] // 8
    assert zero2.parts["gradients"] == 4 * trained // 8 and zero2.parts["trainable_weights"] == 4 * trained
    bf16 = replace(base, mixed_precision="bf16", full_bf16=True, engine="deepspeed", zero_stage=2, num_processes=8)
    half = plan_memory(bf16).parts
    assert half["optimizer_states"] == 8 * trained // 8 and half["fp32_master_weights"] == 4 * trained // 8
    assert half["trainable_weights"] == 2 * trained and half["autocast_weight_copies"] == 0


def test_settings_follow_the_accelerate_environment_and_config_files():
    from library.training.arguments import training_parser

    args = training_parser(FULL).parse_args(["--resolution", "64", "--optimizer_type", "AdamW"])
    assert settings_from_args(args, "full", environ={}).num_processes == 1
    s = settings_from_args(args, "full", environ=accelerate_environ(f"{CONFIGS}/zero3_offload_8gpu.yaml"))
    assert (s.engine, s.zero_stage, s.offload_optimizer, s.offload_params, s.num_processes) == \
        ("deepspeed", 3, "cpu", "", 8)
    s = settings_from_args(args, "full", environ=accelerate_environ(f"{CONFIGS}/fsdp2_8gpu.yaml"))
    assert (s.engine, s.offload_params, s.num_processes) == ("fsdp2", "", 8)
    s = settings_from_args(args, "full", environ=accelerate_environ(f"{CONFIGS}/multinode_2x8.yaml"))
    assert (engine_of(s), s.num_processes) == ("ddp", 16)
    args = training_parser(FULL).parse_args(["--resolution", "64", "--deepspeed", "--zero_stage", "1",
                                             "--offload_optimizer_device", "cpu"])
    s = settings_from_args(args, "full", environ={"WORLD_SIZE": "4"})
    assert (s.engine, s.zero_stage, s.offload_optimizer, s.num_processes) == ("deepspeed", 1, "cpu", 4)


def test_blocks_to_swap_auto_plans_per_gpu_of_a_data_parallel_run(tmp_path):
    from library.formats.safetensors_io import save_file_atomic
    from library.training.arguments import training_parser

    path = tmp_path / "flux.safetensors"
    save_file_atomic({k: v.to(torch.bfloat16) for k, v in Flux(TINY_DEEP).state_dict().items()}, path)
    argv = ["--pretrained_model_name_or_path", str(path), "--resolution", "128", "--mixed_precision", "bf16",
            "--gradient_checkpointing", "--cache_text_encoder_outputs", "--cache_latents", "--network_dim", "4",
            "--optimizer_type", "AdamW", "--t5xxl_max_token_length", "64", "--blocks_to_swap", "auto"]
    args = training_parser(LORA).parse_args(argv)
    base = PlanSettings(model=str(path), params=TINY_DEEP, width=128, height=128, t5_tokens=64, network_dim=4,
                        network_alpha=1.0, optimizer_type="AdamW", num_processes=2)
    peaks = [p.peak_bytes for p in plan_many([replace(base, blocks_to_swap=n) for n in range(3)])]
    args.vram_budget_gb = (peaks[1] + peaks[2]) / 2 / GIB  # per GPU, the reducer's buckets included
    assert choose_blocks_to_swap(args, environ={"WORLD_SIZE": "2"}) == 2
    assert choose_blocks_to_swap(args, environ={}) < 2  # one GPU: no buckets, fits earlier
    with pytest.raises(ValueError, match="does not combine with DeepSpeed ZeRO-2"):
        choose_blocks_to_swap(args, environ=accelerate_environ(f"{CONFIGS}/zero2_8gpu.yaml"))


def test_cli_plans_per_gpu_from_an_accelerate_config(capsys):
    from tools.plan_memory import main

    argv = ["--trainer", "full", "--model_preset", "tiny", "--resolution", "128", "--mixed_precision", "bf16",
            "--full_bf16", "--optimizer_type", "AdamW", "--gradient_checkpointing", "--cache_text_encoder_outputs",
            "--cache_latents"]
    assert main(argv + ["--accelerate_config", f"{CONFIGS}/zero2_8gpu.yaml", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["settings"]["engine"] == "deepspeed" and out["settings"]["num_processes"] == 8
    assert out["peak_bytes"] == sum(out["parts"].values()) and out["parts"]["reduce_bucket"] > 0
    assert main(argv + ["--deepspeed", "--zero_stage", "3", "--num_processes", "4"]) == 0
    assert "per GPU (DeepSpeed ZeRO-3 on 4 GPUs)" in capsys.readouterr().out
    assert main(argv + ["--engines"]) == 0
    table = capsys.readouterr().out
    for row in ("| one GPU | 1 |", "| DDP | 8 |", "| DeepSpeed ZeRO-2 | 8 |", "| FSDP2 | 8 |",
                "| DeepSpeed ZeRO-3, optimizer on CPU | 8 |"):
        assert row in table
    assert main(argv + ["--accelerate_config", f"{CONFIGS}/fsdp2_8gpu.yaml", "--blocks_to_swap", "1"]) == 2
    assert "block swapping does not combine with FSDP2" in capsys.readouterr().err


def test_ddp_buckets_are_what_torch_ddp_allocates(tmp_path):
    """The DDP part against DDP itself (gloo, one process: the buckets are laid out at construction whatever the
    world size): its buckets hold every gradient's bytes, and with gradient_as_bucket_view the gradients are
    views of them (no second copy)."""
    import re

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    plan = plan_memory(tiny(num_processes=2))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DDP(Flux(TINY_DEEP))
        data = ddp._get_ddp_logging_data()
        assert data["bucket_cap_bytes"] == DDP_BUCKET_BYTES
        assert sum(int(n) for n in re.findall(r"\d+", data["bucket_sizes"])) == plan.parts["ddp_buckets"]
        stack = DDP(torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)]), gradient_as_bucket_view=True)
        stack(torch.randn(2, 64)).sum().backward()
        storages = {p.grad.untyped_storage().data_ptr() for p in stack.parameters()}
        assert len(storages) == len(re.findall(r"\d+", stack._get_ddp_logging_data()["bucket_sizes"]))
    finally:
        dist.destroy_process_group()
