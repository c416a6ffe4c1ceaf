"""What the memory planner reports beyond one prediction: the --table of swap counts, the swap speed model with
the FLOPs it needs, and the check of a prediction against a real step on the CPU (tests and docs/benchmarks.md)."""

from __future__ import annotations

import gc
import importlib.util
from contextlib import contextmanager
from dataclasses import replace

import torch

from library.memory.block_swap import BlockSwapper, max_blocks_to_swap, split_blocks_to_swap
from library.planner.live_bytes import device_emulation
from library.planner.plan import (GIB, TABLE_RESOLUTIONS, TABLE_SWAPS, PlanSettings, _build_flux, build_rig,
                                  offload_to_storage, plan_many)
from library.planner.swap_speed import DEFAULT_H2D_GBPS, DEFAULT_TFLOPS, model_step


def count_flops(s: PlanSettings) -> dict[str, float]:
    """FLOPs of the step on `meta` (FlopCounterMode; a pass of its own, as the counter keeps tensors alive):
    {"step", "double_forward", "double_backward", "single_forward", "single_backward"} for one block of each
    stack. A block's forward is counted per module; its backward (with the recomputation of gradient
    checkpointing) is the step's backward-to-forward ratio times its forward: the counter's module attribution
    in backward is unreliable once gradient hooks run optimizer steps."""
    from torch.utils.flop_counter import FlopCounterMode

    rig = build_rig(replace(s, blocks_to_swap=0), "meta")
    autocast = s.weight_dtype if s.weight_dtype != torch.float32 else None
    whole, forward = FlopCounterMode(display=False, depth=3), FlopCounterMode(display=False, depth=3)
    with device_emulation(s.target, autocast), offload_to_storage():
        with forward, torch.no_grad():
            rig.loss_fn(rig.batch)
        with whole:
            rig.step()
    total = lambda counts, name: float(sum(counts.get(name, {}).values()))  # noqa: E731
    w, f = whole.get_flop_counts(), forward.get_flop_counts()
    out = {"step": total(w, "Global")}
    ratio = (out["step"] - total(f, "Global")) / max(total(f, "Global"), 1.0)
    for kind in ("double", "single"):
        out[f"{kind}_forward"] = total(f, f"Flux.{kind}_blocks.0")
        out[f"{kind}_backward"] = ratio * out[f"{kind}_forward"]
    return out


def speed_models(s: PlanSettings, swaps=TABLE_SWAPS, tflops: float | None = None, h2d_gbps: float | None = None):
    """The swap speed model (library/planner/swap_speed.py) of these settings for each count in `swaps`."""
    flops = count_flops(s)
    with torch.device("meta"):
        flux = _build_flux(s, "meta")
    kinds = {"double": list(flux.double_blocks), "single": list(flux.single_blocks)}
    block_bytes = {k: BlockSwapper(b, 0, "meta", "meta", host_to_device_only=True).block_bytes
                   for k, b in kinds.items()}
    per_block = {k: (flops[f"{k}_forward"], flops[f"{k}_backward"]) for k in kinds}
    other = flops["step"] - sum(len(kinds[k]) * sum(per_block[k]) for k in kinds)
    out = []
    limit = max_blocks_to_swap(len(kinds["double"]), len(kinds["single"]))
    for n in [n for n in swaps if n <= limit]:  # a smaller model swaps fewer
        nd, ns = split_blocks_to_swap(n, len(kinds["double"]), len(kinds["single"]))
        stacks = {"double": (len(kinds["double"]), nd, block_bytes["double"]),
                  "single": (len(kinds["single"]), ns, block_bytes["single"])}
        out.append(model_step(n, stacks, per_block, max(other, 0.0), write_back=s.profile.trains_transformer,
                              tflops=tflops or DEFAULT_TFLOPS, h2d_gbps=h2d_gbps or DEFAULT_H2D_GBPS,
                              activation_bytes=offloaded_input_bytes(s) if s.cpu_offload_checkpointing else None))
    return flops, out


