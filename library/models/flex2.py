"""ostris Flex.2-preview: the condition features its `img_in` takes beside the noisy tokens (pure tensors, no files).

Flex.2's img_in takes 196 features per token: 49 latent channels packed in 2x2 patches, in this order

    [noisy latent 16 | inpaint latent 16 | inpaint mask 1 | control latent 16]

(ai-toolkit's Flex2Pipeline and its training step concatenate the packed noisy tokens, the packed
[inpaint latent | mask] pair and the packed control latent; packing is channel-major, so that is the pack of the 49
channels). `ExtraChannelsFlux` concatenates the last 132 features (`flex2_features`) to the noisy tokens.

* inpaint latent: the AE latent of the source image with the area to generate zeroed *in latent space* (the mask
  resized to the latent grid, bilinear, as ai-toolkit trains); mask channel: 1 = generate, 0 = keep. No inpainting:
  zeros and an all-ones mask (generate everything).
* control latent: the AE latent of a control picture (depth, line, pose map) times `control_strength`; no control:
  zeros.
* control_stop (sampling): after that fraction of the steps the control latent is zeros (the inpaint part stays).
  DiffSynth's rule: with N steps, the control is used for steps 0 .. int(stop * (N - 1)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from library.models.conditioned import ExtraChannelsFlux
from library.models.packing import LATENT_CHANNELS, pack_latents

FLEX2_IN_CHANNELS = 196  # (3 * 16 + 1) * 4
FLEX2_EXTRA_CHANNELS = FLEX2_IN_CHANNELS - 4 * LATENT_CHANNELS  # 132: (16 + 1 + 16) * 4
# DiffSynth's FluxImagePipeline defaults (flex_control_strength=0.5, flex_control_stop=0.5); ai-toolkit's own
# Flex2Pipeline has neither (full strength, every step)
DEFAULT_CONTROL_STRENGTH = 0.5
DEFAULT_CONTROL_STOP = 0.5


def latent_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A mask (B, 1, H, W) or (B, H, W) in [0, 1] (1 = generate) resized to the latent grid (bilinear)."""
    if mask.dim() == 3:
        mask = mask[:, None]
    mask = mask.float()
    if mask.shape[-2:] != (height, width):
        mask = F.interpolate(mask, size=(height, width), mode="bilinear", align_corners=False)
    return mask.clamp(0, 1)


def inpaint_channels(latents: torch.Tensor | None, mask: torch.Tensor | None, shape: Sequence[int]) -> torch.Tensor:
    """[inpaint latent 16 | mask 1] (B, 17, h, w): `latents` (B, 16, h, w) of the source with the area to generate
    (`mask` 1, any size, resized to h x w) zeroed. No source: zeros and an all-ones mask (generate everything)."""
    b, _, h, w = shape
    if latents is None:
        if mask is not None:
            raise ValueError("an inpaint mask needs the image it masks")
        return torch.cat((torch.zeros(b, LATENT_CHANNELS, h, w), torch.ones(b, 1, h, w)), dim=1)
    latents = latents.float()
    if mask is None:
        raise ValueError("an inpaint image needs its mask (1 = area to generate)")
    m = latent_mask(mask, latents.shape[-2], latents.shape[-1]).to(latents.device)
    return torch.cat((latents * (1 - m), m), dim=1)


def control_channels(latents: torch.Tensor | None, strength: float, shape: Sequence[int]) -> torch.Tensor:
    """The control latent (B, 16, h, w) times `strength`; zeros without one."""
    b, _, h, w = shape
    if latents is None:
        return torch.zeros(b, LATENT_CHANNELS, h, w)
    return latents.float() * strength


def flex2_features(inpaint: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
    """[inpaint 17 | control 16] channels (B, 33, h, w) -> the 132 condition features per token (B, h/2 * w/2, 132),
    in the order Flex.2's img_in reads them after the 64 noisy features."""
    control = control.to(inpaint.device)
    return torch.cat((pack_latents(inpaint), pack_latents(control)), dim=-1)


def control_stop_step(steps: int, stop: float) -> int:
    """The last step (0-based) of `steps` that sees the control: DiffSynth's int(stop * (steps - 1))."""
    if not 0.0 <= stop <= 1.0:
        raise ValueError(f"control_stop {stop}: expected a fraction of the steps in [0, 1]")
    return int(stop * (steps - 1))


def control_stop_threshold(schedule: Sequence[float], stop: float) -> float:
    """The timestep below which the control is switched off, for a sampling schedule of N + 1 timesteps (1 -> 0):
    halfway between the last step with control and the next, so the switch survives bf16 rounding of t."""
    last = control_stop_step(len(schedule) - 1, stop)
    return (schedule[last] + schedule[last + 1]) / 2


@dataclass
class Flex2Condition:
    """Flex.2's condition for sampling, bound to an `ExtraChannelsFlux`: called with (timesteps (B,), img_ids) it
    returns the features of each sample, the control part zeroed where t < `stop_below` (control_stop)."""

    inpaint: torch.Tensor  # (1, 17, h, w): inpaint latent and mask
    control: torch.Tensor  # (1, 16, h, w): control latent x strength (zeros without control)
    stop_below: float = -1.0  # timesteps below this see no control (-1: every step does)

    def __post_init__(self):
        self._with = flex2_features(self.inpaint, self.control)
        self._without = flex2_features(self.inpaint, torch.zeros_like(self.control))

    def __call__(self, timesteps: torch.Tensor, img_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self._with.device != timesteps.device:  # moved once to where the sampler runs, not at every step
            self._with, self._without = self._with.to(timesteps.device), self._without.to(timesteps.device)
        on = timesteps.float().reshape(-1, 1, 1) >= self.stop_below
        return torch.where(on, self._with, self._without)

    def uses_control(self, t: float) -> bool:
        return t >= self.stop_below


def sampling_condition(inpaint_latents: torch.Tensor | None, mask: torch.Tensor | None,
                       control_latents: torch.Tensor | None, shape: Sequence[int], *, strength: float,
                       stop: float, schedule: Sequence[float]) -> Flex2Condition:
    """The bound condition of one render: latents (1, 16, h, w) or None, a mask in [0, 1] (1 = generate), the
    control's strength and stop fraction, and the sampling schedule the stop refers to."""
    inpaint = inpaint_channels(inpaint_latents, mask, shape)
    control = control_channels(control_latents, strength, shape)
    stop_below = control_stop_threshold(schedule, stop) if control_latents is not None else -1.0
    return Flex2Condition(inpaint, control, stop_below)


class Flex2Model(ExtraChannelsFlux):
    """`ExtraChannelsFlux` that can also leave the guidance embedder out (`bypass_guidance`): Flex.2 is trained that
    way (ai-toolkit's bypass_guidance_embedding), and inference may choose to."""

    def __init__(self, flux: torch.nn.Module, bypass_guidance: bool = False):
        super().__init__(flux)
        self.bypass_guidance = bypass_guidance

    def forward(self, *args, **kwargs):
        if self.bypass_guidance:
            kwargs["bypass_guidance"] = True
        return super().forward(*args, **kwargs)
