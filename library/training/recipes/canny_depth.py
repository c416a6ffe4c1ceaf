"""FLUX.1 Canny / Depth training: the hooks the LoRA and full fine-tuning recipes take from this mixin when the run
trains a control model. Three runs share them:

* a BFL control LoRA on dev: `flux_train_network.py --network_module networks.control_lora_flux
  --network_args control=canny|depth` (img_in widened to 128, LoRA with bias on every Linear, norm scales);
* a LoRA on a full Canny/Depth model (`--model_type canny|depth`, or the file's ModelSpec; 128-feature keys);
* full fine-tuning of a full Canny/Depth model (flux_train.py).

Data: ControlNet-style subsets (`conditioning_data_dir`): each image's control map, fitted to its bucket as the
image is. Maps are files (tools/make_control_maps.py writes Canny or depth maps of a folder with the inference
code, library/flow/canny_depth.py). The model: `ExtraChannelsFlux(transformer)` fed each batch's control latents, the
AE posterior mean of its maps, packed (as inference encodes them): with --cache_latents (--cache_latents_to_disk)
the latent cache's control latents (each map a ControlItem, as Flex.2's: library/training/recipes/control_inputs.py
`control_latents`; an edited map is re-encoded), else each distinct fitted map encoded once per run (kept in
memory by its content; not on disk). Guidance: the control model's training guidance
(30 Canny, 10 Depth) unless --guidance_scale is given. Sample images: a prompt's `--cn` image is its control map.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from library.flow.canny_depth import ControlEncoder, ControlLatentCache, encode_control
from library.flow.generation import Placement
from library.models.checkpoint import analyze_checkpoint
from library.models.conditioned import ExtraChannelsFlux
from library.models.packing import pack_latents, unpack_latents
from library.models.variants import VARIANTS
from library.training.arguments import parse_network_args
from library.training.errors import TrainingError
from library.training.recipes.control_inputs import control_latents
from library.training.settings import DatasetKinds
from library.training.setup import model_variant
from networks.control_lora_flux import control_kind as network_control_kind

logger = logging.getLogger(__name__)
CONTROL_LORA_MODULE = "networks.control_lora_flux"


def control_kind(args) -> str | None:
    """"canny" / "depth" when the run trains a control model (a control LoRA network, or a Canny/Depth file by
    --model_type / ModelSpec / keys), else None. Read from the command line and the file's header only: datasets
    are built before the models load."""
    if getattr(args, "network_module", None) == CONTROL_LORA_MODULE:
        try:  # the network's own rule
            return network_control_kind(parse_network_args(getattr(args, "network_args", None)))
        except ValueError as e:
            raise TrainingError(str(e)) from None
    path = getattr(args, "pretrained_model_name_or_path", None)
    try:
        info = analyze_checkpoint(path) if path else None
    except (OSError, ValueError):
        return None
    return model_variant(args, info).control if info is not None else None


def black_control(width: int, height: int) -> torch.Tensor:
    return torch.full((1, 3, height, width), -1.0)


class ControlHooks:
    """Mixin for a `Trainer` recipe (first in its bases): when the run trains a control model it answers the hooks
    above, otherwise it hands every hook to the recipe unchanged."""

    def __init__(self, args, settings=None):
        super().__init__(args, settings)
        self.control = control_kind(args)
        if self.control and getattr(args, "controlnet_model_name_or_path", None):
            raise TrainingError("--controlnet_model_name_or_path with a Canny/Depth run: the subsets' conditioning "
                                "images are its control maps; a frozen ControlNet beside it is not supported")
        if self.control and getattr(args, "masked_loss", False):
            raise TrainingError("--masked_loss with a Canny/Depth run: the subsets' conditioning images are the "
                                "control maps, not loss masks")

    def dataset_kinds(self) -> DatasetKinds:
        kinds = super().dataset_kinds()
        if not self.control:
            return kinds
        return replace(kinds, support_controlnet=True, conditioning_as_mask=False, control_latents=True)

    def use_control_variant(self, models) -> None:
        """A control LoRA on dev: the run takes Canny's or Depth's defaults (training guidance 30 / 10, previews,
        the saved ModelSpec). Called by the LoRA recipe's build_trainable, before the loss and samples exist."""
        if self.control and not models.variant.control:
            models.variant = VARIANTS[self.control]
        if self.control:
            logger.info("FLUX.1 %s: control maps from the subsets' conditioning images; guidance %s", self.control,
                        self.args.guidance_scale if self.args.guidance_scale is not None
                        else models.variant.training_guidance)

    def denoiser(self) -> torch.nn.Module:
        model = super().denoiser()
        return ExtraChannelsFlux(model) if self.control else model

    def model_inputs(self, batch) -> dict:
        inputs = super().model_inputs(batch)
        if not self.control:
            return inputs
        if batch.conditioning_images is None and batch.control_latents is None:
            raise TrainingError(f"FLUX.1 {self.control} training needs each image's control map: give the subsets "
                                "a conditioning_data_dir (tools/make_control_maps.py writes one)")
        if batch.control_latents is None and self.models.ae is None:
            raise TrainingError("control maps need the autoencoder, which was not kept")
        # cached: the latent cache's control latents; live: the AE visits the device for the encode when cached
        # latents sent it to the CPU (train_setup.free_unneeded), each fitted map encoded once (ControlLatentCache:
        # in memory, keyed by the map's content)
        if getattr(self, "_control_latents", None) is None:
            self._control_latents = ControlLatentCache()
        placement = Placement(self.accelerator.device, offload=True)

        def live(maps):
            h, w = maps.shape[-2] // 16, maps.shape[-1] // 16
            return unpack_latents(self._control_latents(maps, self.models.ae, placement), h, w)

        return {**inputs, "extra_channels": pack_latents(control_latents(batch, self.accelerator.device, live))}

    def sampling_model(self, prompt) -> torch.nn.Module:
        """The prompt's `--cn` image as its control map, encoded as flux_minimal_inference.py encodes it (resized
        to the preview's size, AE mean); without one a black map (no edges / no depth), with a warning."""
        model = super().sampling_model(prompt)
        if not self.control:
            return model
        if getattr(self, "_control_encoder", None) is None:
            self._control_encoder = ControlEncoder(self.models.ae, placement=self.samples.placement)
        path = getattr(prompt, "controlnet_image", None)
        if not path:
            logger.warning("sample %s has no --cn control map: rendered with a black one", prompt.index)

        def features(timesteps, img_ids):
            h, w = int(img_ids[0, :, 1].max()) + 1, int(img_ids[0, :, 2].max()) + 1
            if path:
                return self._control_encoder(path, w * 16, h * 16)
            return encode_control(black_control(w * 16, h * 16), self.models.ae, self.samples.placement)

        return ExtraChannelsFlux(model).bind(features)
