"""Train a LoRA (or any --network_module network) for FLUX.1 with sd-scripts' command line.

    accelerate launch flux_train_network.py --pretrained_model_name_or_path flux1-dev.safetensors \
        --clip_l clip_l.safetensors --t5xxl t5xxl_fp16.safetensors --ae ae.safetensors \
        --dataset_config dataset.toml --network_module networks.lora_flux --network_dim 16 \
        --output_dir out --output_name my_lora --max_train_steps 1000 --learning_rate 1e-4
"""

from __future__ import annotations

import sys

from library.training.arguments import training_parser

TRAINER = "network"


def setup_parser():
    return training_parser(TRAINER, description="Train a LoRA for FLUX.1 (sd-scripts compatible arguments).")


def make_trainer(args):
    from library.training.recipes.lora import LoRATrainer  # after parsing: --help stays fast

    if not args.network_module:
        args.network_module = "networks.lora_flux"
    return LoRATrainer(args)


def main(argv: list[str] | None = None) -> int:
    from library.cli.main import main_for

    return main_for(TRAINER, setup_parser(), make_trainer, argv)


if __name__ == "__main__":
    sys.exit(main())
