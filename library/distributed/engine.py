"""The distributed engine's interface: what the training loop asks of it, with the one-process behaviour.

The loop (library/training/loop.py) never branches on the engine; it calls these methods at fixed points:

  engine.check(trainer)                            refusals, before any model loads
  engine.shard(trainer)                            after build_trainable (FSDP2 shards the blocks here)
  model = engine.attach(trainer)                   what the loss calls (a DDP/DeepSpeed-wrapped step or the denoiser)
  optimizer, scheduler = engine.prepare(o, s)      accelerate's prepare, with the model where the engine needs it
  with engine.accumulate(trainer): ...             one micro-batch; no gradient sync unless it steps
  engine.on_gradients(params, ready)               the fused optimizer modes step from `ready`
  engine.before_step(params); engine.clip_grad_norm_(params, max_norm)
  with engine.full_weights(modules): engine.state_dict(module)   collective gather for saving (main writes)
  engine.save_state(folder) / engine.check_state(folder), engine.load_state(folder)
  engine.load_state_dict(module, tensors), engine.load_full_tensor_(weight, tensor)   full weights into shards

Which engine a run gets, and the Accelerator's arguments for it: library/distributed/choice.py.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch


def env_flag(environ, name: str) -> bool:
    """Whether a launch variable (ACCELERATE_USE_DEEPSPEED, FSDP_OFFLOAD_PARAMS, ...) is set to a true value."""
    return str(environ.get(name, "")).lower() in ("1", "true", "yes")


class EngineError(ValueError):
    """A combination the engine cannot run; the message says what to use instead."""


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

    def on_gradients(self, params, ready) -> list:
        """Have `ready(params_subset)` called, on micro-batches that step, once those parameters' gradients are
        complete (and averaged, under an engine that synchronises them by hand): the fused optimizer modes step
        from it. Returns hook handles."""
        from library.distributed.grad_sync import per_parameter_hooks

        return per_parameter_hooks(params, ready, lambda: self.accelerator.sync_gradients)

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

    def load_state_dict(self, module: torch.nn.Module, tensors: dict) -> None:
        """Full weights (every process holds them all) into the module, strictly; a sharding engine keeps each
        rank's part."""
        module.load_state_dict(tensors)

    @torch.no_grad()
    def load_full_tensor_(self, target: torch.Tensor, value: torch.Tensor) -> None:
        """One full tensor into one of the module's weights (streamed loading); sharded: this rank's part."""
        target.copy_(value)

    def check_state(self, folder) -> None:
        """Refuse (EngineError) a --resume state whose engine files this run cannot load (saved by another number
        of processes, for other parameters), before anything is loaded."""

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
