"""Models conditioned by extra input channels (FLUX.1 Fill, Canny/Depth, Flex.2): the transformer's `img_in` takes
more than the 64 features of a noisy token, and the caller concatenates the condition's features to every token.

`ExtraChannelsFlux` is the one wrapper for training, sampling, inference and the memory planner: the noisy tokens
in, the condition's per-token features concatenated, the transformer's prediction (64 features per token) out.
"""

from __future__ import annotations

from typing import Callable, Union

import torch
from torch import nn

from library.models.transformer import FluxWrapper

# features (B or 1, N, C_extra), or a function (timesteps (B,), img_ids (B, N, 3)) -> features, for conditions that
# change during sampling (Flex.2's control stops after a fraction of the steps) or depend on the output size
ExtraFeatures = Union[torch.Tensor, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]


class ExtraChannelsFlux(FluxWrapper):
    """The transformer with condition features concatenated to each noisy token, with the transformer's call
    signature. Features come per call (`extra_channels`: training passes each batch's) or from `bind` (sampling)."""

    def __init__(self, flux: nn.Module):
        super().__init__(flux)
        self._bound: ExtraFeatures | None = None

    @property
    def extra_channels(self) -> int:
        """How many features per token the condition must supply (in_channels - 64)."""
        return self.flux.params.in_channels - self.flux.params.out_channels

    def bind(self, features: ExtraFeatures | None) -> "ExtraChannelsFlux":
        """Use these features for calls that pass none (None unbinds)."""
        self._bound = features
        return self

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, txt_attention_mask=None, *,
                extra_channels: torch.Tensor | None = None, **kwargs):
        features = extra_channels if extra_channels is not None else self._bound
        if features is None:
            raise ValueError(f"this model takes {self.extra_channels} condition features per token "
                             f"(in_channels {self.flux.params.in_channels}); none were given")
        if callable(features):
            features = features(timesteps, img_ids)
        features = features.to(img.device, img.dtype)
        if features.shape[-1] != self.extra_channels or features.shape[1] != img.shape[1]:
            raise ValueError(f"condition features {tuple(features.shape)} do not fit: expected (B, {img.shape[1]}, "
                             f"{self.extra_channels}) for in_channels {self.flux.params.in_channels}")
        features = features.expand(img.shape[0], -1, -1)
        return self.flux(torch.cat((img, features), dim=-1), img_ids, txt, txt_ids, timesteps, y, guidance,
                         txt_attention_mask, **kwargs)
