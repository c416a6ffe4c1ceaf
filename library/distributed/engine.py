"""How several processes train one model: the engine a run uses, chosen once, and what the training loop asks of it.

The loop (library/training/loop.py) never branches on the engine; it calls these methods at fixed points:

  kind = engine_kind(args)                         before the Accelerator exists (its plugins depend on it)
  Accelerator(**accelerator_kwargs(kind, args))
  engine = make_engine(kind, accelerator, args, uses_swap_or_fused)
  engine.check(trainer)                            refusals, before any model loads
  engine.shard(trainer)                            after build_trainable (FSDP2 shards the blocks here)
  model = engine.attach(trainer)                   what the loss calls (a DDP/DeepSpeed-wrapped step or the denoiser)
  optimizer, scheduler = engine.prepare(o, s)      accelerate's prepare, with the model where the engine needs it
  with engine.accumulate(trainer): ...             one micro-batch; no gradient sync unless it steps
  engine.before_step(params); engine.clip_grad_norm_(params, max_norm)
  with engine.full_weights(modules): engine.state_dict(module)   collective gather for saving (main writes)
  engine.save_state(folder) / engine.load_state(folder)

Engines: `single` (one process), `ddp` (accelerate's DistributedDataParallel around a TrainStep; bucketed all-reduce
overlapping the backward), `reducer` (where block swapping or the fused optimizer modes keep DDP out: our bucketed
all-reduce launched from gradient hooks), `deepspeed` (ZeRO 0-3 through accelerate), `fsdp2` (PyTorch's
`fully_shard`, applied by us).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager, nullcontext
from datetime import timedelta

import torch

logger = logging.getLogger(__name__)

ENGINES = ("single", "ddp", "reducer", "deepspeed", "fsdp2")


class EngineError(ValueError):
    """A combination the engine cannot run; the message says what to use instead."""


def _env_flag(name: str, environ) -> bool:
    return str(environ.get(name, "")).lower() in ("1", "true", "yes")


def world_size(environ=None) -> int:
    environ = os.environ if environ is None else environ
    return int(environ.get("WORLD_SIZE", "1") or 1)


def engine_kind(args, environ=None) -> str:
    """The engine the run asks for: `--deepspeed` or an accelerate DeepSpeed config (ACCELERATE_USE_DEEPSPEED),
    an accelerate FSDP config (ACCELERATE_USE_FSDP), else DDP for several processes, else one process. `ddp`
    becomes `reducer` in make_engine when the run swaps blocks or steps inside the backward."""
    environ = os.environ if environ is None else environ
    if getattr(args, "deepspeed", False) or _env_flag("ACCELERATE_USE_DEEPSPEED", environ):
        return "deepspeed"
    if _env_flag("ACCELERATE_USE_FSDP", environ):
        return "fsdp2"
    return "ddp" if world_size(environ) > 1 else "single"


def runs_on_cpu(environ=None) -> bool:
    environ = os.environ if environ is None else environ
    return _env_flag("ACCELERATE_USE_CPU", environ) or not torch.cuda.is_available()


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


def make_engine(kind: str, accelerator, args, swaps_or_fuses: bool = False) -> "Engine":
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


class Engine:
    """One process (and the base of the others): nothing is wrapped, nothing synchronised."""

    name = "single"
    shards_parameters = False  # each rank holds part of the weights: every rank runs every forward (samples too)

    def __init__(self, accelerator, args):
        self.accelerator, self.args = accelerator, args

    def describe(self) -> str:
        """One line for the log (and for tests asserting which engine really ran)."""
        return f"{self.name} ({self.accelerator.num_processes} process(es))"

    def check(self, trainer) -> None:
        """Refuse, in one line naming the alternative, what this engine cannot run with the trainer's options."""

    def shard(self, trainer) -> None:
        """Called after trainer.build_trainable, before the optimizer exists."""

    def attach(self, trainer):
        """The callable the loss step runs (the transformer's signature)."""
        return trainer.denoiser()

    def prepare(self, optimizer, scheduler):
        return self.accelerator.prepare(optimizer, scheduler)

    def accumulate(self, trainer):
        """Context of one micro-batch: accelerate's accumulation (sync_gradients says whether it steps)."""
        return self.accelerator.accumulate(*trainer.trainable_modules)

    def before_step(self, params) -> None:
        """After the backward of a micro-batch that steps, before clipping: gradients are complete everywhere."""

    def clip_grad_norm_(self, params, max_norm: float):
        return self.accelerator.clip_grad_norm_(params, max_norm)

    @contextmanager
    def full_weights(self, modules):
        """Collective (every rank enters): inside, state_dict(module) gives the whole module's weights on the main
        process."""
        yield

    def state_dict(self, module: torch.nn.Module) -> dict:
        """The module's full weights (call inside full_weights under a sharding engine)."""
        return self.accelerator.unwrap_model(module).state_dict()

    def state_archives(self) -> list[str]:
        """Files accelerate's save_state writes for the optimizers, schedulers and scaler (checked before resume)."""
        acc = self.accelerator
        archives = [f"optimizer{f'_{i}' if i else ''}.bin" for i in range(len(acc._optimizers))]
        archives += [f"scheduler{f'_{i}' if i else ''}.bin" for i in range(len(acc._schedulers))]
        return archives + (["scaler.pt"] if acc.scaler is not None else [])

    def keeps_trainable_in_state(self) -> bool:
        """Whether the loop writes the trained weights into a state folder itself (a DeepSpeed checkpoint holds
        them already)."""
        return True

    def save_state(self, folder) -> None:
        """Optimizer, scheduler, RNG (every rank calls it)."""
        self.accelerator.save_state(str(folder))

    def load_state(self, folder) -> None:
        self.accelerator.load_state(str(folder))


def no_sync(module):
    """DDP's no_sync for a module that has it, else nothing."""
    return module.no_sync() if hasattr(module, "no_sync") else nullcontext()
