"""Train a FLUX ControlNet (sd-scripts' or diffusers' layout) beside the frozen FLUX.1 transformer (sd-scripts' CLI).

    accelerate launch flux_train_control_net.py --pretrained_model_name_or_path flux1-dev.safetensors \
        --clip_l clip_l.safetensors --t5xxl t5xxl_fp16.safetensors --ae ae.safetensors \
        --dataset_config controlnet.toml --cache_latents_to_disk --cache_text_encoder_outputs_to_disk \
        --mixed_precision bf16 --gradient_checkpointing --learning_rate 2e-5 \
        --output_dir out --output_name my_controlnet --max_train_steps 10000

Every subset of the dataset config has `image_dir` and `conditioning_data_dir` (or use --train_data_dir and
--conditioning_data_dir); `--controlnet_model_name_or_path` continues from saved ControlNet weights. Render with
`flux_minimal_inference.py --controlnet out/my_controlnet.safetensors --control_image IMG`.
`--controlnet_format diffusers` trains diffusers' FluxControlNetModel layout instead (Union modes, alimama-style
inpainting; library/training/recipes/controlnet_args.py).
"""

from __future__ import annotations

import sys

from library.cli.main import main_for
from library.training.arguments import training_parser
from library.training.recipes.command_lines import CONTROLNET as COMMAND_LINE


def setup_parser():
    return training_parser(COMMAND_LINE, description="Train a FLUX.1 ControlNet (sd-scripts compatible arguments).")


def recipe():
    from library.training.recipes.controlnet import ControlNetTrainer  # after parsing: --help stays fast

    return ControlNetTrainer


def main(argv: list[str] | None = None) -> int:
    return main_for(COMMAND_LINE, setup_parser(), recipe, argv)


if __name__ == "__main__":
    sys.exit(main())
