"""Train a LoRA (or any --network_module network) for FLUX.1 with sd-scripts' command line.

    accelerate launch flux_train_network.py --pretrained_model_name_or_path flux1-dev.safetensors \
        --clip_l clip_l.safetensors --t5xxl t5xxl_fp16.safetensors --ae ae.safetensors \
        --dataset_config dataset.toml --network_module networks.lora_flux --network_dim 16 \
        --output_dir out --output_name my_lora --max_train_steps 1000 --learning_rate 1e-4
"""

from __future__ import annotations

import sys

from library.config_file import read_config_from_file
from library.train_args import (TrainingArgumentError, setup_logging, training_parser, verify_training_args,
                                warn_command_line_secrets, warn_ineffective)

TRAINER = "network"


def setup_parser():
    return training_parser(TRAINER, description="Train a LoRA for FLUX.1 (sd-scripts compatible arguments).")


def main(argv: list[str] | None = None) -> int:
    parser = setup_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    setup_logging(args)
    warn_command_line_secrets(argv)
    args = read_config_from_file(args, parser, argv)
    from library.dataset_config import DatasetConfigError
    from library.image_io import BadImageError
    from library.safetensors_io import ModelFileError
    from library.train_loop import TrainingError

    try:
        verify_training_args(args, TRAINER)
        warn_ineffective(args, parser, TRAINER)
        if not args.network_module:
            args.network_module = "networks.lora_flux"
        from library.lora_training import LoRATrainer

        return LoRATrainer(args).run()
    except (TrainingArgumentError, DatasetConfigError, BadImageError, ModelFileError, TrainingError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