def offloaded_input_bytes(s: PlanSettings) -> dict[str, int]:
    """Bytes of one block's inputs that --cpu_offload_checkpointing keeps on the host: a double block's image and
    text streams, a single block's joint stream (OFFLOADED_BLOCK_INPUTS), in the activations' dtype."""
    tokens = s.batch_size * (s.width // 16) * (s.height // 16) + s.batch_size * s.t5_tokens
    size = torch.tensor([], dtype=s.weight_dtype).element_size()
    return {"double": tokens * s.params.hidden_size * size, "single": tokens * s.params.hidden_size * size}


# --- checking the planner against a real step on the CPU -----------------------------------------------------------


@contextmanager
def _host_copies_outside_the_allocator():
    """On the CPU the device and the host are one memory. What lives in host memory on a GPU machine -- block
    swapping's storage copies, --cpu_offload_checkpointing's saved inputs -- gets memory that PyTorch's CPU
    allocator, the profiler's stand-in for the device, does not see (numpy's)."""
    import numpy as np

    from library.memory import offload_checkpoint

    def host_bytes(nbytes: int) -> torch.Tensor:
        return torch.from_numpy(np.empty(nbytes, np.uint8))

    def to_host(t: torch.Tensor) -> torch.Tensor:
        return host_bytes(t.numel() * t.element_size()).view(t.dtype).view(t.shape).copy_(t)

    saved = offload_checkpoint._HostInputs.__dict__["_to_host"], BlockSwapper._storage_buffer
    offload_checkpoint._HostInputs._to_host = staticmethod(to_host)
    BlockSwapper._storage_buffer = lambda swapper: host_bytes(swapper.block_bytes)
    try:
        yield
    finally:
        offload_checkpoint._HostInputs._to_host, BlockSwapper._storage_buffer = saved


def measure_cpu_step(s: PlanSettings) -> dict[str, int]:
    """Build the same rig on the CPU with real tensors, run one step, and read the CPU allocator's allocations and
    frees from the profiler's memory events: {"peak_bytes", "before_step_bytes"} (the peak counts everything
    allocated since the rig was built, weights and optimizer states included)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    if s.target != "cpu":
        raise ValueError("measure_cpu_step runs on the CPU: plan it with target='cpu'")
    # the profiler sees every free in the process: collect garbage first and not during the measurement, or tensors
    # of earlier work freed mid-step are counted against the rig (seen as a 1.5% low "before step" in a long run)
    gc.collect()
    gc.disable()
    try:
        with _host_copies_outside_the_allocator(), profile(activities=[ProfilerActivity.CPU],
                                                           profile_memory=True) as prof:
            rig = build_rig(s, "cpu")
            with record_function("planned_step"):
                rig.step()
            del rig
    finally:
        gc.enable()
    events = prof.profiler.kineto_results.events()
    step = next(e for e in events if e.name() == "planned_step")
    memory = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    live = peak = before = 0
    for t, nbytes in memory:
        if t < step.start_ns():
            before += nbytes
        live += nbytes
        if step.start_ns() <= t <= step.end_ns():
            peak = max(peak, live)
    return {"peak_bytes": peak, "before_step_bytes": before}


# --- the --table ----------------------------------------------------------------------------------------------------

TABLE_TRAINERS = (  # (label, settings changes); fp8 base applies to LoRA only (the full trainers train the weights)
    ("LoRA", dict(trainer="network")),
    ("LoRA, checkpoints offloaded", dict(trainer="network", cpu_offload_checkpointing=True)),
    # bypass mode: what --fp8_base needs with lycoris (without it lycoris also rebuilds every full weight per call)
    ("LoKr (lycoris.kohya, factor 16, bypass)", dict(trainer="network", network_module="lycoris.kohya",
                                                     network_args=["algo=lokr", "factor=16", "bypass_mode=True"])),
    ("full, Adafactor + fused backward", dict(trainer="full", optimizer_type="Adafactor", optimizer_args=[
        "scale_parameter=False", "relative_step=False", "warmup_init=False"], fused_backward_pass=True,
        full_bf16=True, fp8_base=False)),
    ("full, AdamW8bit", dict(trainer="full", optimizer_type="AdamW8bit", optimizer_args=[], full_bf16=True,
                             fused_backward_pass=False, fp8_base=False)),
)


# frozen-base storage the LoRA rows are planned for (--fp8_base, --base_quantization, GGUF files)
TABLE_BASES = ("bf16", "fp8", "fp8_scaled", "int8", "nf4", "gguf_q8_0", "gguf_q4_k")


def base_label(s: PlanSettings) -> str:
    return s.base_quantization or ("fp8" if s.fp8_base else "bf16")


def _bases(profile, every_base: bool) -> list[dict]:
    if not profile.fp8_base:  # the full trainers train the weights: no quantized base
        return [dict(fp8_base=False, base_quantization="")]
    names = TABLE_BASES if every_base else ("bf16", "fp8")  # the other LoRA rows: the two common bases
    return [dict(fp8_base=b == "fp8", base_quantization="" if b in ("bf16", "fp8") else b) for b in names]


def table_settings(base: PlanSettings) -> list[tuple[str, PlanSettings]]:
    limit = max_blocks_to_swap(base.params.depth, base.params.depth_single_blocks)
    rows = []
    for label, changes in TABLE_TRAINERS:
        if "network_module" in changes and importlib.util.find_spec(changes["network_module"].split(".")[0]) is None:
            continue  # an optional adapter package that is not installed
        profile = replace(base, trainer=changes["trainer"]).profile
        for storage in _bases(profile, every_base=label == "LoRA"):
            for res in TABLE_RESOLUTIONS:
                for n in [n for n in TABLE_SWAPS if n <= limit]:
                    s = replace(base, **{"cpu_offload_checkpointing": False, **changes, **storage},
                                width=res, height=res, blocks_to_swap=n, gradient_checkpointing=True,
                                blockwise_fused_optimizers=False)
                    rows.append((label, s))
    return rows


def format_table(rows: list[tuple[str, object]]) -> str:
    """Markdown: one row per (trainer, fp8, resolution), one column per swap count, GiB."""
    lines = ["| training | base | size | " + " | ".join(f"swap {n}" for n in TABLE_SWAPS) + " |",
             "|---|---|---|" + "---:|" * len(TABLE_SWAPS)]
    groups: dict[tuple, dict[int, float]] = {}
    for label, plan in rows:
        s = plan.settings
        key = (label, base_label(s), f"{s.width}x{s.height}")
        groups.setdefault(key, {})[s.blocks_to_swap] = plan.peak_bytes / GIB
    for (label, base, size), peaks in groups.items():
        cells = " | ".join(f"{peaks[n]:.2f}" if n in peaks else "-" for n in TABLE_SWAPS)
        lines.append(f"| {label} | {base} | {size} | {cells} |")
    return "\n".join(lines)


def run_table(base: PlanSettings, progress=None) -> list[tuple[str, object]]:
    rows = table_settings(base)
    plans = plan_many([s for _, s in rows], progress=progress)
    return [(label, plan) for (label, _), plan in zip(rows, plans)]


def format_speed(s: PlanSettings, flops: dict, models, tflops: float, h2d_gbps: float) -> str:
    lines = [f"swap speed model: {s.width}x{s.height}, batch {s.batch_size}, "
             f"{base_label(s)} base, "
             f"{'write-back' if s.profile.trains_transformer else 'host-to-device only'}"
             f"{', block inputs offloaded to the host' if s.cpu_offload_checkpointing else ''}"
             f"; {tflops:.1f} TFLOP/s compute, {h2d_gbps:.1f} GB/s pinned host-to-device",
             f"step {flops['step'] / 1e12:.1f} TFLOP; one double block {flops['double_forward'] / 1e12:.2f} forward + "
             f"{flops['double_backward'] / 1e12:.2f} backward TFLOP, one single block "
             f"{flops['single_forward'] / 1e12:.2f} + {flops['single_backward'] / 1e12:.2f}",
             "| blocks_to_swap | moved per step (GB) | transfer time (s) | modelled step (s) | slowdown |",
             "|---:|---:|---:|---:|---:|"]
    for m in models:
        lines.append(f"| {m.num_swapped} | {m.bytes_per_step / 1e9:.1f} | {m.bytes_per_step / (h2d_gbps * 1e9):.2f} | "
                     f"{m.step_s:.2f} | {m.slowdown:.2f}x |")
    return "\n".join(lines)


# --- --engines: per-GPU peaks of one run under each engine ---------------------------------------------------------

ENGINE_ROWS = (  # (label, engine fields of PlanSettings)
    ("DDP", dict(engine="")),
    ("DeepSpeed ZeRO-1", dict(engine="deepspeed", zero_stage=1)),
    ("DeepSpeed ZeRO-2", dict(engine="deepspeed", zero_stage=2)),
    ("DeepSpeed ZeRO-3", dict(engine="deepspeed", zero_stage=3)),
    ("DeepSpeed ZeRO-3, optimizer on CPU", dict(engine="deepspeed", zero_stage=3, offload_optimizer="cpu")),
    ("FSDP2", dict(engine="fsdp2")),
    ("FSDP2, fsdp_offload_params", dict(engine="fsdp2", offload_params="cpu")),
)
ENGINE_COLUMNS = (  # (header, parts summed)
    ("weights", ("resident_base_weights", "trainable_weights")),
    ("gradients", ("gradients", "gradients_in_flight", "ddp_buckets", "reducer_buckets", "reduce_bucket")),
    ("optimizer states", ("optimizer_states", "fp32_master_weights")),
    ("gathered blocks", ("gathered_parameters", "unsharded_blocks")),
)


def run_engines(base: PlanSettings, num_processes: int, progress=None) -> list[tuple[str, object]]:
    """The per-GPU plan of `base` on one GPU and under each engine of ENGINE_ROWS on `num_processes` GPUs; a row
    the engine refuses holds the refusal (str) instead of a plan."""
    from library.planner import sharding

    plain = dict(num_processes=1, engine="", zero_stage=0, offload_optimizer="", offload_params="")
    rows = [("one GPU", replace(base, **plain))]
    rows += [(label, replace(base, **{**plain, **changes, "num_processes": num_processes}))
             for label, changes in ENGINE_ROWS]
    runnable = []
    for label, s in rows:
        try:
            sharding.check(s)
            runnable.append((label, s))
        except ValueError as e:
            runnable.append((label, str(e)))
    plans = iter(plan_many([s for _, s in runnable if not isinstance(s, str)], progress=progress))
    return [(label, s if isinstance(s, str) else next(plans)) for label, s in runnable]


def format_engines(rows: list[tuple[str, object]]) -> str:
    """Markdown: one row per engine, GiB per GPU: the peak and its weight, gradient, state and gathered parts."""
    lines = ["| engine | GPUs | " + " | ".join(h for h, _ in ENGINE_COLUMNS) + " | peak per GPU |",
             "|---|---:|" + "---:|" * (len(ENGINE_COLUMNS) + 1)]
    for label, plan in rows:
        if isinstance(plan, str):
            lines.append(f"| {label} | | refused: {plan} |")
            continue
        cells = " | ".join(f"{sum(plan.parts.get(k, 0) for k in keys) / GIB:.2f}" for _, keys in ENGINE_COLUMNS)
        lines.append(f"| {label} | {plan.settings.num_processes} | {cells} | {plan.peak_bytes / GIB:.2f} |")
    return "\n".join(lines)
