"""Full fine-tuning of the FLUX.1 transformer (text encoders frozen) with sd-scripts' command line.

    accelerate launch flux_train.py --pretrained_model_name_or_path flux1-dev.safetensors \
        --clip_l clip_l.safetensors --t5xxl t5xxl_fp16.safetensors --ae ae.safetensors \
        --dataset_config dataset.toml --cache_latents_to_disk --cache_text_encoder_outputs_to_disk \
        --optimizer_type adafactor --optimizer_args relative_step=False scale_parameter=False warmup_init=False \
        --fused_backward_pass --mixed_precision bf16 --full_bf16 --gradient_checkpointing --learning_rate 5e-6 \
        --output_dir out --output_name my_finetune --max_train_steps 1000

Writes a BFL-layout .safetensors (the layout of flux1-dev.safetensors) that flux_minimal_inference.py loads.
"""

from __future__ import annotations

import sys

from library.cli.main import main_for
from library.training.arguments import training_parser
from library.training.recipes.command_lines import FULL as COMMAND_LINE


def setup_parser():
    return training_parser(COMMAND_LINE, description="Fine-tune the whole FLUX.1 transformer (sd-scripts compatible "
                                                "arguments).")


def recipe():
    from library.training.recipes.full import FullTrainer  # after parsing: --help stays fast

    return FullTrainer


def main(argv: list[str] | None = None) -> int:
    return main_for(COMMAND_LINE, setup_parser(), recipe, argv)


if __name__ == "__main__":
    sys.exit(main())
