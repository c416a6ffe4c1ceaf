"""Optimizer steps taken inside backward, so the whole model's gradients never exist at once (reference 10.2, 10.3).

* `--fused_backward_pass` (Adafactor): every parameter is stepped by its own post-accumulate-grad hook as soon as
  its gradient is complete, then the gradient is freed: at most one parameter's gradient is alive. Clipping
  (`--max_grad_norm`) is per tensor, as in sd-scripts. bf16 weights are written back with stochastic rounding.
* `--blockwise_fused_optimizers` (any optimizer): one optimizer and LR scheduler per transformer block
  (`double_blocks.i`, `single_blocks.i`, each other top-level module); a block is stepped when its last gradient
  arrives, so at most one block's gradients are alive. Clipping uses the block's norm (sd-scripts clips per tensor).

Both work under gradient accumulation (the hooks act only on the micro-batch that syncs; the earlier micro-batches
keep their gradients, so the memory bound holds for --gradient_accumulation_steps 1). With several processes the
distributed engine drives them (`on_gradients`): the reducer engine (library/distributed/reducer.py) hands over a
bucket of parameters once their gradients are averaged, so a parameter is stepped only after its all-reduce; the
bound is then the buckets being filled or reduced (25 MiB each) instead of one tensor or one block.

`prepare_optimizer` is what `Trainer.make_optimizer` calls: the plain optimizer, or one of the fused set-ups, with
the object the training loop steps (for fused modes only leftovers: parameters that got no gradient).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from library.distributed.grad_sync import per_parameter_hooks
from library.training.lr_schedulers import get_scheduler
from library.training.optimizers import get_optimizer

logger = logging.getLogger(__name__)


# --- grouping and rounding ----------------------------------------------------------------------------------------


def block_key(name: str) -> tuple[str, int]:
    """("double", i) for double_blocks.i.*, ("single", i) for single_blocks.i.*, (module, -1) for each other
    top-level module (img_in, final_layer...). sd-scripts puts all of those in one group, whose gradients then
    stay alive from the first (final_layer) to the last (the embedders) of the backward pass."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] in ("double_blocks", "single_blocks") and parts[1].isdigit():
        return parts[0].removesuffix("_blocks"), int(parts[1])
    return parts[0], -1


def group_by_block(named_params: Iterable[tuple[str, torch.nn.Parameter]]
                   ) -> list[tuple[tuple[str, int], list[torch.nn.Parameter]]]:
    """Parameters grouped by `block_key`, groups in order of first appearance (the model's order)."""
    groups: dict[tuple[str, int], list[torch.nn.Parameter]] = {}
    for name, p in named_params:
        groups.setdefault(block_key(name), []).append(p)
    return list(groups.items())


def stochastic_round_(target: torch.Tensor, source: torch.Tensor) -> None:
    """Write fp32 `source` into bf16 `target`, rounding up or down at random in proportion to the distance, so
    updates smaller than bf16's resolution still move the weights on average."""
    bits = source.detach().float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device)
    target.copy_(((bits + noise) & -65536).view(torch.float32))  # low 16 bits cleared: exact in bf16


def step_param(optimizer: torch.optim.Optimizer, p: torch.Tensor, group: dict) -> None:
    """One optimizer step for the single parameter `p` of `group` (optimizers whose update of a tensor depends only
    on that tensor's gradient and state: Adafactor, Adam, SGD...). bf16 parameters are updated in fp32 and written
    back with stochastic rounding."""
    groups = optimizer.param_groups
    if p.dtype != torch.bfloat16:
        optimizer.param_groups = [{**group, "params": [p]}]
        try:
            optimizer.step()
        finally:
            optimizer.param_groups = groups
        return
    work = p.detach().float()
    work.grad = p.grad.float()
    state = optimizer.state
    if p in state:
        state[work] = state.pop(p)
    optimizer.param_groups = [{**group, "params": [work]}]
    try:
        optimizer.step()
    finally:
        optimizer.param_groups = groups
        if work in state:
            state[p] = state.pop(work)
    stochastic_round_(p.data, work)


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one


# --- the two fused modes ------------------------------------------------------------------------------------------


OnGradients = Callable[[list, Callable[[list], None]], list]  # (params, ready) -> hook handles


@dataclass
class HookSettings:
    max_grad_norm: float = 0.0
    should_step: Callable[[], bool] = lambda: True  # False on accumulating micro-batches
    # who calls ready(params) once their gradients are final; None: each parameter's own hook (one process)
    on_gradients: OnGradients | None = None

    def hooks(self, params: list, ready: Callable[[list], None]) -> list:
        if self.on_gradients is not None:
            return self.on_gradients(params, ready)
        return per_parameter_hooks(params, ready, self.should_step)


