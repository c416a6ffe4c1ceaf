"""Predict the peak device memory of one training step without a GPU (issue 7, the memory planner).

The trainer's own pieces run one full step -- the FLUX transformer with the chosen checkpointing, the LoRA network
or the full model as the trainable part, `FluxLossComputer` for the loss, backward, the optimizer of
`--optimizer_type` stepping with its states, and the block swapper's placement -- at the real model size on `meta`
tensors, which hold no data. `library.planner.live_bytes.LiveBytes` counts what the step allocates; weights, swap
buffers and optimizer states, which exist before the step, are counted from the tensors themselves. The same rig
runs on
the CPU with real data (`run_step(..., device="cpu")`), which is how tests check the planner against a measurement.

What cannot run on `meta` is emulated and said so: CUDA autocast and the fused attention kernels
(`live_bytes.device_emulation`), and the runtime overhead outside PyTorch's allocator (`RUNTIME_OVERHEAD`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace

import torch

from library.data.batch import Batch, TextEncoderOutputs
from library.flow.matching import FlowMatchingSettings
from library.memory import offload_checkpoint
from library.memory.block_swap import enable_flux_block_swap, max_blocks_to_swap
from library.memory.checkpointing import enable_gradient_checkpointing
from library.memory.fp8 import prepare_fp8
from library.models.checkpoint import build_transformer
from library.models.conditioned import ExtraChannelsFlux
from library.models.transformer import Flux
from library.planner import controlnet_rig, sharding
from library.planner.live_bytes import LiveBytes, device_emulation
# PlanSettings and friends live in planner/settings.py; named here too, where callers have always found them
from library.planner.settings import (ALLOCATOR_SLACK, GIB, MIB, PLANNED_RECIPES, RUNTIME_OVERHEAD,  # noqa: F401
                                      SOURCES, TABLE_RESOLUTIONS, TABLE_SWAPS, MemoryPlan, PlanSettings,
                                      settings_from_args)
from library.planner.quantized_bases import prepare_planned_quantization
from library.training.arguments import parse_network_args
from library.training.fused_optimizers import (BlockwiseOptimizers, FusedBackward, HookSettings, group_by_block,
                                               step_param)
from library.training.loss import FluxLossComputer
from library.training.optimizers import get_optimizer
from library.training.recipes.kontext import KontextFlux, reference_inputs
from library.training.recipes.lora import optimizer_groups

# --- the rig: the trainer's pieces for one step ---------------------------------------------------------------------


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor) or t.device.type == "cpu" and t.dim() == 0:
            continue
        st = t.untyped_storage()
        if id(st) not in seen:
            seen.add(id(st))
            total += st.nbytes()
    return total


def _optimizer_args(s: PlanSettings) -> argparse.Namespace:
    return argparse.Namespace(optimizer_type=s.optimizer_type, optimizer_args=s.optimizer_args, learning_rate=1e-4,
                              lr_scheduler="constant", fused_backward_pass=s.fused_backward_pass,
                              gradient_accumulation_steps=1, use_8bit_adam=False, use_lion_optimizer=False)


@contextmanager
def _quiet(name: str, level: int = logging.WARNING):
    """Planning builds many optimizers and swappers: keep their INFO lines out of the trainer's log."""
    log = logging.getLogger(name)
    previous = log.level
    log.setLevel(level)
    try:
        yield
    finally:
        log.setLevel(previous)


def _make_optimizer(s: PlanSettings, groups):
    with _quiet("library.training.optimizers"):
        _, _, optimizer = get_optimizer(_optimizer_args(s), groups)
    if hasattr(optimizer, "_get_lr") and type(optimizer).__name__ == "Adafactor":
        # Adafactor reads its relative step size with .item(); the value does not change any tensor's size.
        optimizer._get_lr = lambda group, state: 1e-3
    return optimizer


@dataclass
class StepRig:
    settings: PlanSettings
    flux: Flux
    loss_fn: object
    batch: Batch
    trainable: list
    optimizers: list  # one, or one per parameter (fused backward) / per block (blockwise fused)
    fused: bool
    frozen: list
    swappers: list = field(default_factory=list)

    def step(self, counter=None) -> torch.Tensor:
        """One training step as the loop runs it: loss, backward (with fused optimizer steps), optimizer step."""
        from contextlib import nullcontext

        phase = counter.in_phase if counter is not None else (lambda _: nullcontext())
        with phase("forward"):
            loss = self.loss_fn(self.batch)
        with phase("backward"):
            loss.backward()
        with phase("optimizer"):
            if not self.fused:
                for o in self.optimizers:
                    o.step()
                    o.zero_grad(set_to_none=True)
        return loss


