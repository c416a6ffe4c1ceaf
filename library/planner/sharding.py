"""Per-GPU memory of a multi-process run (issue 15): the one-process plan's parts, replicated or sharded the way the
run's engine (library/distributed/choice.py) keeps them on each of `num_processes` GPUs.

The model, per GPU (P: the trained parameters; "block": the largest transformer block, FSDP2's unit):

* `ddp` (several processes): full replicas, plus DDP's flat gradient buckets (25 MiB each, together as large as all
  gradients) beside the gradients unless `--ddp_gradient_as_bucket_view` makes the gradients views of them.
* `reducer` (several processes with block swapping or a fused optimizer mode): full replicas plus the buckets in
  flight (two of 25 MiB).
* `deepspeed` ZeRO-s: stage >= 1 keeps 1/N of the optimizer states (and of DeepSpeed's fp32 master weights), stage
  >= 2 also 1/N of the gradients, stage 3 also 1/N of the parameters plus the gathered working set (one block and a
  prefetch bucket) and one block's gradients before they are reduced. Stages >= 1 add DeepSpeed's contiguous reduce
  buffer (its default 5e8 elements, allocated whole whatever the model's size); ZeRO-0 flattens at most that many
  gradients at a time for its all-reduce. Under `--mixed_precision bf16|fp16` DeepSpeed
  casts the trained module to 16 bits (no autocast copies) and steps fp32 master weights, whose optimizer states
  are fp32-shaped. `--offload_optimizer_device cpu|nvme` moves the states and masters off the GPU,
  `--offload_param_device` (stage 3) the parameter shards.
* `fsdp2` (`fully_shard`, transformer blocks as units): every weight, trained or frozen (a LoRA's frozen base), 1/N;
  the gradients and states of sharded weights 1/N; two blocks unsharded in the compute dtype (the running one and the
  prefetched one) and one block's unsharded gradients in flight. A LoRA itself stays replicated. fsdp_offload_params
  moves the shards, their gradients and the optimizer states to the CPU.

Not modelled: NCCL's own buffers (a few hundred MB per process), DeepSpeed's reduce-scatter staging beyond one
bucket, and the memory of saving (gathering a full state dict on the main process).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIB = 1024**2
DDP_BUCKET_BYTES = 25 * MIB  # torch DDP's bucket_cap_mb default (its logging data: bucket_cap_bytes 26214400)
REDUCER_BUCKETS_IN_FLIGHT = 2
DEEPSPEED_REDUCE_BUCKET = int(5e8)  # elements: DeepSpeed's reduce_bucket_size default, one contiguous buffer
DEEPSPEED_PREFETCH_BUCKET = int(5e7)  # elements: stage3_prefetch_bucket_size default
ENGINES = ("single", "ddp", "reducer", "deepspeed", "fsdp2")
# parts that come and go within a step (the allocator's slack is taken on them too)
MOVING = ("gathered_parameters", "unsharded_blocks", "gradients_in_flight")


@dataclass(frozen=True)
class Layout:
    """Sizes of the rig the sharding model needs, in elements and bytes (from plan.py's rig)."""

    trained_numel: int
    trained_bytes: int
    trained_fp32: bool  # the trained weights are float32 (else 16-bit)
    block_numel: int  # the largest transformer block: FSDP2's unit, ZeRO-3's gathered working set
    fp32_state_bytes: int  # the optimizer's states on float32 copies of the trained weights (DeepSpeed's masters;
    # -1 where not needed)


def engine_of(s) -> str:
    """The engine that runs `s` (PlanSettings): `s.engine` (deepspeed, fsdp2) or, for plain data parallel, ddp /
    reducer by the options, as library.distributed.choice.make_engine decides."""
    if s.engine in ("deepspeed", "fsdp2"):
        return s.engine
    if s.num_processes <= 1:
        return "single"
    return "reducer" if s.blocks_to_swap or s.fused_backward_pass or s.blockwise_fused_optimizers else "ddp"


def label(s) -> str:
    """The engine in words: "DeepSpeed ZeRO-3 (optimizer on cpu) on 8 GPUs", "DDP on 2 GPUs", "one GPU"."""
    engine, n = engine_of(s), s.num_processes
    offload = [f"{what} on {where}" for what, where in (("optimizer", s.offload_optimizer),
                                                        ("parameters", s.offload_params)) if where]
    name = {"single": "one GPU", "ddp": "DDP", "reducer": "the overlapped reducer", "fsdp2": "FSDP2",
            "deepspeed": f"DeepSpeed ZeRO-{s.zero_stage}"}[engine]
    if offload and engine in ("deepspeed", "fsdp2"):
        name += f" ({', '.join(offload)})"
    return name if engine == "single" else f"{name} on {n} GPU{'s' if n > 1 else ''}"


def check(s) -> None:
    """The combinations the engines refuse at start-up, refused here with the same advice (ValueError)."""
    engine = engine_of(s)
    if s.num_processes < 1:
        raise ValueError(f"--num_processes {s.num_processes}: give 1 or more")
    if s.engine == "deepspeed" and s.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"--zero_stage {s.zero_stage}: one of 0, 1, 2, 3")
    if engine not in ("deepspeed", "fsdp2"):
        return
    name = "FSDP2" if engine == "fsdp2" else f"DeepSpeed ZeRO-{s.zero_stage}"
    if s.blocks_to_swap:
        raise ValueError(f"--blocks_to_swap: block swapping does not combine with {name}; use ZeRO-3 or FSDP2 "
                         "with CPU offload to save GPU memory, or plain multi-GPU (DDP) with block swapping")
    if s.fused_backward_pass or s.blockwise_fused_optimizers:
        raise ValueError(f"--fused_backward_pass / --blockwise_fused_optimizers do not combine with {name}; "
                         "drop them (sharding saves the gradient memory) or run plain multi-GPU")
    shards = engine == "fsdp2" or s.zero_stage == 3
    if shards and (s.fp8_base or s.fp8_file or s.base_quantization):
        raise ValueError(f"an fp8 or quantized base does not combine with {name} (parameter sharding); use a "
                         "bf16 base, or ZeRO-1/2 or plain multi-GPU for an fp8/quantized LoRA")
    if engine == "deepspeed" and s.zero_stage == 3 and not s.profile.trains_transformer and not s.controlnet:
        raise ValueError("LoRA training under DeepSpeed ZeRO-3 is not supported (ZeRO-3 is for full fine-tuning "
                         "and ControlNet); use ZeRO-2 or FSDP2 for LoRA")
    if engine == "deepspeed" and s.offload_params and s.zero_stage != 3:
        raise ValueError(f"--offload_param_device {s.offload_params}: DeepSpeed offloads parameters only under "
                         "ZeRO-3 (--zero_stage 3)")


