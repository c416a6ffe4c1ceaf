"""ostris Flex.2 training (a transformer whose img_in takes 196 features): the hooks the LoRA and full fine-tuning
recipes take from this mixin when the model is Flex.2. The rest -- the network or the trained transformer, saving,
resuming -- is theirs. ai-toolkit's recipe (extensions_built_in/flex2), with these choices:

* data: ControlNet-style subsets ('image_dir' + 'conditioning_data_dir') hold the control pictures, one control type
  per subset (list an image folder in several subsets for several control types: each sample then trains with one
  of them); DreamBooth / fine-tuning datasets train without control. The control picture goes through its target's
  exact geometry (library/data/datasets.py), so it stays pixel-aligned;
* the condition of each sample, drawn per step from a generator seeded by (seed, step, the batch's images), so a
  resumed run draws the same: with --inpaint_dropout no inpainting (zero latent, all-ones mask), else a random mask
  (ellipses on the latent grid), inverted with --invert_inpaint_mask_chance, the sample's own latent zeroed under it
  (the posterior mean when latents are not cached); the control latent (AE posterior mean, strength 1 as ai-toolkit
  trains) unless --control_dropout drops it;
* the guidance embedder is bypassed (ai-toolkit's bypass_guidance_embedding): the conditioning vector has no
  guidance term, and --guidance_scale changes nothing (a warning says so);
* sample images: a prompt's `--cn` picture is its control image, rendered as flux_minimal_inference.py does
  (library/flow/flex2.py: strength 0.5, stop 0.5, the guidance embedder used with the model's guidance 3.5).
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
import torch.nn.functional as F

from library.flow.flex2 import Flex2Inputs, bind_for_render
from library.flow.matching import seeded_generator
from library.models.checkpoint import analyze_checkpoint
from library.models.flex2 import Flex2Model, flex2_features
from library.training.errors import TrainingError
from library.training.recipes.control_inputs import control_latents, encode_mean
from library.training.recipes.flex2_options import flex2_settings
from library.training.samples import settings_for
from library.training.settings import DatasetKinds
from library.training.setup import model_variant

logger = logging.getLogger(__name__)

FLEX2 = "flex2"


def trains_flex2(args) -> bool:
    """Whether a run trains Flex.2: the transformer file's variant (its keys: img_in taking 196 features), read
    from its header before the models load; --model_type flex2 when the file cannot be read yet."""
    path = getattr(args, "pretrained_model_name_or_path", None)
    try:
        info = analyze_checkpoint(path) if path else None
    except (OSError, ValueError):
        info = None
    if info is None:
        return getattr(args, "model_type", None) == FLEX2
    return model_variant(args, info).name == FLEX2


def step_generator(seed: int, step: int, image_keys) -> torch.Generator:
    """The generator of one batch's condition draws: a function of the run's seed, the step and the batch's images."""
    return seeded_generator(seed, step, "|".join(str(k) for k in image_keys))


