"""Frozen settings: what a run resolves once from its parsed arguments, and what a recipe declares about itself.

Built once (`RunSettings.from_args`, `StepBudget.from_counts`) and read-only afterwards: no code writes resolved
values back into `args`, so `args` always says what the user asked for and these say what the run does.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from library.training.errors import TrainingError


@dataclass(frozen=True)
class MemoryProfile:
    """What the memory planner (library/planner) must know of a recipe to simulate its training step."""

    name: str  # the planner's name for it (tools/plan_memory.py --trainer)
    trains_transformer: bool  # the whole transformer is trained: float32 master weights unless --full_bf16,
    # write-back block swapping, the fused optimizers; otherwise a LoRA network on the frozen transformer
    fp8_base: bool  # the frozen transformer (and T5) may be stored in fp8


@dataclass(frozen=True)
class RunSettings:
    """The run's values that the arguments alone decide, resolved once."""

    seed: int  # --seed, or one drawn for this run (recorded in the metadata and the saved state)
    blocks_to_swap: int  # --blocks_to_swap, 'auto' resolved by the memory planner (library/cli) beforehand
    fp8_base: bool  # the frozen transformer stored in fp8: --fp8_base, where the recipe stores no trained weight so
    fp8_t5xxl: bool  # T5 stored in fp8 too: --fp8_base without --fp8_base_unet
    quantized_base: str | None = None  # the frozen transformer's block Linears in "nf4" or "int8" (bitsandbytes)

    @classmethod
    def from_args(cls, args, *, fp8_allowed: bool, training: str, blocks_to_swap: int | None = None) -> RunSettings:
        """`fp8_allowed`: the recipe keeps the transformer frozen; `training`: what it trains, for messages;
        `blocks_to_swap`: the planner's answer for --blocks_to_swap auto."""
        swap = getattr(args, "blocks_to_swap", None) or 0
        if swap == "auto":
            if blocks_to_swap is None:
                raise TrainingError(f"--blocks_to_swap auto: the memory planner does not plan {training} yet; give "
                                    "a number (at most 35 on FLUX.1-dev)")
            swap = blocks_to_swap
        fp8 = fp8_allowed and bool(getattr(args, "fp8_base", False))
        seed = args.seed if args.seed is not None else random.randint(0, 2**32 - 1)
        quant = getattr(args, "base_quantization", None) if fp8_allowed else None
        return cls(seed=seed, blocks_to_swap=int(swap), fp8_base=fp8,
                   fp8_t5xxl=fp8 and not getattr(args, "fp8_base_unet", False),
                   quantized_base=quant if quant in ("nf4", "int8") else None)


@dataclass(frozen=True)
class StepBudget:
    """How long the run is: --max_train_epochs, when given, decides --max_train_steps (reference 3.11)."""

    max_train_steps: int
    steps_per_epoch: int  # optimizer steps (batches / accumulation)
    num_epochs: int

    @classmethod
    def from_counts(cls, args, batches_per_epoch: int) -> StepBudget:
        per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
        steps = args.max_train_epochs * per_epoch if args.max_train_epochs else args.max_train_steps
        return cls(max_train_steps=steps, steps_per_epoch=per_epoch, num_epochs=math.ceil(steps / max(per_epoch, 1)))


@dataclass(frozen=True)
class DatasetKinds:
    """Which dataset subsets a recipe reads (library.data.config's support_* flags) and what a subset's
    conditioning images are for: a loss mask (--masked_loss) or the recipe's control input."""

    support_dreambooth: bool = True
    support_finetuning: bool = True
    support_controlnet: bool = False
    conditioning_as_mask: bool = False
    control_latents: bool = False  # conditioning images are control inputs the AE encodes (cached with the latents)
    support_reference: bool = False  # subsets may name reference images (FLUX.1 Kontext: reference_image_dir)
    reference_buckets: tuple[tuple[int, int], ...] | None = None  # bucket sizes (at 1 MP) of datasets with them

    def config_flags(self) -> dict:
        return dict(support_dreambooth=self.support_dreambooth, support_finetuning=self.support_finetuning,
                    support_controlnet=self.support_controlnet, support_reference=self.support_reference,
                    reference_buckets=self.reference_buckets)