def layout_of(rig, make_optimizer) -> Layout:
    """The sizes of `rig` (plan.StepRig) the model needs; `make_optimizer(params)` builds the run's optimizer (for
    the states DeepSpeed's fp32 masters get)."""
    trained = list(rig.trainable)
    numel = sum(p.numel() for p in trained)
    nbytes = sum(p.numel() * p.element_size() for p in trained)
    fp32 = all(p.dtype == torch.float32 for p in trained)
    blocks = [*rig.flux.double_blocks, *rig.flux.single_blocks]
    block = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0)
    states = _fp32_state_bytes(trained, make_optimizer) if not fp32 and rig.settings.engine == "deepspeed" else -1
    return Layout(numel, nbytes, fp32, block, states)


def _fp32_state_bytes(trained, make_optimizer) -> int:
    """The optimizer's state bytes on float32 copies of the trained weights (on `meta`: no data)."""
    masters = [torch.empty(p.shape, dtype=torch.float32, device="meta", requires_grad=True) for p in trained]
    optimizer = make_optimizer(masters)
    with torch.no_grad():
        for p in masters:
            p.grad = torch.zeros_like(p)
        optimizer.step()
    seen, total = set(), 0
    for st in optimizer.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and id(v.untyped_storage()) not in seen:
                seen.add(id(v.untyped_storage()))
                total += v.untyped_storage().nbytes()
    return total


def _size(dtype_name: str) -> int:
    return 2 if dtype_name in ("bf16", "fp16") else 4


def shard_parts(s, layout: Layout, parts: dict[str, int]) -> tuple[dict[str, int], list[str]]:
    """The one-process plan's `parts` as each GPU holds them under `s`'s engine and `s.num_processes`, with notes."""
    engine, n = engine_of(s), max(s.num_processes, 1)
    out = dict(parts)
    if engine == "single":
        return out, []
    if engine == "ddp":
        out["ddp_buckets"] = 0 if s.ddp_gradient_as_bucket_view else layout.trained_bytes
        return out, [f"DDP over {n} processes: full replicas; its flat gradient buckets ({DDP_BUCKET_BYTES // MIB} MiB "
                     "each) " + ("are the gradients (--ddp_gradient_as_bucket_view)" if s.ddp_gradient_as_bucket_view
                                 else "hold a second copy of all gradients (--ddp_gradient_as_bucket_view saves it)")]
    if engine == "reducer":
        out["reducer_buckets"] = REDUCER_BUCKETS_IN_FLIGHT * DDP_BUCKET_BYTES
        return out, [f"overlapped reducer over {n} processes (block swapping or a fused mode keeps DDP out): full "
                     f"replicas, {REDUCER_BUCKETS_IN_FLIGHT} buckets of {DDP_BUCKET_BYTES // MIB} MiB in flight"]
    if engine == "deepspeed":
        return _deepspeed(s, layout, out, n)
    return _fsdp2(s, layout, out, n)