def _build_flux(s: PlanSettings, device: str) -> Flux:
    fp8 = s.profile.fp8_base and (s.fp8_base or s.fp8_file)  # a recipe that trains the weights casts them
    dtype = s.weight_dtype
    if s.profile.trains_transformer:
        dtype = torch.bfloat16 if s.full_bf16 else torch.float32
    with torch.device(device):
        flux = build_transformer(s.params).to(dtype)  # Flux, or Chroma for ChromaParams
    quantization = s.base_quantization if s.profile.fp8_base else ""  # (fp8_base: the recipe keeps a frozen base)
    compute = s.weight_dtype if s.weight_dtype != torch.float32 else torch.bfloat16
    if quantization and quantization != "fp8":
        prepare_planned_quantization(flux, quantization, compute)
    elif fp8 or quantization == "fp8":
        prepare_fp8(flux, torch.float8_e4m3fn, compute)
    if s.gradient_checkpointing:
        enable_gradient_checkpointing(flux, cpu_offload=s.cpu_offload_checkpointing)
    return flux.train(s.gradient_checkpointing)


def _batch(s: PlanSettings, device: str) -> Batch:
    b, h, w = s.batch_size, s.height // 8, s.width // 8
    p = s.params
    gen = dict(device=device, dtype=torch.float32)
    mask = torch.ones(b, s.t5_tokens, device=device, dtype=torch.int64)
    latents = torch.randn(b, 16, h, w, **gen)  # drawn before the text outputs: a "cpu" rig keeps its numbers
    text = TextEncoderOutputs(l_pooled=torch.randn(b, p.vec_in_dim, **gen),
                              t5_out=torch.randn(b, s.t5_tokens, p.context_in_dim, **gen),
                              txt_ids=torch.zeros(b, s.t5_tokens, 3, **gen), t5_attn_mask=mask)
    references = torch.randn(b, s.reference_images, 16, h, w, **gen) if s.reference_images else None
    return Batch(captions=[""] * b, loss_weights=torch.ones(b, **gen), latents=latents, text_encoder_outputs=text,
                 reference_latents=references)


