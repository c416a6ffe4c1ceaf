"""Gradient checkpointing hooked onto the FLUX transformer or its ControlNet from outside (--gradient_checkpointing,
--cpu_offload_checkpointing).

The checkpointed modules are every double and single block, the embedders of the conditioning vector (time_in,
guidance_in, vector_in; Chroma's approximator) and the ControlNet's hint encoder. Each gets a subclass of its own
class whose `__call__` runs the usual module call under torch.utils.checkpoint, in training mode with grad enabled.
The whole call is checkpointed, as `torch.utils.checkpoint.checkpoint(module, ...)` would: block swapping's forward
hooks and the module's `forward` at call time (a torch.compile'd one, whether compiled before or after) run inside the
checkpoint. Parameters and state_dict keys do not change.
"""

from __future__ import annotations

import functools

import torch
import torch.utils.checkpoint
from torch import nn

from library.memory import offload_checkpoint
from library.models.controlnet import ControlNetFlux

# Inputs that --cpu_offload_checkpointing keeps in CPU memory: each block's own streams (img, txt / x); vec, pe and
# the mask are shared by all blocks.
OFFLOADED_BLOCK_INPUTS = {"double_blocks": (0, 1), "single_blocks": (0,)}


class _Checkpointed:
    """Put in front of a checkpointed module's class. `_checkpoint_offload`: the input positions that wait in CPU
    memory, or None for plain checkpointing."""

    _checkpoint_offload: tuple[int, ...] | None

    def __call__(self, *args, **kwargs):
        call = super().__call__
        if not (self.training and torch.is_grad_enabled()):
            return call(*args, **kwargs)
        if self._checkpoint_offload is not None:
            # looked up at call time: the memory planner replaces it on `meta`
            return offload_checkpoint.offloaded_checkpoint(functools.partial(call, **kwargs), args,
                                                           self._checkpoint_offload)
        return torch.utils.checkpoint.checkpoint(call, *args, use_reentrant=False, **kwargs)


_checkpointed_classes: dict[type, type] = {}


def _checkpointed_class(cls: type) -> type:
    if cls not in _checkpointed_classes:
        # the class keeps its name: LoRA finds the blocks it targets by class name (networks/lora_flux.py)
        _checkpointed_classes[cls] = type(cls.__name__, (_Checkpointed, cls),
                                          {"__module__": __name__, "__qualname__": cls.__qualname__,
                                           "_plain_class": cls})
    return _checkpointed_classes[cls]


def _targets(model: nn.Module) -> list[tuple[nn.Module, tuple[int, ...] | None]]:
    """(module, inputs offloaded with cpu_offload) for each module that is recomputed in backward."""
    if hasattr(model, "distilled_guidance_layer"):  # Chroma: its approximator stands for the three embedders
        names = ["distilled_guidance_layer"]
    else:
        names = ["time_in", "vector_in"] + (["guidance_in"] if model.params.guidance_embed else [])
    if isinstance(model, ControlNetFlux):
        names.append("input_hint_block")
    targets = [(getattr(model, name), None) for name in names]
    for stack, offloaded in OFFLOADED_BLOCK_INPUTS.items():
        targets += [(block, offloaded) for block in getattr(model, stack)]
    return targets


def enable_gradient_checkpointing(model: nn.Module, cpu_offload: bool = False) -> nn.Module:
    """Recompute each block (and the embedders) of a Flux or ControlNetFlux in backward instead of keeping their
    activations; with `cpu_offload` the blocks' saved image/text inputs wait in CPU memory
    (library/memory/offload_checkpoint.py). Takes effect in training mode with grad enabled; returns the model."""
    for module, offloaded in _targets(model):
        if not isinstance(module, _Checkpointed):
            module.__class__ = _checkpointed_class(type(module))
        module._checkpoint_offload = offloaded if cpu_offload else None
    return model


def disable_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """Undo enable_gradient_checkpointing."""
    for module, _ in _targets(model):
        if isinstance(module, _Checkpointed):
            module.__class__ = module._plain_class
            del module._checkpoint_offload
    return model


def is_gradient_checkpointing(model: nn.Module) -> bool:
    return any(isinstance(m, _Checkpointed) for m in model.modules())


def is_cpu_offload_checkpointing(model: nn.Module) -> bool:
    return any(isinstance(m, _Checkpointed) and m._checkpoint_offload is not None for m in model.modules())
