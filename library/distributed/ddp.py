"""DDP through accelerate: the trained modules in a TrainStep, wrapped by accelerator.prepare.

DDP's reducer all-reduces each bucket (25 MB by default) from autograd hooks as soon as its gradients are complete,
so communication overlaps the rest of the backward; accelerate's `accumulate` enters DDP's `no_sync` on the
micro-batches that do not step, so gradient accumulation communicates once per optimizer step.
"""

from __future__ import annotations

from library.distributed.engine import Engine
from library.distributed.train_step import TrainStep


class DDPEngine(Engine):
    name = "ddp"

    def attach(self, trainer):
        acc = self.accelerator
        self.step = acc.prepare(TrainStep(trainer.trainable_modules, trainer.denoiser()))
        # accelerate's save_state would also write every prepared model as a file of its own (the whole
        # transformer, for a full fine-tune); the loop keeps the trained weights in the state's safetensors file
        acc.register_save_state_pre_hook(_skip_models)
        acc.register_load_state_pre_hook(_skip_models)
        return self.step

    def accumulate(self, trainer):
        return self.accelerator.accumulate(self.step)

    def describe(self) -> str:
        return f"ddp ({type(self.step).__name__} over {self.accelerator.num_processes} processes)"


def _skip_models(models, *rest) -> None:
    """accelerate's save/load pre-hook (models, [weights,] folder): what it clears is neither saved nor loaded."""
    models.clear()
    for extra in rest:
        if isinstance(extra, list):
            extra.clear()
