"""Predict the peak GPU memory of a FLUX.1 training run before starting it (and before downloading the model).

Takes a trainer's own arguments (command line or --config_file) and runs one real training step on tensors that
hold no data (see library/planner/plan.py and docs/benchmarks.md):

    python tools/plan_memory.py --model_preset dev --resolution 1024,1024 --network_dim 16 --fp8_base \
        --mixed_precision bf16 --gradient_checkpointing --cache_text_encoder_outputs --cache_latents \
        --optimizer_type AdamW8bit --blocks_to_swap 35
    python tools/plan_memory.py --config_file configs/lora_flux_dev_8gb.toml --json
    python tools/plan_memory.py --trainer full --model_preset dev --resolution 1024 --optimizer_type adafactor \
        --fused_backward_pass --full_bf16 --mixed_precision bf16 --gradient_checkpointing --blocks_to_swap 8
    python tools/plan_memory.py ... --table      # swap counts 0/8/18/28/35, fp8 or not, 512 and 1024, LoRA and full
    python tools/plan_memory.py --config_file configs/lora_flux_dev_4gb.toml --model_preset dev   # 3.51 GB
    python tools/plan_memory.py ... --speed      # modelled cost in time of each swap count
    python tools/plan_memory.py --trainer full ... --accelerate_config configs/accelerate/zero2_8gpu.yaml  # per GPU
    python tools/plan_memory.py --trainer full ... --deepspeed --zero_stage 3 --num_processes 8
    python tools/plan_memory.py --trainer full ... --engines --num_processes 8   # DDP, ZeRO-1/2/3, FSDP2 per GPU
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.formats.command_line import ArgumentParser, positive_float, positive_int  # noqa: E402 (no torch)


def command_line(trainer: str):
    """The planned recipe's command line, by the planner's name for it."""
    from library.training.recipes import command_lines  # the tool imports torch only after parsing

    return {"network": command_lines.LORA, "full": command_lines.FULL, "controlnet": command_lines.CONTROLNET}[trainer]


def planner_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(add_help=False)
    add = p.add_argument_group("memory planner").add_argument
    add("--trainer", choices=["network", "full", "controlnet"], default="network",
        help="plan for flux_train_network.py (network, default), flux_train.py (full) or flux_train_control_net.py "
             "(controlnet)")
    add("--model_preset", default=None,
        choices=["dev", "schnell", "flex2", "tiny", "tiny-schnell", "chroma", "chroma-tiny"],
        help="plan for this model without its file (default: the header of --pretrained_model_name_or_path, "
             "else dev)")
    add("--target", choices=["cuda", "cpu"], default="cuda",
        help="device to predict for (default cuda: fused attention, CUDA runtime overhead; cpu: the CPU kernels)")
    add("--json", action="store_true", help="print one JSON object: peak_bytes, parts, settings")
    add("--table", action="store_true",
        help="print the table of --blocks_to_swap 0/8/18/28/35, bf16 or fp8 base, 512 and 1024, LoRA (with plain "
             "and with CPU-offloaded checkpoints) and full fine-tuning (Adafactor + fused backward, AdamW8bit); "
             "takes several minutes")
    add("--speed", action="store_true",
        help="print the swap speed model for --blocks_to_swap 0/8/18/28/35 (with --cpu_offload_checkpointing, the "
             "block inputs' transfers too)")
    add("--gpu_tflops", type=positive_float, default=None,
        help="compute rate of the speed model (default: see --speed)")
    add("--h2d_gbps", type=positive_float, default=None, help="pinned host-to-device GB/s of the speed model")
    add("--num_processes", type=positive_int, default=None,
        help="plan per GPU of a run on this many GPUs (all machines together; default: --accelerate_config's, else "
             "1): DDP, or with --deepspeed --zero_stage N / an FSDP --accelerate_config the sharded engine")
    add("--accelerate_config", default=None, metavar="YAML",
        help="plan for the engine and process count of this accelerate config (distributed_type DEEPSPEED: its "
             "ZeRO stage and offload; FSDP with fsdp_version 2: FSDP2 and fsdp_offload_params; MULTI_GPU: DDP)")
    add("--engines", action="store_true",
        help="print per-GPU peaks on one GPU and under DDP, ZeRO-1/2/3 (and ZeRO-3 with the optimizer on the CPU) "
             "and FSDP2 (with and without CPU offload) on --num_processes GPUs (default 8)")
    return p


def parse(argv: list[str]):
    from library.training.config_file import read_config_from_file  # after sys.path is set by main()
    from library.training.arguments import training_parser

    planner = planner_parser()
    known, rest = planner.parse_known_args(argv)
    parser = training_parser(command_line(known.trainer), description=__doc__.split("\n")[0])
    for action in planner._actions:  # one --help for both
        parser._add_action(action)
    if known.trainer == "network":
        parser.set_defaults(network_module="networks.lora_flux")  # the network the planner builds
    args = parser.parse_args(argv)
    return read_config_from_file(args, parser, argv)


def _line(plan) -> str:
    from library.planner.plan import GIB, MIB, RUNTIME_OVERHEAD, SOURCES  # torch: after parsing

    s = plan.settings
    adapter = "LoRA" if s.network_module == "networks.lora_flux" else s.network_module
    what = "full fine-tuning" if s.profile.trains_transformer else f"{adapter} rank {s.network_dim}"
    if s.controlnet:  # (layout, double, single blocks, modes, condition features)
        what = f"{s.controlnet[0]} ControlNet ({s.controlnet[1]} double / {s.controlnet[2]} single blocks)"
    base = s.base_quantization or ("fp8" if s.fp8_base or s.fp8_file else "")
    flags = [f"{s.width}x{s.height}", f"{s.reference_images} Kontext reference image(s) at that size"
             if s.reference_images else "", f"batch {s.batch_size}", f"{s.mixed_precision} mixed precision",
             f"{base} base" if base and s.profile.fp8_base else "",
             f"{s.blocks_to_swap} blocks swapped" if s.blocks_to_swap else "no block swap",
             "gradient checkpointing" if s.gradient_checkpointing else "no gradient checkpointing",
             s.optimizer_type + (" + fused backward" if s.fused_backward_pass else "")
             + (" (blockwise fused)" if s.blockwise_fused_optimizers else "")]
    from library.planner.sharding import engine_of, label

    per_gpu = "" if engine_of(s) == "single" else f" per GPU ({label(s)})"
    out = [f"predicted peak{per_gpu} on {s.target}: {plan.peak_bytes / GIB:.2f} GiB ({plan.peak_bytes / 1e9:.2f} GB) "
           f"for {s.model} {what}, " + ", ".join(f for f in flags if f)]
    for name, nbytes in plan.parts.items():
        out.append(f"  {name.replace('_', ' '):<24} {nbytes / GIB:8.3f} GiB")
    if s.target == "cuda":
        fixed = ", ".join(f"{k.replace('_', ' ')} {v / MIB:.0f} MiB" for k, v in RUNTIME_OVERHEAD.items())
        out.append(f"  runtime overhead = {fixed}, plus {SOURCES['allocator_slack']}")
        out.append(f"    sources: {SOURCES['cuda_context']}; {SOURCES['cublas_workspace']}")
    out += [f"  note: {n}" for n in plan.notes]
    out.append(f"  planned in {plan.seconds:.1f} s on meta tensors (no data)")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    from library.planner.plan import choose_blocks_to_swap, plan_memory, settings_from_args  # torch: after parsing
    from library.planner.settings import accelerate_environ
    from library.training.arguments import verify_training_args

    try:
        verify_training_args(args, command_line(args.trainer))  # the trainer's implications (*_to_disk -> caching)
        environ = accelerate_environ(args.accelerate_config) if args.accelerate_config else {}
        s = settings_from_args(args, args.trainer, args.target, environ)
        if args.blocks_to_swap == "auto":
            s = replace(s, blocks_to_swap=choose_blocks_to_swap(args, args.trainer, environ))
        if args.engines:
            from library.planner.report import format_engines, run_engines  # only with --engines

            rows = run_engines(s, args.num_processes or (s.num_processes if s.num_processes > 1 else 8))
            if args.json:
                print(json.dumps([{"engine": label, **({"refused": plan} if isinstance(plan, str)
                                                       else plan.to_json())} for label, plan in rows]))
            else:
                print(format_engines(rows))
            return 0
        if args.table:
            from library.planner.report import format_table, run_table  # only with --table

            rows = run_table(s, progress=lambda p: print(".", end="", file=sys.stderr, flush=True))
            print(file=sys.stderr)
            if args.json:
                print(json.dumps([{"training": label, **plan.to_json()} for label, plan in rows]))
            else:
                print(format_table(rows))
            return 0
        if args.speed:
            from library.planner.report import format_speed, speed_models  # only with --speed
            from library.planner.swap_speed import ASSUMPTIONS, DEFAULT_H2D_GBPS, DEFAULT_TFLOPS

            tflops, gbps = args.gpu_tflops or DEFAULT_TFLOPS, args.h2d_gbps or DEFAULT_H2D_GBPS
            flops, models = speed_models(s, tflops=tflops, h2d_gbps=gbps)
            if args.json:
                print(json.dumps({"flops": flops, "tflops": tflops, "h2d_gbps": gbps, "assumptions": ASSUMPTIONS,
                                  "models": [vars(m) | {"slowdown": m.slowdown} for m in models]}))
            else:
                print(format_speed(s, flops, models, tflops, gbps))
                if not (args.gpu_tflops or args.h2d_gbps):
                    print("assumptions: " + "; ".join(ASSUMPTIONS.values()))
            return 0
        plan = plan_memory(s)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(plan.to_json()) if args.json else _line(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
