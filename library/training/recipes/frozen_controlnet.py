"""LoRA training with a frozen ControlNet (`flux_train_network.py --controlnet_model_name_or_path CN`): the hooks the
LoRA recipe takes from this mixin when a ControlNet is given; without one it hands every hook on unchanged.

The ControlNet (sd-scripts' or diffusers' layout, read from the file) is loaded frozen in the weight dtype (its
Linears in fp8 with --fp8_base, as the transformer's); the
subsets are ControlNet subsets whose conditioning images are its control input (`conditioning_data_dir`; masks
for an inpainting ControlNet), Union modes come from `custom_attributes.control_mode` or `--control_mode`; the loss
runs through `ControlledFlux(transformer + LoRA, ControlNet)` at `--controlnet_scale`, and sample prompts with
`--cn` render through it too. A diffusers-layout ControlNet's condition latents are cached with --cache_latents
(control_inputs.py `control_latents`), except an inpainting one's. The LoRA learns the base's part of what the
ControlNet pairs should look like.
"""

from __future__ import annotations

import logging

import torch

from library.memory.fp8 import prepare_fp8
from library.models.controlled import ControlledFlux, ControlUnit
from library.models.controlnet_files import load_any_controlnet
from library.training.errors import TrainingError
from library.training.recipes.control_inputs import (batch_control_inputs, diffusers_latent_condition, num_modes,
                                                      sampling_controlled)
from library.training.settings import DatasetKinds

logger = logging.getLogger(__name__)


class FrozenControlNetHooks:
    """Mixin for the LoRA recipe (first in its bases)."""

    frozen_controlnet: torch.nn.Module | None = None

    @property
    def _with_controlnet(self) -> bool:
        return bool(getattr(self.args, "controlnet_model_name_or_path", None))

    def dataset_kinds(self) -> DatasetKinds:
        if not self._with_controlnet:
            return super().dataset_kinds()
        return DatasetKinds(support_dreambooth=False, support_finetuning=False, support_controlnet=True,
                            control_latents=diffusers_latent_condition(self.args))

    def _controlnet(self) -> torch.nn.Module | None:
        """The frozen ControlNet, loaded on first use (the loop asks for the denoiser once the models are loaded)."""
        args = self.args
        if self.frozen_controlnet is None and self._with_controlnet:
            cn = load_any_controlnet(args.controlnet_model_name_or_path, self.models.flux.params,
                                     self.models.weight_dtype, self.accelerator.device)
            cn.requires_grad_(False).eval()
            if self.settings.fp8_base:  # stored as the transformer is: fp8 Linears, upcast per layer
                prepare_fp8(cn, torch.float8_e4m3fn, self.models.compute_dtype)
            if args.control_mode is not None and not num_modes(cn):
                raise TrainingError(f"--control_mode {args.control_mode}: {args.controlnet_model_name_or_path} is "
                                    "not a Union ControlNet")
            self.frozen_controlnet = cn
            logger.info("frozen ControlNet %s (%d double / %d single blocks) x %s", args.controlnet_model_name_or_path,
                        *cn.depths, args.controlnet_scale)
        return self.frozen_controlnet

    def denoiser(self) -> torch.nn.Module:
        model, cn = super().denoiser(), self._controlnet()
        if cn is None:
            return model
        return ControlledFlux(model, units=[ControlUnit(cn, scale=self.args.controlnet_scale)])

    def model_inputs(self, batch) -> dict:
        inputs, cn = super().model_inputs(batch), self._controlnet()
        if cn is not None:
            inputs.update(batch_control_inputs(cn, batch, self.models.ae,
                                               self.accelerator.device, self.args.control_mode))
        return inputs

    def sampling_model(self, prompt) -> torch.nn.Module:
        model, cn = super().sampling_model(prompt), self._controlnet()
        if cn is None:
            return model
        return sampling_controlled(model, cn, prompt, self.models.ae, self.accelerator.device,
                                   self.args.control_mode, self.args.controlnet_scale, log=logger)
