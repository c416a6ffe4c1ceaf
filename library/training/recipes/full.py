"""Full fine-tuning on the shared loop (flux_train.py): the whole transformer is trained, the text encoders stay
frozen, and the model is saved as a BFL-layout .safetensors with ModelSpec metadata (reference 10, 13.4, 18.2).

Differences from sd-scripts, on purpose (reference 17.18):

* the trained weights are float32 unless --full_bf16 / --full_fp16 asks for 16-bit weights (sd-scripts trains
  the weight dtype, so --mixed_precision bf16 alone silently trains bf16 weights);
* the metadata says flux-1-schnell for a schnell model (sd-scripts always writes flux-1-dev);
* a resumed run continues its step count (sd-scripts restarts at step 0);
* --blockwise_fused_optimizers clips each block by its norm and works with gradient accumulation.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from library.formats.metadata import modelspec_metadata
from library.formats.model_saving import save_dtype, save_model
from library.formats.safetensors_io import TensorReader, sample_keys
from library.training.errors import TrainingError
from library.training.loop import Trainer
from library.training.recipes import command_lines
from library.training.recipes.fill import FillHooks
from library.training.recipes.canny_depth import ControlHooks
from library.training.recipes.flex2 import Flex2Hooks
from library.training.recipes.kontext import KontextHooks
from library.training.settings import MemoryProfile
from library.training.setup import TrainingModels

logger = logging.getLogger(__name__)

STATE_WEIGHTS = "transformer.safetensors"  # the trained weights inside a --save_state folder


class FullTrainer(FillHooks, Flex2Hooks, KontextHooks, ControlHooks, Trainer):
    """The trained transformer is never stored in fp8 (warn_ineffective says so); the text encoders are frozen."""

    tracker_name = "finetuning"
    command_line = command_lines.FULL
    memory_profile = MemoryProfile(name="full", trains_transformer=True, fp8_base=False)

    def transformer_dtype(self) -> torch.dtype | None:
        """Trained weights: the weight dtype with --full_bf16/--full_fp16, else float32 (autocast computes in the
        mixed-precision dtype)."""
        args = self.args
        return None if (args.full_bf16 or args.full_fp16) else torch.float32

    def build_trainable(self, models: TrainingModels) -> list[torch.nn.Module]:
        self.use_control_variant(models)  # Canny/Depth runs (recipes/canny_depth.py): logs what the run feeds
        flux = models.flux
        flux.requires_grad_(True)
        for m in (models.clip_l, models.t5xxl, models.ae):
            m.requires_grad_(False)
        count = sum(p.numel() for p in flux.parameters())
        logger.info("training all %d transformer parameters (%.2fB) in %s", count, count / 1e9, flux.dtype)
        return [flux]

    def param_groups(self):
        return [{"params": list(self.models.flux.parameters())}], ["unet"]  # at --learning_rate

    # A state keeps the transformer as .safetensors, streamed, instead of accelerate's torch pickle of the whole
    # state dict (which would be loaded whole into RAM and then copied: twice the model in memory on resume).
    def checkpointed_modules(self) -> list[torch.nn.Module]:
        return []

    def save_state_weights(self, folder: Path) -> None:
        save_model(self.engine.state_dict(self.models.flux), folder / STATE_WEIGHTS, streaming=True)

    def state_weight_shapes(self) -> tuple[str, dict[str, tuple[int, ...]]]:
        state = self.accelerator.unwrap_model(self.models.flux).state_dict()
        return STATE_WEIGHTS, {k: tuple(v.shape) for k, v in state.items()}

    def state_mismatch(self, key: str, saved: tuple[int, ...], expected: tuple[int, ...]) -> str:
        return "the state was saved from another model size; resume with the --pretrained_model_name_or_path it used"

    @torch.no_grad()
    def load_state_weights(self, folder: Path) -> None:
        path = folder / STATE_WEIGHTS
        if not path.exists():
            raise TrainingError(f"--resume {folder}: no {STATE_WEIGHTS} (a state saved by another trainer?)")
        state = self.accelerator.unwrap_model(self.models.flux).state_dict()
        with TensorReader(path) as reader:
            keys = reader.keys()
            if set(keys) != set(state):
                raise TrainingError(f"{path}: its tensors do not match the model being trained (differing: "
                                    f"{sample_keys(set(keys) ^ set(state), 3)})")
            for key in keys:  # one tensor at a time, into the weights where they are (device, swap storage)
                self.engine.load_full_tensor_(state[key], reader.get(key))  # sharded: this rank's part

    def save_weights(self, path: Path, epoch: int, step: int, final: bool) -> None:
        resolution = self.train_group.datasets[0].config.resolution
        metadata = modelspec_metadata(self.args, architecture=self.models.variant.architecture, lora=False,
                                      resolution=resolution)
        save_model(self.engine.state_dict(self.models.flux), path, metadata, save_dtype(self.args.save_precision),
                   streaming=self.args.mem_eff_save, fp8_scaled=getattr(self.args, "fp8_scaled", None))