def random_inpaint_mask(height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """A random mask (height, width) on the latent grid, 1 = generate: the union of 1 to 3 ellipses of random centre
    and radii (10% to 45% of each side)."""
    ys = torch.arange(height, dtype=torch.float32)[:, None] + 0.5
    xs = torch.arange(width, dtype=torch.float32)[None, :] + 0.5
    mask = torch.zeros(height, width)
    count = int(torch.randint(1, 4, (1,), generator=generator))
    for _ in range(count):
        cy, cx, ry, rx = torch.rand(4, generator=generator).tolist()
        ry, rx = (0.1 + 0.35 * ry) * height, (0.1 + 0.35 * rx) * width
        inside = ((ys - cy * height) / ry) ** 2 + ((xs - cx * width) / rx) ** 2 <= 1.0
        mask = torch.maximum(mask, inside.float())
    return mask


def blur_mask(mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Half of the time a Gaussian blur of the mask (h, w), kernel 3, 5, 7 or 9 cells (torchvision's default sigma
    for the kernel, reflected borders), as ai-toolkit's random_blur_mask at latent size."""
    apply, size = torch.rand(2, generator=generator).tolist()
    if apply >= 0.5:
        return mask
    k = 3 + 2 * min(int(size * 4), 3)
    sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8
    x = torch.arange(k, dtype=torch.float32) - (k - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    pad = min(k // 2, mask.shape[0] - 1, mask.shape[1] - 1)
    x = F.pad(mask[None, None], (pad, pad, pad, pad), mode="reflect") if pad else mask[None, None]
    x = F.conv2d(x, g.view(1, 1, 1, k)[..., k // 2 - pad:k // 2 + pad + 1])
    x = F.conv2d(x, g.view(1, 1, k, 1)[..., k // 2 - pad:k // 2 + pad + 1, :])
    return x[0, 0].clamp(0, 1)


def dilate_mask(mask: torch.Tensor, generator: torch.Generator, max_fraction: float = 0.05) -> torch.Tensor:
    """The mask (h, w) grown or shrunk by up to `max_fraction` of its longer side (max pooling of the area to
    generate, or of the rest), as ai-toolkit's random_dialate_mask."""
    amount, grow = torch.rand(2, generator=generator).tolist()
    r = round(amount * max_fraction * max(mask.shape))
    if r == 0:
        return mask
    m = mask if grow < 0.5 else 1 - mask
    m = F.max_pool2d(m[None, None], 2 * r + 1, stride=1, padding=r)[0, 0]
    return m if grow < 0.5 else 1 - m


def training_condition(latents: torch.Tensor, control_latents: torch.Tensor | None, generator: torch.Generator,
                       inpaint_dropout: float, control_dropout: float, invert_inpaint_mask_chance: float,
                       blur: bool = False, dilate: bool = False) -> torch.Tensor:
    """The 132 condition features per token (B, N, 132) of a batch: per sample, in this order of draws, inpaint
    dropout, the random mask, its blur (`blur`) and inversion, the latent zeroed under it, the mask channel dilated
    or eroded (`dilate`), then control dropout. `latents` (B, 16, h, w): the samples' own latents; `control_latents`
    (B, 16, h, w) or None (no control pictures in this batch)."""
    b, _, h, w = latents.shape
    inpaint, control = [], []
    for i in range(b):
        u_inpaint, u_invert, u_control = torch.rand(3, generator=generator).tolist()
        if u_inpaint < inpaint_dropout:
            inpaint.append(torch.cat((torch.zeros(16, h, w), torch.ones(1, h, w))))
        else:
            m = random_inpaint_mask(h, w, generator)
            if blur:
                m = blur_mask(m, generator)
            if u_invert < invert_inpaint_mask_chance:
                m = 1 - m
            zeroed = latents[i].float() * (1 - m.to(latents.device))
            if dilate:
                m = dilate_mask(m, generator)
            inpaint.append(torch.cat((zeroed, m[None].to(latents.device))))
        if control_latents is None or u_control < control_dropout:
            control.append(torch.zeros(16, h, w))
        else:
            control.append(control_latents[i].float())
    device = latents.device
    return flex2_features(torch.stack([t.to(device) for t in inpaint]), torch.stack([t.to(device) for t in control]))


class Flex2Hooks:
    """Mixin for a `Trainer` recipe (first in its bases): when the model is Flex.2 it answers the hooks above,
    otherwise it hands every hook to the recipe unchanged."""

    def __init__(self, args, settings=None):
        super().__init__(args, settings)
        self.flex2 = trains_flex2(args)  # datasets are built before the models load: the file's header decides
        if self.flex2 and getattr(args, "controlnet_model_name_or_path", None):
            raise TrainingError("--controlnet_model_name_or_path with Flex.2: its conditioning images are Flex.2's own "
                                "control pictures (control latent channels), not a ControlNet's input; remove it")
        self.flex2_chances = flex2_settings(args)

    def dataset_kinds(self) -> DatasetKinds:
        kinds = super().dataset_kinds()
        if not self.flex2:
            return kinds
        return replace(kinds, support_controlnet=True, conditioning_as_mask=False, control_latents=True)

    def setup(self) -> None:
        super().setup()
        if not self.flex2:
            return
        with_control = sum(1 for i in self.train_group.items if i.conditioning_path is not None)
        c = self.flex2_chances
        logger.info("Flex.2: %d of %d images with a control picture; inpaint dropout %g, control dropout %g, "
                    "inverted masks %g, mask blur %s, mask dilation %s; guidance embedder bypassed", with_control,
                    len(self.train_group.items), c["inpaint_dropout"], c["control_dropout"],
                    c["invert_inpaint_mask_chance"], "on" if c["blur"] else "off", "on" if c["dilate"] else "off")
        if getattr(self.args, "guidance_scale", None) is not None:
            logger.warning("--guidance_scale %s has no effect: Flex.2 trains with its guidance embedder bypassed",
                           self.args.guidance_scale)

    def denoiser(self) -> torch.nn.Module:
        model = super().denoiser()
        return Flex2Model(model, bypass_guidance=True) if self.flex2 else model

    def model_inputs(self, batch) -> dict:
        inputs = super().model_inputs(batch)
        if not self.flex2:
            return inputs
        ae = self.models.ae
        device = self.accelerator.device
        if batch.latents is not None:
            latents = batch.latents.to(device)
        elif ae is not None:
            latents = encode_mean(ae, batch.images).to(device)
        else:
            raise TrainingError("Flex.2 training needs cached latents or the autoencoder to encode the images")
        control = control_latents(batch, device, lambda pixels: encode_mean(ae, pixels))
        generator = step_generator(self.seed, self.global_step, batch.image_keys)
        features = training_condition(latents, control, generator, **self.flex2_chances)
        return {**inputs, "extra_channels": features}

    def sampling_model(self, prompt) -> torch.nn.Module:
        """The prompt's `--cn` picture as its control image, rendered as flux_minimal_inference.py renders it."""
        model = super().sampling_model(prompt)
        if not self.flex2:
            return model
        settings = settings_for(prompt, 0, self.models.variant)
        inputs = Flex2Inputs.load(getattr(prompt, "controlnet_image", None))
        model, _, _ = bind_for_render(model, self.models.ae, self.models.variant, settings, inputs,
                                      self.samples.placement if self.samples is not None else None)
        return model
