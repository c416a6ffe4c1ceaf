"""ControlNet training on the shared loop: what is trained (an sd-scripts FLUX ControlNet beside the frozen
transformer) and how it is saved. Data, caching, the loss step, saving and resuming are the shared ones.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from library.memory.checkpointing import enable_gradient_checkpointing
from library.training.errors import TrainingError
from library.training.loop import Trainer
from library.training.setup import TrainingModels

logger = logging.getLogger(__name__)

class ControlNetTrainer(Trainer):
    tracker_name = "controlnet_train"

    def __init__(self, args):
        # as in sd-scripts' ControlNet trainer the base stays in the weight dtype (warn_ineffective names --fp8_base)
        args.fp8_base = args.fp8_base_unet = False
        args.train_text_encoder = False
        if getattr(args, "blocks_to_swap", None) == "auto":
            raise TrainingError("--blocks_to_swap auto: the memory planner does not plan ControlNet training yet; "
                                "give a number (at most 35 on FLUX.1-dev)")
        super().__init__(args)

    def build_dataset_groups(self):
        from library.training import setup as train_setup

        return train_setup.build_dataset_groups(self.args, self.seed, controlnet=True)

    def build_trainable(self, models: TrainingModels) -> list[torch.nn.Module]:
        from library.models.controlnet import controlnet_from_transformer, load_controlnet

        args, device = self.args, self.accelerator.device
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

    def setup(self) -> None:
        super().setup()
        self.loss_fn.controlnet = self.controlnet

    def param_groups(self):
        return [{"params": list(self.controlnet.parameters()), "lr": self.args.learning_rate}], ["controlnet"]

    def save_weights(self, path: Path, epoch: int, step: int, final: bool) -> None:
        """The ControlNet's own tensor names (sd-scripts' file layout) with ModelSpec metadata of the base model;
        --save_precision and --mem_eff_save as for full models."""
        from library.formats.model_saving import save_dtype, save_model
        from library.formats.metadata import modelspec_metadata

        args = self.args
        resolution = self.train_group.datasets[0].config.resolution
        metadata = modelspec_metadata(args, is_schnell=self.models.is_schnell, lora=False, resolution=resolution)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_model(self.controlnet.state_dict(), path, metadata, save_dtype(args.save_precision),
                   streaming=args.mem_eff_save)
