"""ControlNet training on the shared loop: a FLUX ControlNet (sd-scripts' layout, or diffusers' with
`--controlnet_format diffusers`) trained beside the frozen transformer.

The recipe trains the ControlNet, reads ControlNet subsets only (their conditioning images are the control input),
and hands the loss, the sample images and the planner one model: `ControlledFlux(transformer, controlnet)`, fed
each batch's conditioning images (`model_inputs`) or each sample prompt's `--cn` image (`sampling_model`). Data,
caching, the loss step, saving and resuming are the shared ones.

diffusers-layout ControlNets read the AE latents of each batch's conditioning images: with --cache_latents the
latent cache's control latents (as Flex.2's and Canny/Depth's: control_inputs.py `control_latents`), else encoded
per step;
Union models take each item's mode from its subset's `custom_attributes.control_mode`, else `--control_mode`;
alimama-style inpainting ControlNets (`--controlnet_inpainting`) read the conditioning images as masks (white =
generate) and encode each target with that area blacked out (library/flow/control.py `condition_latents`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from library.formats.metadata import modelspec_metadata
from library.formats.model_saving import save_dtype, save_model
from library.memory.checkpointing import enable_gradient_checkpointing
from library.models.controlnet import ControlledFlux, controlnet_from_transformer
from library.models.controlnet_files import controlnet_layout, load_any_controlnet
from library.models.diffusers_controlnet import (DiffusersControlNet, DiffusersControlNetShape,
                                                 diffusers_controlnet_from_transformer, diffusers_state_dict,
                                                 write_diffusers_folder)
from library.training.errors import TrainingError
from library.training.loop import Trainer
from library.training.recipes import command_lines
from library.training.recipes.control_inputs import (batch_control_inputs, diffusers_latent_condition, item_mode,
                                                      sampling_controlled)
from library.training.settings import DatasetKinds, MemoryProfile
from library.training.setup import TrainingModels

logger = logging.getLogger(__name__)


class ControlNetTrainer(Trainer):
    """As in sd-scripts' ControlNet trainer the base stays in the weight dtype (no fp8; warn_ineffective names
    --fp8_base) and the text encoders are frozen."""

    tracker_name = "controlnet_train"
    command_line = command_lines.CONTROLNET
    # the planner's ControlNet step (library/planner/controlnet_rig.py): the base frozen, the ControlNet trained
    memory_profile = MemoryProfile(name="controlnet", trains_transformer=False, fp8_base=False)

    def dataset_kinds(self) -> DatasetKinds:
        return DatasetKinds(support_dreambooth=False, support_finetuning=False, support_controlnet=True,
                            control_latents=diffusers_latent_condition(self.args))

    def build_trainable(self, models: TrainingModels) -> list[torch.nn.Module]:
        args, device = self.args, self.accelerator.device
        if models.variant.name not in self.command_line.model_types:  # a file recognised as Chroma, say
            raise TrainingError(f"{args.pretrained_model_name_or_path} is a {models.variant.name} transformer: "
                                f"{self.command_line.script} trains ControlNets for "
                                f"{', '.join(self.command_line.model_types[1:])} only")
        if args.controlnet_model_name_or_path:
            layout = controlnet_layout(args.controlnet_model_name_or_path)
            if args.controlnet_format not in (None, layout):
                raise TrainingError(f"--controlnet_model_name_or_path {args.controlnet_model_name_or_path} is a "
                                    f"{layout}-layout ControlNet, but --controlnet_format is {args.controlnet_format}")
            controlnet = load_any_controlnet(args.controlnet_model_name_or_path, models.flux.params, torch.float32,
                                             device)
            logger.info("loaded %s-layout ControlNet %s (%d double / %d single blocks)", layout,
                        args.controlnet_model_name_or_path, *controlnet.depths)
        elif args.controlnet_format == "diffusers":
            p = models.flux.params
            shape = DiffusersControlNetShape(
                args.controlnet_double_blocks or min(4, p.depth),
                min(10, p.depth_single_blocks) if args.controlnet_single_blocks is None else
                args.controlnet_single_blocks, num_mode=args.controlnet_num_modes,
                condition_channels=68 if args.controlnet_inpainting else 64)
            controlnet = diffusers_controlnet_from_transformer(models.flux, shape, torch.float32, device)
            logger.info("new diffusers-layout ControlNet (%s) copied from the transformer, zero outputs",
                        controlnet.shape.describe())
        else:
            controlnet = controlnet_from_transformer(models.flux, dtype=torch.float32, device=device)
            logger.info("new ControlNet: %d double blocks copied from the transformer, zero output projections",
                        controlnet.depths[0])
        self.diffusers = isinstance(controlnet, DiffusersControlNet)
        union = self.diffusers and bool(controlnet.shape.num_mode)
        if args.control_mode is not None and not union:
            raise TrainingError(f"--control_mode {args.control_mode}: the ControlNet trained is not a Union model "
                                "(--controlnet_num_modes makes a new one)")
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
        return batch_control_inputs(self.controlnet, batch, self.models.ae, self.accelerator.device,
                                    self.args.control_mode)

    def sampling_model(self, prompt) -> torch.nn.Module:
        return sampling_controlled(self.models.flux, self.controlnet, prompt, self.models.ae, self.accelerator.device,
                                   self.args.control_mode, log=logger)

    def item_mode(self, attributes: dict | None) -> int:
        return item_mode(self.controlnet, attributes, self.args.control_mode)

    def param_groups(self):
        return [{"params": list(self.controlnet.parameters()), "lr": self.args.learning_rate}], ["controlnet"]

    def save_weights(self, path: Path, epoch: int, step: int, final: bool) -> None:
        """sd-scripts layout: the ControlNet's own tensor names; diffusers layout: diffusers' names (ComfyUI reads
        the file) and a `<name>/` folder beside it with config.json and the weights (a hard link) for diffusers'
        from_pretrained. ModelSpec metadata of the base model; --save_precision and --mem_eff_save as for full
        models."""
        args = self.args
        resolution = self.train_group.datasets[0].config.resolution
        metadata = modelspec_metadata(args, architecture=self.models.variant.architecture, lora=False,
                                      resolution=resolution)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = self.engine.state_dict(self.controlnet)  # a sharded ControlNet's gathered full weights
        tensors = diffusers_state_dict(self.controlnet, state=state) if self.diffusers else state
        save_model(tensors, path, metadata, save_dtype(args.save_precision), streaming=args.mem_eff_save)
        if self.diffusers:
            write_diffusers_folder(path, self.controlnet)