class FusedBackward:
    """--fused_backward_pass: each parameter is stepped, and its gradient freed, as soon as its gradient is final.

    The training loop's optimizer.step() then finds no gradients and does nothing."""

    def __init__(self, optimizer, params: list[torch.nn.Parameter], settings: HookSettings):
        self.optimizer, self.settings = _inner(optimizer), settings
        self.group_of = {p: g for g in self.optimizer.param_groups for p in g["params"]}
        self.handles = settings.hooks(params, self._ready)

    @torch.no_grad()
    def _ready(self, params: list[torch.nn.Parameter]) -> None:
        for p in params:
            if p.grad is None:
                continue
            if self.settings.max_grad_norm:
                torch.nn.utils.clip_grad_norm_([p], self.settings.max_grad_norm)
            step_param(self.optimizer, p, self.group_of[p])
            p.grad = None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class BlockwiseOptimizers:
    """--blockwise_fused_optimizers: one optimizer per block, stepped from backward when the block's last gradient
    arrives. The loop-facing step() steps blocks some of whose parameters got no gradient this step."""

    def __init__(self, optimizers: list, blocks: list[list[torch.nn.Parameter]], settings: HookSettings):
        self.optimizers, self.blocks, self.settings = optimizers, blocks, settings
        self.arrived = [0] * len(blocks)
        self.block_of = {p: i for i, params in enumerate(blocks) for p in params}
        self.handles = settings.hooks([p for params in blocks for p in params], self._ready)

    @torch.no_grad()
    def _ready(self, params: list[torch.nn.Parameter]) -> None:
        for p in params:  # under the reducer a whole bucket, gradients or not: each one's gradient is final
            i = self.block_of[p]
            self.arrived[i] += 1
            if self.arrived[i] == len(self.blocks[i]):
                self._step_block(i)

    @torch.no_grad()
    def _step_block(self, i: int) -> None:
        s = self.settings
        params = [p for p in self.blocks[i] if p.grad is not None]
        if s.max_grad_norm and params:
            torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
        self.optimizers[i].step()
        self.optimizers[i].zero_grad(set_to_none=True)
        self.arrived[i] = -1  # stepped

    # what the training loop calls on its optimizer
    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self) -> None:
        if not self.settings.should_step():
            return
        for i, n in enumerate(self.arrived):
            if n > 0:
                self._step_block(i)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if not self.settings.should_step():
            return
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)
        self.arrived = [0] * len(self.blocks)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class SchedulerGroup:
    """The LR schedulers of the blockwise optimizers, stepped together; reports the first one's LRs."""

    def __init__(self, schedulers: list):
        self.schedulers = schedulers

    def step(self) -> None:
        for s in self.schedulers:
            s.step()

    def get_last_lr(self) -> list[float]:
        return self.schedulers[0].get_last_lr()


# --- set-up -------------------------------------------------------------------------------------------------------


def prepare_optimizer(args, accelerator, groups: list, named_params: list[tuple[str, torch.nn.Parameter]],
                      max_train_steps: int | None = None, prepare=None, on_gradients: OnGradients | None = None):
    """(optimizer_name, optimizer_args_text, optimizer, scheduler, fused) for the training loop, prepared by
    accelerate. `fused` is the hook object of a fused mode (None otherwise); `named_params` are the trainable
    parameters with their names in the model (for the blockwise grouping); `max_train_steps` the run's resolved
    length (default --max_train_steps); `prepare(optimizer, scheduler)` the distributed engine's preparation
    (default accelerator.prepare); `on_gradients(params, ready)` the engine's hand-over of final (averaged)
    gradients to the fused modes (default: each parameter's own hook)."""
    prepare = prepare or accelerator.prepare
    # only flux_train.py and flux_train_control_net.py have the full-training options; the LoRA trainer's parser
    # also has --fused_backward_pass (sd-scripts' shared optimizer group), warned about as having no effect there
    full_options = hasattr(args, "blockwise_fused_optimizers")
    fused_backward = full_options and getattr(args, "fused_backward_pass", False)
    blockwise = full_options and getattr(args, "blockwise_fused_optimizers", False) and not fused_backward
    settings = HookSettings(
        max_grad_norm=getattr(args, "max_grad_norm", 0.0) or 0.0,
        should_step=lambda: accelerator.sync_gradients, on_gradients=on_gradients)
    if blockwise:
        blocks = group_by_block(named_params)
        optimizers, schedulers, name, text = [], [], "", ""
        factory_logs = [logging.getLogger(n) for n in ("library.training.optimizers", "library.training.lr_schedulers")]
        levels = [log.level for log in factory_logs]
        try:
            for i, (key, params) in enumerate(blocks):
                if i == 1:  # the factories' notes were logged for the first block; the others are the same
                    for log in factory_logs:
                        log.setLevel(logging.ERROR)
                name, text, optimizer = get_optimizer(args, [{"params": params}])
                scheduler = get_scheduler(args, optimizer, accelerator.num_processes, max_train_steps)
                optimizer, scheduler = prepare(optimizer, scheduler)
                optimizers.append(optimizer)
                schedulers.append(scheduler)
        finally:
            for log, level in zip(factory_logs, levels):
                log.setLevel(level)
        logger.info("--blockwise_fused_optimizers: %d optimizers (%s)", len(blocks),
                    ", ".join(f"{k}{'' if i < 0 else i}" for (k, i), _ in blocks[:4]) + (", ..." if len(blocks) > 4
                                                                                        else ""))
        fused = BlockwiseOptimizers(optimizers, [p for _, p in blocks], settings)
        return name, text, fused, SchedulerGroup(schedulers), fused
    name, text, optimizer = get_optimizer(args, groups)
    scheduler = get_scheduler(args, optimizer, accelerator.num_processes, max_train_steps)
    optimizer, scheduler = prepare(optimizer, scheduler)
    fused = None
    if fused_backward:
        fused = FusedBackward(optimizer, [p for _, p in named_params], settings)
        logger.info("--fused_backward_pass: each parameter is stepped as soon as its gradient is complete")
    return name, text, optimizer, scheduler, fused
