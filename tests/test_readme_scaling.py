"""README's "Scaling out" commands: each `accelerate launch` line parses with accelerate's launcher (its config
validated by accelerate itself) and with the trainer's own parser, and asks for no combination its engine refuses;
the planner lines parse with tools/plan_memory.py's parser."""

import importlib
import re
import shlex

from conftest import ROOT

TRAINERS = {"flux_train.py": "full", "flux_train_network.py": "network", "flux_train_control_net.py": "controlnet"}


def section_commands(title: str) -> list[list[str]]:
    """The command lines of a README section's bash blocks (continuation lines joined, comments dropped)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    section = text[start:text.index("\n## ", start + 1)]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        lines = [line for line in block.splitlines() if not line.lstrip().startswith("#")]
        commands += [shlex.split(line) for line in "\n".join(lines).replace("\\\n", " ").splitlines() if line.strip()]
    return commands


def launch(argv: list[str]):
    """(accelerate's launch arguments after its own validation, the environment it gives the trainer)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    from library.planner.settings import accelerate_environ

    args = launch_command_parser().parse_args(argv)
    if args.config_file:
        assert (ROOT / args.config_file).is_file(), args.config_file
        environ = accelerate_environ(str(ROOT / args.config_file))
        args, _, _ = _validate_launch_command(args)
    else:
        environ = {"WORLD_SIZE": str(args.num_processes or 1)}
    return args, environ


def test_scaling_out_commands_parse_and_ask_for_nothing_refused():
    from library.planner import sharding
    from library.planner.settings import settings_from_args
    from library.training.arguments import verify_training_args
    from tools.plan_memory import parse

    commands = section_commands("Scaling out")
    engines, configs, planned = [], set(), 0
    for argv in commands:
        if argv[:2] == ["python", "tools/plan_memory.py"]:
            args = parse(argv[2:])
            assert args.trainer == "full" and (args.accelerate_config or args.engines)
            planned += 1
            continue
        assert argv[:2] == ["accelerate", "launch"], argv
        largs, environ = launch(argv[2:])
        configs.add(largs.config_file)
        script = importlib.import_module(largs.training_script.removesuffix(".py"))
        args = script.setup_parser().parse_args(largs.training_script_args)
        verify_training_args(args, script.COMMAND_LINE)
        assert args.mixed_precision == "bf16"
        # the planner's settings of the run (its files need not exist: a preset and a size stand in for them)
        s = settings_from_args(replace_files(args), TRAINERS[largs.training_script], environ=environ)
        sharding.check(s)  # raises on a combination the engine refuses
        engines.append((sharding.engine_of(s), s.zero_stage, s.offload_optimizer, s.num_processes,
                        largs.num_machines or 1, largs.machine_rank or 0))
    assert planned == 2
    assert configs >= {None, *(f"configs/accelerate/{n}.yaml" for n in ("ddp_8gpu", "fsdp2_8gpu", "zero2_8gpu",
                                                                          "zero3_offload_8gpu", "multinode_2x8"))}
    assert ("single", 0, "", 1, 1, 0) in engines
    assert ("ddp", 0, "", 8, 1, 0) in engines
    assert ("fsdp2", 0, "", 8, 1, 0) in engines
    assert engines.count(("deepspeed", 2, "", 8, 1, 0)) == 2  # the config, and sd-scripts' --deepspeed arguments
    assert ("deepspeed", 3, "cpu", 8, 1, 0) in engines
    assert {e[-1] for e in engines if e[-2] == 2} == {0, 1} and all(e[3] == 16 for e in engines if e[-2] == 2)


def replace_files(args):
    import argparse

    return argparse.Namespace(**{**vars(args), "model_preset": "dev", "dataset_config": None, "resolution": "1024"})


def test_the_engine_table_names_each_case():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("\n## Scaling out\n")
    section = text[start:text.index("\n## ", start + 1)]
    header = "| Feature | 1 GPU | DDP | reducer | ZeRO-1/2 | ZeRO-3 | FSDP2 |"
    rows = section[section.index(header):].split("\n\n")[0].splitlines()[2:]
    features = [r.split("|")[1].strip() for r in rows]
    for feature in ("`--blocks_to_swap` (and `auto`)", "`--fp8_base`", "`--fused_backward_pass`",
                    "`--blockwise_fused_optimizers`", "`--gradient_checkpointing`", "`--cpu_offload_checkpointing`",
                    "sample images", "validation loss", "LoRA (`flux_train_network.py`)",
                    "full fine-tuning (`flux_train.py`)", "ControlNet (`flux_train_control_net.py`)"):
        assert feature in features
    assert all(len(r.split("|")) == 9 for r in rows)
    # the opening lines say what is supported, as the table does
    opening = text[:text.index("\n## Quick start")]
    assert "DeepSpeed" in opening and "FSDP2" in opening and "not wired in" not in opening
    assert "DeepSpeed/FSDP not yet" not in opening and "planned" not in opening.replace("planned at", "")