def _deepspeed(s, layout: Layout, out: dict[str, int], n: int) -> tuple[dict[str, int], list[str]]:
    stage = s.zero_stage
    half = s.mixed_precision in ("bf16", "fp16")  # DeepSpeed's 16-bit mode: module in 16 bits, fp32 masters
    trained_size = layout.trained_bytes // max(layout.trained_numel, 1)
    weight_size = 2 if half else trained_size
    weights = layout.trained_numel * weight_size
    gradients = weights  # gradients in the module's dtype
    states = out["optimizer_states"]
    if half and not layout.trained_fp32:
        states = layout.fp32_state_bytes  # the optimizer steps the fp32 masters
    masters = layout.trained_numel * 4 if half else 0
    if half:
        out["autocast_weight_copies"] = 0  # the module itself is 16-bit
        out["gradients"] = out["gradients"] * weight_size // trained_size
    shard = lambda nbytes, from_stage: nbytes // n if stage >= from_stage else nbytes  # noqa: E731
    off_opt = bool(s.offload_optimizer)
    out["optimizer_states"] = 0 if off_opt else shard(states, 1)
    if half:
        out["fp32_master_weights"] = 0 if off_opt else shard(masters, 1)
    if stage >= 2:
        out["gradients"] = gradients // n
    out["trainable_weights"] = 0 if stage == 3 and s.offload_params else shard(weights, 3)
    if stage >= 1:  # ZeRO's contiguous reduce buffer, allocated whole (stage_1_and_2.py setup_buckets, stage3.py)
        out["reduce_bucket"] = DEEPSPEED_REDUCE_BUCKET * weight_size
    elif n > 1:  # ZeRO-0 all-reduces the gradients flattened a bucket at a time
        out["reduce_bucket"] = min(DEEPSPEED_REDUCE_BUCKET, layout.trained_numel) * weight_size
    if stage == 3:
        gathered = layout.block_numel + min(DEEPSPEED_PREFETCH_BUCKET, layout.block_numel)
        out["gathered_parameters"] = gathered * weight_size
        out["gradients_in_flight"] = layout.block_numel * weight_size
    where = {"cpu": "CPU", "nvme": "NVMe"}
    notes = [f"DeepSpeed ZeRO-{stage} over {n} processes: "
             + {0: "replicas, gradients all-reduced in buckets", 1: "optimizer states sharded",
                2: "optimizer states and gradients sharded",
                3: "optimizer states, gradients and parameters sharded; one block gathered at a time plus a "
                   f"prefetch of {DEEPSPEED_PREFETCH_BUCKET:.0e} elements"}[stage]
             + (f"; a reduce buffer of {DEEPSPEED_REDUCE_BUCKET:.0e} elements (DeepSpeed's default)"
                if stage >= 1 else "")]
    if half:
        notes.append(f"DeepSpeed {s.mixed_precision}: the trained module in 16 bits, fp32 master weights and their "
                     "optimizer states in the optimizer's partition")
    if off_opt:
        notes.append(f"optimizer states and fp32 masters offloaded to {where[s.offload_optimizer]} (not counted)")
    if stage == 3 and s.offload_params:
        notes.append(f"parameter shards offloaded to {where[s.offload_params]} (not counted)")
    return out, notes


def _fsdp2(s, layout: Layout, out: dict[str, int], n: int) -> tuple[dict[str, int], list[str]]:
    compute = _size(s.mixed_precision)  # MixedPrecisionPolicy(param_dtype) from the config's mixed precision
    offload = s.offload_params
    trains_base = s.profile.trains_transformer
    out["resident_base_weights"] = 0 if offload else out["resident_base_weights"] // n
    out["autocast_weight_copies"] = 0  # the unsharded parameters are already in the compute dtype
    if trains_base or s.controlnet:  # the trained module is sharded; a LoRA stays replicated
        out["trainable_weights"] = 0 if offload else layout.trained_bytes // n
        out["gradients"] = 0 if offload else layout.trained_bytes // n
        out["optimizer_states"] = 0 if offload else out["optimizer_states"] // n
        out["gradients_in_flight"] = layout.block_numel * compute
    out["unsharded_blocks"] = 2 * layout.block_numel * compute
    notes = [f"FSDP2 over {n} processes, transformer blocks as units: weights, gradients and optimizer states "
             f"sharded 1/{n}" + ("" if trains_base or s.controlnet else " (the frozen base; the LoRA replicated)")
             + "; two blocks unsharded (running and prefetched) and one block's gradients in flight"]
    if offload:
        notes.append("fsdp_offload_params: parameter shards, their gradients and optimizer states on the CPU "
                     "(not counted)")
    return out, notes
