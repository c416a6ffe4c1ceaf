"""ControlNet training on the shared loop: an sd-scripts FLUX ControlNet trained beside the frozen transformer.

The recipe trains the ControlNet, reads ControlNet subsets only (their conditioning images are the control input),
and hands the loss, the sample images and the planner one model: `ControlledFlux(transformer, controlnet)`, fed
each batch's conditioning images (`model_inputs`) or each sample prompt's `--cn` image (`sampling_model`). Data,
caching, the loss step, saving and resuming are the shared ones.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from library.data.images import load_image
from library.data.tensors import control_image_source
from library.formats.metadata import modelspec_metadata
from library.formats.model_saving import save_dtype, save_model
from library.memory.checkpointing import enable_gradient_checkpointing
from library.models.controlnet import ControlledFlux, controlnet_from_transformer, load_controlnet
from library.training.errors import TrainingError
from library.training.loop import Trainer
from library.training.recipes import command_lines
from library.training.settings import DatasetKinds
from library.training.setup import TrainingModels

logger = logging.getLogger(__name__)


class ControlNetTrainer(Trainer):
    """As in sd-scripts' ControlNet trainer the base stays in the weight dtype (no fp8; warn_ineffective names
    --fp8_base) and the text encoders are frozen."""

    tracker_name = "controlnet_train"
    command_line = command_lines.CONTROLNET

    def dataset_kinds(self) -> DatasetKinds:
        return DatasetKinds(support_dreambooth=False, support_finetuning=False, support_controlnet=True)

    def build_trainable(self, models: TrainingModels) -> list[torch.nn.Module]:
        args, device = self.args, self.accelerator.device
        if models.variant.name not in self.command_line.model_types:  # a file recognised as Chroma, say
            raise TrainingError(f"{args.pretrained_model_name_or_path} is a {models.variant.name} transformer: "
                                f"{self.command_line.script} trains ControlNets for "
                                f"{', '.join(self.command_line.model_types[1:])} only")
        if args.controlnet_model_name_or_path:
            controlnet = load_controlnet(args.controlnet_model_name_or_path, models.flux.params, torch.float32, device)
            logger.info("loaded ControlNet %s (%d double / %d single blocks)", args.controlnet_model_name_or_path,
                        *controlnet.depths)
        else:
            controlnet = controlnet_from_transformer(models.flux, dtype=torch.float32, device=device)
            logger.info("new ControlNet: %d double blocks copied from the transformer, zero output projections",
                        controlnet.depths[0])
        if args.full_bf16 or args.full_fp16:
            controlnet.to(models.weight_dtype)
        if args.gradient_checkpointing:
            enable_gradient_checkpointing(controlnet)
        controlnet.requires_grad_(True).train()
        logger.info("trainable parameters: %d", sum(p.numel() for p in controlnet.parameters()))
        self.controlnet = controlnet
        return [controlnet]

    def denoiser(self) -> torch.nn.Module:
        return ControlledFlux(self.models.flux, self.controlnet)

    def model_inputs(self, batch) -> dict:
        control = batch.conditioning_images
        if control is None:
            raise TrainingError("ControlNet training needs batches with conditioning images (ControlNet subsets)")
        return {"controlnet_cond": control}

    def sampling_model(self, prompt) -> torch.nn.Module:
        if not prompt.controlnet_image:
            logger.warning("sample %d has no --cn control image: rendered without the ControlNet", prompt.index)
            return self.models.flux
        return ControlledFlux(self.models.flux, self.controlnet,
                              control_image_source(load_image(prompt.controlnet_image)[0]))

    def param_groups(self):
        return [{"params": list(self.controlnet.parameters()), "lr": self.args.learning_rate}], ["controlnet"]

    def save_weights(self, path: Path, epoch: int, step: int, final: bool) -> None:
        """The ControlNet's own tensor names (sd-scripts' file layout) with ModelSpec metadata of the base model;
        --save_precision and --mem_eff_save as for full models."""
        args = self.args
        resolution = self.train_group.datasets[0].config.resolution
        metadata = modelspec_metadata(args, architecture=self.models.variant.architecture, lora=False,
                                      resolution=resolution)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_model(self.controlnet.state_dict(), path, metadata, save_dtype(args.save_precision),
                   streaming=args.mem_eff_save)
