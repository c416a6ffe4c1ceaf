"""Train a LoRA (or any --network_module network) for FLUX.1 with sd-scripts' command line.

    accelerate launch flux_train_network.py --pretrained_model_name_or_path flux1-dev.safetensors \
        --clip_l clip_l.safetensors --t5xxl t5xxl_fp16.safetensors --ae ae.safetensors \
        --dataset_config dataset.toml --network_module networks.lora_flux --network_dim 16 \
        --output_dir out --output_name my_lora --max_train_steps 1000 --learning_rate 1e-4
"""

from __future__ import annotations

import sys

from library.cli.main import main_for
from library.training.arguments import training_parser
from library.training.recipes.command_lines import LORA as COMMAND_LINE


def setup_parser():
    return training_parser(COMMAND_LINE, description="Train a LoRA for FLUX.1 (sd-scripts compatible arguments).")


def recipe():
    from library.training.recipes.lora import LoRATrainer  # after parsing: --help stays fast

    return LoRATrainer


def main(argv: list[str] | None = None) -> int:
    return main_for(COMMAND_LINE, setup_parser(), recipe, argv)


if __name__ == "__main__":
    sys.exit(main())
