"""The example accelerate configs in configs/accelerate/: read by accelerate's own config loader and by
`accelerate launch`'s own validation, they say what their comments say (engine, process and machine counts, ZeRO
stage and offload, FSDP version)."""

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.utils import DistributedType

from conftest import ROOT

CONFIGS = ROOT / "configs" / "accelerate"
EXPECTED = {  # file: (distributed_type, num_processes, num_machines, extra keys)
    "single_gpu.yaml": (DistributedType.NO, 1, 1, {}),
    "ddp_8gpu.yaml": (DistributedType.MULTI_GPU, 8, 1, {}),
    "fsdp2_8gpu.yaml": (DistributedType.FSDP, 8, 1, {"fsdp_config": {"fsdp_version": 2, "fsdp_offload_params": False}}),
    "zero2_8gpu.yaml": (DistributedType.DEEPSPEED, 8, 1, {"deepspeed_config": {
        "zero_stage": 2, "offload_optimizer_device": "none", "offload_param_device": "none"}}),
    "zero3_offload_8gpu.yaml": (DistributedType.DEEPSPEED, 8, 1, {"deepspeed_config": {
        "zero_stage": 3, "offload_optimizer_device": "cpu", "offload_param_device": "none",
        "zero3_save_16bit_model": True}}),
    "multinode_2x8.yaml": (DistributedType.MULTI_GPU, 16, 2, {"machine_rank": 0, "main_process_port": 29500}),
}


def test_every_example_config_is_checked():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_with_accelerates_loader_and_has_its_keys(name):
    config = load_config_from_file(str(CONFIGS / name))
    kind, processes, machines, extra = EXPECTED[name]
    assert isinstance(config, ClusterConfig)
    assert (config.distributed_type, config.num_processes, config.num_machines) == (kind, processes, machines)
    assert config.use_cpu is False and config.mixed_precision == "bf16"
    for key, value in extra.items():
        if isinstance(value, dict):
            assert {k: getattr(config, key)[k] for k in value} == value
        else:
            assert getattr(config, key) == value
    text = (CONFIGS / name).read_text(encoding="utf-8")
    assert text.startswith("# ") and "accelerate launch --config_file configs/accelerate/" + name in text


@pytest.mark.parametrize("name,extra", [(n, []) for n in sorted(EXPECTED)] + [("multinode_2x8.yaml",
                                                                               ["--machine_rank", "1"])])
def test_accelerate_launch_reads_the_config_as_the_engines_expect(name, extra):
    """What `accelerate launch --config_file` makes of each file (its validation, without starting anything): the
    engine flags library/distributed/choice.py reads through the environment accelerate exports from them."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), *extra, "flux_train.py"])
    args, _, _ = _validate_launch_command(args)
    kind, processes, machines, keys = EXPECTED[name]
    assert (args.num_processes, args.num_machines) == (processes, machines)
    assert args.use_deepspeed == (kind == DistributedType.DEEPSPEED)
    assert args.use_fsdp == (kind == DistributedType.FSDP)
    assert args.multi_gpu == (kind == DistributedType.MULTI_GPU)
    if kind == DistributedType.DEEPSPEED:
        ds = keys["deepspeed_config"]
        assert (args.zero_stage, args.offload_optimizer_device) == (ds["zero_stage"], ds["offload_optimizer_device"])
    if kind == DistributedType.FSDP:
        assert int(args.fsdp_version) == 2 and str(args.fsdp_offload_params).lower() == "false"
    if machines > 1:
        assert args.machine_rank == (1 if extra else 0) and args.main_process_ip == "10.0.0.1"
