"""Which distributed engine a run uses, and the Accelerator's arguments for it.

Engines: `single` (one process), `ddp` (accelerate's DistributedDataParallel around a TrainStep: bucketed all-reduce
overlapping the backward), `reducer` (where block swapping or the fused optimizer modes keep DDP out: bucketed
all-reduce launched from gradient hooks), `deepspeed` (ZeRO 0-3 through accelerate), `fsdp2` (PyTorch's
`fully_shard`, applied by us). The kind is decided before the Accelerator exists (its plugins depend on it):

  kind = engine_kind(args)
  Accelerator(**accelerator_kwargs(kind, args))
  engine = make_engine(kind, accelerator, args, swaps_or_fuses)
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch

from library.distributed.engine import Engine, env_flag

ENGINES = ("single", "ddp", "reducer", "deepspeed", "fsdp2")


def world_size(environ=None) -> int:
    environ = os.environ if environ is None else environ
    return int(environ.get("WORLD_SIZE", "1") or 1)


def engine_kind(args, environ=None) -> str:
    """The engine the run asks for: `--deepspeed` or an accelerate DeepSpeed config (ACCELERATE_USE_DEEPSPEED),
    an accelerate FSDP config (ACCELERATE_USE_FSDP), else DDP for several processes, else one process. `ddp`
    becomes `reducer` in make_engine when the run swaps blocks or steps inside the backward."""
    environ = os.environ if environ is None else environ
    if getattr(args, "deepspeed", False) or env_flag(environ, "ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if env_flag(environ, "ACCELERATE_USE_FSDP"):
        return "fsdp2"
    return "ddp" if world_size(environ) > 1 else "single"


def runs_on_cpu(environ=None) -> bool:
    environ = os.environ if environ is None else environ
    return env_flag(environ, "ACCELERATE_USE_CPU") or not torch.cuda.is_available()


def accelerator_kwargs(kind: str, args, environ=None) -> dict:
    """Keyword arguments of the run's Accelerator for `kind`: the process group (gloo on CPU runs; --ddp_timeout),
    DDP's options, and the engine's own (the DeepSpeed plugin from sd-scripts' arguments)."""
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    handlers = []
    group = {}
    if runs_on_cpu(environ) and world_size(environ) > 1:
        group["backend"] = "gloo"
    if getattr(args, "ddp_timeout", None):
        group["timeout"] = timedelta(minutes=args.ddp_timeout)
    if group:
        handlers.append(InitProcessGroupKwargs(**group))
    if getattr(args, "ddp_gradient_as_bucket_view", False) or getattr(args, "ddp_static_graph", False):
        handlers.append(DistributedDataParallelKwargs(gradient_as_bucket_view=args.ddp_gradient_as_bucket_view,
                                                      static_graph=args.ddp_static_graph))
    kwargs = {"kwargs_handlers": handlers} if handlers else {}
    if kind == "deepspeed":
        from library.distributed.deepspeed_engine import accelerator_kwargs as deepspeed_kwargs

        kwargs.update(deepspeed_kwargs(args, environ))
    elif kind == "fsdp2":
        from library.distributed.fsdp2 import accelerator_kwargs as fsdp_kwargs

        kwargs.update(fsdp_kwargs(args, environ))
    return kwargs


def make_engine(kind: str, accelerator, args, swaps_or_fuses: bool = False) -> Engine:
    """The engine object for `kind` once the Accelerator exists; `swaps_or_fuses`: the run swaps blocks or
    steps inside the backward, which keeps DDP out (the reducer engine then syncs gradients)."""
    if kind == "ddp" and accelerator.num_processes == 1:
        kind = "single"
    if kind == "ddp" and swaps_or_fuses:
        kind = "reducer"
    if kind == "single":
        return Engine(accelerator, args)
    if kind == "ddp":
        from library.distributed.ddp import DDPEngine

        return DDPEngine(accelerator, args)
    if kind == "reducer":
        from library.distributed.reducer import ReducerEngine

        return ReducerEngine(accelerator, args)
    if kind == "deepspeed":
        from library.distributed.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(accelerator, args)
    if kind == "fsdp2":
        from library.distributed.fsdp2 import FSDP2Engine

        return FSDP2Engine(accelerator, args)
    raise ValueError(f"unknown engine {kind!r}; one of {', '.join(ENGINES)}")


