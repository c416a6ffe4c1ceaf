"""The module an engine wraps: the trained modules as its children, the loss's model as a plain attribute.

DDP arms its gradient hooks in its own forward and DeepSpeed runs its bookkeeping in its engine's forward, so the
loss step must call the wrapped module. The trained modules (a LoRA network, the transformer, a ControlNet) are its
registered children, so the engine synchronises or partitions exactly what is trained; the denoiser (the transformer
or a recipe's wrapper around it, holding the frozen base) is kept out of the module tree, so the engine never
broadcasts, wraps or partitions frozen weights.
"""

from __future__ import annotations

import torch


class TrainStep(torch.nn.Module):
    def __init__(self, trained: list[torch.nn.Module], denoiser):
        super().__init__()
        self.trained = torch.nn.ModuleList(trained)
        self.__dict__["denoiser"] = denoiser  # not a child: its frozen weights stay outside the engine

    def forward(self, *args, **kwargs):
        return self.denoiser(*args, **kwargs)