def build_rig(s: PlanSettings, device: str = "meta") -> StepRig:
    """The trainer's pieces for one step on `device` ("meta" to plan; "cpu" to run for real)."""
    flux = _build_flux(s, device)
    flux.requires_grad_(s.profile.trains_transformer)
    model, model_inputs = flux, None
    if s.controlnet:  # a ControlNet trained beside the frozen transformer
        cn = controlnet_rig.build_controlnet(s.controlnet, s.params, torch.bfloat16 if s.full_bf16 else torch.float32,
                                             device)
        if s.gradient_checkpointing:
            enable_gradient_checkpointing(cn)
        model, model_inputs, conditions = controlnet_rig.controlled(flux, cn.train(), s.controlnet, s.batch_size,
                                                                    s.width, s.height, device)
        trainable, (optimizers, fused) = list(cn.parameters()), _full_optimizers(s, cn)
    elif not s.profile.trains_transformer:  # a LoRA network on the frozen transformer

        with torch.device(device), _quiet("LyCORIS", logging.ERROR):  # its preset warnings concern other models
            net = importlib.import_module(s.network_module).create_network(
                1.0, s.network_dim, s.network_alpha, None, [], flux, **parse_network_args(s.network_args))
            net.apply_to([], flux, False, True)
        net.to(device)
        groups, _ = optimizer_groups(net, None, None, 1e-4)
        trainable = [p for g in groups for p in g["params"]]
        optimizers, fused = [_make_optimizer(s, groups)], False
    else:
        trainable, (optimizers, fused) = list(flux.parameters()), _full_optimizers(s, flux)
    swappers = []
    if s.blocks_to_swap:
        # the real swapper on meta/meta: its slots are the compute-side bytes, its storage copies are not
        with _quiet("library.memory.block_swap"):
            swappers = list(enable_flux_block_swap(flux, s.blocks_to_swap, device, device,
                                                   host_to_device_only=not s.profile.trains_transformer))
    settings = FlowMatchingSettings(timestep_sampling="shift", model_prediction_type="raw", guidance_scale=1.0)
    compute = s.weight_dtype
    # Fill, Canny/Depth, Flex.2, and dev under a control LoRA (the network widened its img_in): read from the model
    if not s.controlnet and flux.params.in_channels > flux.params.out_channels:
        model = ExtraChannelsFlux(flux)  # condition features per token
        model_inputs = lambda batch: {"extra_channels": torch.zeros(  # noqa: E731
            batch.latents.shape[0], (s.height // 16) * (s.width // 16), model.extra_channels, device=device)}
    if s.reference_images:  # the Kontext recipe's model: reference tokens appended, the target's prediction out
        model, model_inputs = KontextFlux(model), lambda batch: reference_inputs(batch.reference_latents)
    loss_fn = FluxLossComputer(settings, model, torch.device(device), compute, model_inputs=model_inputs)
    frozen = [p for p in flux.parameters() if not p.requires_grad]
    batch = _batch(s, device)
    if s.controlnet:  # counted with the batch's inputs
        batch.conditioning_images = conditions[0]
    rig = StepRig(s, flux, loss_fn, batch, trainable, optimizers, fused, frozen, swappers)
    _prime_optimizer_states(rig)
    return rig


def _full_optimizers(s: PlanSettings, flux: Flux):
    """The full fine-tuning optimizer as library/training/fused_optimizers.py sets it up: (optimizers, fused)."""
    named = list(flux.named_parameters())
    if s.fused_backward_pass:
        optimizer = _make_optimizer(s, [p for _, p in named])
        FusedBackward(optimizer, [p for _, p in named], HookSettings())
        return [optimizer], True
    if s.blockwise_fused_optimizers:
        blocks = group_by_block(named)
        optimizers = [_make_optimizer(s, params) for _, params in blocks]
        BlockwiseOptimizers(optimizers, [p for _, p in blocks], HookSettings())
        return optimizers, True
    return [_make_optimizer(s, [p for _, p in named])], False


def _prime_optimizer_states(rig: StepRig) -> None:
    """Create the optimizer states a steady-state step starts with (one step on zero gradients, each parameter
    stepped the way the trainer steps it)."""
    with torch.no_grad():
        for o in rig.optimizers:
            for group in o.param_groups:
                for p in group["params"]:
                    p.grad = torch.zeros_like(p)
                    if rig.fused and rig.settings.fused_backward_pass:
                        step_param(o, p, group)
                        p.grad = None
            if not (rig.fused and rig.settings.fused_backward_pass):
                o.step()
            o.zero_grad(set_to_none=True)


def optimizer_state_tensors(rig: StepRig) -> list:
    return [v for o in rig.optimizers for st in o.state.values() for v in st.values() if isinstance(v, torch.Tensor)]


# --- the prediction -------------------------------------------------------------------------------------------------


def _encoder_bytes(s: PlanSettings) -> int:
    """Text encoders and the autoencoder stay on the device when their outputs are not cached
    (train_setup.free_unneeded). The defaults are T5-XXL v1.1's encoder (24 layers of 4096/10240 and a 32128-token
    embedding), CLIP-L's text model and the FLUX AE (environment.md). fp8 T5 keeps its embedding (1/37 of it) in
    the weight dtype."""
    size = torch.tensor([], dtype=s.weight_dtype).element_size()
    total = 0
    if not s.cache_text_encoder_outputs:
        t5_fp8 = s.fp8_base and s.profile.fp8_base
        total += int(s.t5xxl_params * ((1 + size / 37) if t5_fp8 else size)) + s.clip_l_params * size
    # cached latents free the AE (their control latents too: Flex.2, Canny/Depth, diffusers ControlNets), except for
    # alimama-style inpainting ControlNets (68 condition features), whose masked targets are encoded every step
    if not s.cache_latents or s.controlnet[:1] == ("diffusers",) and s.controlnet[4] == 68:
        total += s.ae_params * size
    return total


def _step_key(s: PlanSettings) -> PlanSettings:
    """Settings whose counted step is the same: swapping in host-to-device-only mode, or with optimizers that step
    inside backward, copies into buffers that exist before the step, so the step's allocations do not depend on
    the swap count. Write-back with an optimizer after backward moves gradients to storage: counted per count.
    The engine and process count do not change one process's step (sharding.py rewrites the parts)."""
    s = replace(s, num_processes=1, engine="", zero_stage=0, offload_optimizer="", offload_params="",
                ddp_gradient_as_bucket_view=False)
    if not s.profile.trains_transformer or s.fused_backward_pass or s.blockwise_fused_optimizers:
        return replace(s, blocks_to_swap=0)
    return s


def count_step(rig: StepRig) -> dict[str, int]:
    """Run the rig's step on `meta` under the counter: live bytes by tag at the step's peak."""
    s = rig.settings
    counter = LiveBytes("meta")
    counter.ignore([*rig.flux.parameters(), *rig.flux.buffers(), *rig.trainable, *optimizer_state_tensors(rig),
                    *_leaves(rig.batch), *_swapper_tensors(rig)])
    for p in rig.trainable:  # a gradient is tagged as such once autograd has accumulated it
        p.register_post_accumulate_grad_hook(lambda param: counter.retag(param.grad, "gradients")
                                             if param.grad is not None else None)
    with ExitStack() as stack:
        autocast = s.weight_dtype if s.weight_dtype != torch.float32 else None
        stack.enter_context(device_emulation(s.target, autocast,
                                             on_cache=lambda t: counter.retag(t, "autocast_weight_copies")))
        if s.cpu_offload_checkpointing:
            stack.enter_context(offload_to_storage(counter))
        stack.enter_context(counter)
        rig.step(counter)
    return counter.peak_by_tag()


@contextmanager
def offload_to_storage(counter=None):
    """--cpu_offload_checkpointing on `meta` (library/memory/offload_checkpoint.py needs autocast and pinned memory,
    which `meta` lacks): blocks are checkpointed as usual (the same FLOPs) and the inputs it would send to the CPU
    leave `counter`'s count when one is given. Not counted: a block's inputs while that block runs forward, and
    while they come back for its backward (tens of MB at 1024x1024)."""
    import torch.utils.checkpoint

    def planned(block, args, offload):
        for i in offload:
            if counter is not None:
                counter.release(args[i])
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)

    saved = offload_checkpoint.offloaded_checkpoint
    offload_checkpoint.offloaded_checkpoint = planned
    try:
        yield
    finally:
        offload_checkpoint.offloaded_checkpoint = saved


def plan_memory(s: PlanSettings, step: dict[str, int] | None = None) -> MemoryPlan:
    """Predicted peak device memory of one training step and its parts. `step`: the counted step of settings with
    the same `_step_key` (see plan_many); run here when not given. With several processes or a sharding engine
    the parts are per GPU (library/planner/sharding.py)."""
    started = time.perf_counter()
    sharding.check(s)
    rig = build_rig(s, "meta")
    swap = _swap_accounting(rig)
    at_peak = count_step(rig) if step is None else step
    parts = {
        "resident_base_weights": swap["frozen"],
        "swap_buffers": swap["buffers"],
        "trainable_weights": swap["trainable"],
        "gradients": at_peak.get("gradients", 0),
        "optimizer_states": swap["states"],
        "activations": at_peak.get("forward", 0),
        "autocast_weight_copies": at_peak.get("autocast_weight_copies", 0),
        "largest_transient": at_peak.get("backward", 0) + at_peak.get("optimizer", 0),
        "batch_inputs": _bytes(_leaves(rig.batch)),
        "text_encoders_and_ae": _encoder_bytes(s),
    }
    notes = []
    if s.cpu_offload_checkpointing:
        notes.append("--cpu_offload_checkpointing: the block inputs wait in CPU memory; one block's inputs on "
                     "the device while it runs (tens of MB at 1024x1024) are not counted")
    if parts["text_encoders_and_ae"]:
        notes.append("text encoders / AE kept on the device (outputs not cached, or an inpainting ControlNet's masked "
                     "targets): their weights are counted, their own forward passes are not")
    if sharding.engine_of(s) != "single":
        layout = sharding.layout_of(rig, lambda params: _make_optimizer(s, params))
        parts, engine_notes = sharding.shard_parts(s, layout, parts)
        notes += engine_notes
    if s.target == "cuda":
        moving = sum(parts.get(k, 0) for k in ("gradients", "activations", "largest_transient", *sharding.MOVING))
        parts["runtime_overhead"] = sum(RUNTIME_OVERHEAD.values()) + int(moving * ALLOCATOR_SLACK)
    return MemoryPlan(s, sum(parts.values()), parts, time.perf_counter() - started, notes=notes)


def plan_many(settings: list[PlanSettings], progress=None) -> list[MemoryPlan]:
    """plan_memory for each settings, counting the step once per `_step_key`."""
    steps: dict[str, dict[str, int]] = {}
    out = []
    for s in settings:
        key = repr(_step_key(s))
        if key not in steps:
            steps[key] = count_step(build_rig(_step_key(s), "meta"))
        out.append(plan_memory(s, steps[key]))
        if progress:
            progress(out[-1])
    return out


def _swapper_tensors(rig: StepRig) -> list:
    """The swappers' slots and storage copies (allocated before the step). Write-back mode allocates gradient
    storage on the first eviction: it is created here, on the storage side, so the step does not count it."""
    out = []
    for sw in rig.swappers:
        if not sw.host_to_device_only:
            for b in sw._store:
                sw._grad_store.setdefault(b, torch.zeros(sw.block_bytes, dtype=torch.uint8, device=sw.storage))
        out += [*sw._slots, *sw._store.values(), *sw._grad_store.values()]
    return out


def _leaves(batch: Batch) -> list:
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(vars(batch)) if isinstance(t, torch.Tensor)]


def _swap_accounting(rig: StepRig) -> dict:
    """Compute-side bytes of the transformer's weights, from the block swappers when there are any: frozen weights
    resident, trainable weights resident, the swappers' slot buffers, and the optimizer states on the device."""
    s = rig.settings
    in_blocks = {id(p) for sw in rig.swappers for b in sw.blocks for p in b.parameters()}
    outside = [p for p in rig.flux.parameters() if id(p) not in in_blocks]
    frozen_out = _bytes([p for p in outside if not p.requires_grad])
    trainable_out = _bytes([p for p in outside if p.requires_grad])
    fixed = sum(sw.resident_bytes for sw in rig.swappers)
    buffers = sum(sw.buffer_bytes for sw in rig.swappers)
    if not s.profile.trains_transformer:
        lora = _bytes(rig.trainable)
        return {"frozen": frozen_out + fixed, "buffers": buffers,
                "trainable": lora, "states": _bytes(optimizer_state_tensors(rig))}
    if not rig.swappers:
        return {"frozen": 0, "buffers": 0, "trainable": _bytes(rig.trainable),
                "states": _bytes(optimizer_state_tensors(rig))}
    # Between steps the swapped-out blocks' parameters are in storage memory; an optimizer stepping after backward
    # creates and keeps their states there. Fused modes step each block in backward, while it is on the device.
    stored = {id(p) for sw in rig.swappers for b in range(sw.schedule.num_slots, sw.schedule.num_blocks)
              for p in sw.blocks[b].parameters()}
    states = [v for o in rig.optimizers for p, st in o.state.items() for v in st.values()
              if isinstance(v, torch.Tensor) and (rig.fused or id(p) not in stored)]
    return {"frozen": 0, "buffers": buffers, "trainable": trainable_out + fixed, "states": _bytes(states)}


# --- --blocks_to_swap auto ------------------------------------------------------------------------------------------


def choose_blocks_to_swap(args, trainer: str = "network", environ=None) -> int:
    """The smallest --blocks_to_swap whose predicted peak fits --vram_budget_gb (GiB), for a parsed training command
    line of the recipe the planner calls `trainer` (library/cli calls this for --blocks_to_swap auto). Logs the
    choice and the predicted peak. Under `accelerate launch` (or `environ`) with several processes, the peak is
    per GPU of the data-parallel run (the overlapped reducer's buckets included)."""
    budget = getattr(args, "vram_budget_gb", None)
    if not budget or budget <= 0:
        raise ValueError("--blocks_to_swap auto needs --vram_budget_gb G, the GPU memory to fit in GiB (e.g. 7.5 "
                         "on an 8 GB card)")
    s = settings_from_args(args, trainer, "cuda", environ)
    if s.engine:
        raise ValueError(f"--blocks_to_swap auto: block swapping does not combine with {sharding.label(s)}; plan "
                         "its per-GPU memory with tools/plan_memory.py instead")
    limit = max_blocks_to_swap(s.params.depth, s.params.depth_single_blocks)
    plans: dict[int, MemoryPlan] = {}
    steps: dict[str, dict] = {}

    def peak(n: int) -> int:
        if n not in plans:
            sn = replace(s, blocks_to_swap=n)
            key = repr(_step_key(sn))
            if key not in steps:
                steps[key] = count_step(build_rig(_step_key(sn), "meta"))
            plans[n] = plan_memory(sn, steps[key])
        return plans[n].peak_bytes

    fits = lambda n: peak(n) <= budget * GIB  # noqa: E731 (peaks fall as more blocks are swapped)
    if not fits(limit):
        raise ValueError(f"--vram_budget_gb {budget}: even --blocks_to_swap {limit} (the most) is predicted to "
                         f"need {peak(limit) / GIB:.2f} GiB; lower the resolution or batch size, or use --fp8_base")
    lo, hi = 0, limit
    while lo < hi:  # the smallest n that fits
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
    logging.getLogger(__name__).info("--blocks_to_swap auto: %d blocks, predicted peak %.2f GiB of --vram_budget_gb "
                                     "%.2f (tools/plan_memory.py shows the parts)", lo, peak(lo) / GIB, budget)
    return lo
