"""DDP through accelerate: the trained modules in a TrainStep, wrapped by accelerator.prepare.

DDP's reducer all-reduces each bucket (25 MiB by default) from autograd hooks as soon as its gradients are complete,
so communication overlaps the rest of the backward; accelerate's `accumulate` enters DDP's `no_sync` on the
micro-batches that do not step, so gradient accumulation communicates once per optimizer step.

Trained parameters that get no gradient in a step would stall DDP (it waits for every bucket to fill):

* some never get one: the ControlNet's last double block computes a text stream nothing consumes. The module names
  them (`unconsumed_parameters()`) and DDP is told to leave them out. (`static_graph` would find them itself, but
  fails when the first step starts with an accumulating micro-batch; `find_unused_parameters` costs a walk of the
  graph in every forward.)
* LoRA module dropout (`network_args module_dropout=...`) skips modules at random, per process and per step: then
  `find_unused_parameters` (each forward walks the graph to mark what its loss cannot reach). That walk cannot see
  into a block whose forward runs without a graph, so it is refused with --cpu_offload_checkpointing.

The nested backward of --cpu_offload_checkpointing (a backward run inside the backward) needs nothing special: its
gradients reach DDP's hooks like any other (tested).
"""

from __future__ import annotations

from library.distributed.engine import Engine, EngineError
from library.distributed.train_step import TrainStep


def drops_modules(trainer) -> bool:
    """Whether some trained module skips itself at random in training (LoRA module dropout)."""
    return any(getattr(m, "module_dropout", None) for t in trainer.trainable_modules for m in t.modules())


class DDPEngine(Engine):
    name = "ddp"

    def check(self, trainer) -> None:
        if getattr(self.args, "cpu_offload_checkpointing", False) and _network_arg(self.args, "module_dropout"):
            raise EngineError("network_args module_dropout with --cpu_offload_checkpointing on several processes: "
                              "DDP cannot see which LoRA modules a step skipped inside an offloaded block; use "
                              "--gradient_checkpointing instead")

    def attach(self, trainer):
        from accelerate.utils import DistributedDataParallelKwargs
        from torch.nn.parallel import DistributedDataParallel

        acc = self.accelerator
        if drops_modules(trainer):
            acc.ddp_handler = acc.ddp_handler or DistributedDataParallelKwargs()
            acc.ddp_handler.find_unused_parameters = True
        step = TrainStep(trainer.trainable_modules, trainer.denoiser())
        self.ignored = [f"trained.{i}.{n}" for i, m in enumerate(trainer.trainable_modules)
                        for n in (m.unconsumed_parameters() if hasattr(m, "unconsumed_parameters") else [])]
        if self.ignored:
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(step, self.ignored)
        self.step = acc.prepare(step)
        # accelerate's save_state would also write every prepared model as a file of its own (the whole
        # transformer, for a full fine-tune); the loop keeps the trained weights in the state's safetensors file
        acc.register_save_state_pre_hook(_skip_models)
        acc.register_load_state_pre_hook(_skip_models)
        return self.step

    def accumulate(self, trainer):
        return self.accelerator.accumulate(self.step)

    def describe(self) -> str:
        notes = [n for n, on in (("find_unused_parameters", self.step.find_unused_parameters),
                                 ("static_graph", self.step.static_graph),
                                 (f"{len(self.ignored)} unconsumed parameters left out", self.ignored)) if on]
        what = f"{type(self.step).__name__} over {self.accelerator.num_processes} processes"
        return f"ddp ({', '.join([what, *notes])})"


def _network_arg(args, key: str) -> bool:
    """Whether `--network_args key=value` gives a value other than 0."""
    for arg in getattr(args, "network_args", None) or []:
        name, _, value = str(arg).partition("=")
        if name.strip() == key and value.strip() not in ("", "0", "0.0", "None"):
            return True
    return False


def _skip_models(models, *rest) -> None:
    """accelerate's save/load pre-hook (models, [weights,] folder): what it clears is neither saved nor loaded."""
    models.clear()
    for extra in rest:
        if isinstance(extra, list):
            extra.clear()
