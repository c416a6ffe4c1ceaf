"""The memory planner's figures for docs/benchmarks.md: prediction table, card sizes, CPU check (no GPU needed).

    python bench/bench_memory_plan.py proof    # planner vs a real CPU step (tiny and small presets), ~1 min
    python bench/bench_memory_plan.py cards    # sd-scripts' 24/16/12/10/8 GB rows and our configs/, ~5 min
    python bench/bench_memory_plan.py table    # same as tools/plan_memory.py --table for FLUX.1-dev, ~3-8 min
    python bench/bench_memory_plan.py floor    # the 4 and 6 GB configs: parts in 10^9 bytes, modelled step, ~2 min

Each part prints Markdown. Everything runs on the CPU: predictions on `meta` tensors, the check with real ones.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from library.models.transformer import FLUX_PRESETS  # noqa: E402
from library.planner.plan import GIB, PlanSettings, plan_many, plan_memory  # noqa: E402

SMALL = replace(FLUX_PRESETS["dev"], vec_in_dim=256, context_in_dim=256, hidden_size=512, num_heads=4, depth=2,
                depth_single_blocks=4)
# The LoRA settings of sd-scripts' FLUX.1 guide: rank 16, AdamW8bit, gradient checkpointing, cached text-encoder
# outputs and latents, 1024x1024; its memory table assumes --fp8_base (peers.md 3.2).
LORA = PlanSettings(network_dim=16, network_alpha=16.0, optimizer_type="AdamW8bit", fp8_base=True,
                    mixed_precision="bf16", gradient_checkpointing=True, cache_text_encoder_outputs=True,
                    cache_latents=True, width=1024, height=1024)
SD_SCRIPTS_ROWS = [  # (card GB, what the row says, our reading of it)
    (24, "standard settings (batch size 2)", dict(batch_size=2, blocks_to_swap=0)),
    (16, "batch size 1 + --blocks_to_swap (no count given; its example command uses 18)",
     dict(batch_size=1, blocks_to_swap=18)),
    (12, "--blocks_to_swap 16 + 8-bit AdamW", dict(batch_size=1, blocks_to_swap=16)),
    (10, "--blocks_to_swap 22 + fp8 T5-XXL", dict(batch_size=1, blocks_to_swap=22)),
    (8, "--blocks_to_swap 28 + fp8 T5-XXL", dict(batch_size=1, blocks_to_swap=28)),
]


def header() -> str:
    return (f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; Python "
            f"{platform.python_version()}, torch {torch.__version__}")


def proof() -> None:
    from library.planner.report import measure_cpu_step

    print(header())
    print("| preset | training | predicted peak (MiB) | measured peak (MiB) | ratio "
          "| step part predicted / measured (MiB) |")
    print("|---|---|---:|---:|---:|---:|")
    static = ("resident_base_weights", "swap_buffers", "trainable_weights", "optimizer_states", "batch_inputs")
    cases = [("tiny", FLUX_PRESETS["tiny"]), ("small", SMALL)]
    kinds = [("LoRA, AdamW8bit, checkpointing", {}),
             ("LoRA, AdamW8bit, no checkpointing", {"gradient_checkpointing": False}),
             ("full, AdamW", {"trainer": "full", "optimizer_type": "AdamW"}),
             ("full, Adafactor + fused backward", {"trainer": "full", "optimizer_type": "Adafactor",
                                                   "fused_backward_pass": True})]
    combined = "LoRA, AdamW8bit, fp8, swap + offloaded checkpoints"
    kinds.append((combined, {"fp8_base": True, "cpu_offload_checkpointing": True}))
    for name, params in cases:
        for label, kw in kinds:
            if label == combined:  # the tiny preset's 2 + 2 blocks cannot swap: 4 + 4 can swap 2, small swaps 1
                params = replace(params, depth=4, depth_single_blocks=4) if name == "tiny" else params
                kw = {**kw, "blocks_to_swap": 2 if name == "tiny" else 1}
            s = PlanSettings(model=name, params=params, width=256, height=256, t5_tokens=64, mixed_precision="no",
                             target="cpu", **kw)
            plan, m = plan_memory(s), measure_cpu_step(s)
            fixed = sum(plan.parts[k] for k in static)
            print(f"| {name} | {label} | {plan.peak_bytes / 2**20:.2f} | {m['peak_bytes'] / 2**20:.2f} | "
                  f"{plan.peak_bytes / m['peak_bytes']:.3f} | {(plan.peak_bytes - fixed) / 2**20:.2f} / "
                  f"{(m['peak_bytes'] - m['before_step_bytes']) / 2**20:.2f} |")


def cards() -> None:
    from library.memory.block_swap import max_blocks_to_swap

    print(header())
    print("| card | sd-scripts' row | our reading | predicted peak (GiB) | fits |")
    print("|---:|---|---|---:|---|")
    for card, says, changes in SD_SCRIPTS_ROWS:
        plan = plan_memory(replace(LORA, **changes))
        peak = plan.peak_bytes / GIB
        reading = f"fp8 base, batch {changes['batch_size']}, {changes['blocks_to_swap']} swapped"
        print(f"| {card} GB | {says} | {reading} | {peak:.2f} | {'yes' if peak <= card else 'NO'} |")
    print()
    print("smallest swap count within a budget of the card size minus 1 GiB (ours, batch 1 below 24 GB):")
    print("| card | budget (GiB) | blocks_to_swap | predicted peak (GiB) | sd-scripts' count |")
    print("|---:|---:|---:|---:|---:|")
    limit = max_blocks_to_swap(19, 38)
    for card, _, changes in SD_SCRIPTS_ROWS:
        base = replace(LORA, batch_size=changes["batch_size"])
        plans = plan_many([replace(base, blocks_to_swap=n) for n in range(limit + 1)])
        fit = next((p for p in plans if p.peak_bytes <= (card - 1) * GIB), None)
        if fit is None:
            print(f"| {card} GB | {card - 1} | none fits | {plans[-1].peak_bytes / GIB:.2f} | "
                  f"{changes['blocks_to_swap']} |")
        else:
            print(f"| {card} GB | {card - 1} | {fit.settings.blocks_to_swap} | {fit.peak_bytes / GIB:.2f} | "
                  f"{changes['blocks_to_swap']} |")


def table() -> None:
    from library.planner.report import format_table, run_table

    print(header())
    started = time.perf_counter()
    print(format_table(run_table(replace(LORA, fp8_base=False))))
    print(f"\n({time.perf_counter() - started:.0f} s)")


FLOOR_ROWS = [  # (label, settings changes): issue 19's baseline and the configs/ that go below it
    ("35 swapped (issue 19's starting point)", dict(blocks_to_swap=35)),
    ("configs/lora_flux_dev_6gb.toml: 28 swapped + offloaded checkpoints",
     dict(blocks_to_swap=28, cpu_offload_checkpointing=True)),
    ("configs/lora_flux_dev_4gb.toml: 35 swapped + offloaded checkpoints",
     dict(blocks_to_swap=35, cpu_offload_checkpointing=True)),
]


def floor() -> None:
    from library.planner.report import speed_models

    print(header())
    plans = [(label, plan_memory(replace(LORA, **changes))) for label, changes in FLOOR_ROWS]
    names = list(plans[0][1].parts)
    print("| part (GB, 10^9 bytes) | " + " | ".join(label for label, _ in plans) + " |")
    print("|---|" + "---:|" * len(plans))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{p.parts.get(name, 0) / 1e9:.3f}" for _, p in plans) + " |")
    print("| **peak** | " + " | ".join(f"**{p.peak_bytes / 1e9:.2f}**" for _, p in plans) + " |")
    print()
    print("| settings | modelled step (s) | unswapped, not offloaded (s) | slowdown | moved per step (GB) |")
    print("|---|---:|---:|---:|---:|")
    for label, changes in FLOOR_ROWS:
        s = replace(LORA, **changes)
        _, (m,) = speed_models(s, swaps=(s.blocks_to_swap,))
        print(f"| {label} | {m.step_s:.2f} | {m.unswapped_s:.2f} | {m.slowdown:.2f}x | {m.bytes_per_step / 1e9:.1f} |")


if __name__ == "__main__":
    parts = {"proof": proof, "cards": cards, "table": table, "floor": floor}
    if len(sys.argv) != 2 or sys.argv[1] not in parts:
        sys.exit(f"usage: {sys.argv[0]} {'|'.join(parts)}")
    parts[sys.argv[1]]()
