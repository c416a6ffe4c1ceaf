"""The command-line shell every training entry point shares: parse, --config_file, checks, run, one-line errors.

    main_for(command_lines.FULL, setup_parser(), lambda: FullTrainer, argv)

An entry point (flux_train_network.py, flux_train.py, flux_train_control_net.py) only names its recipe's command
line (library/training/recipes/command_lines.py), its parser and its recipe's Trainer class; the errors users can
fix end the program with `error: ...` and exit 2. `tool_main` is the same shell for the non-training tools.
"""

from __future__ import annotations

import logging
import sys
from typing import Callable

from library.training.arguments import (TrainerCommandLine, setup_logging, verify_training_args,
                                        warn_command_line_secrets, warn_ineffective)
from library.training.config_file import read_config_from_file


def main_for(command_line: TrainerCommandLine, parser, recipe: Callable[[], type],
             argv: list[str] | None = None) -> int:
    """Run one training CLI. `recipe()` returns the recipe's Trainer class; it is imported only after parsing, so
    `--help` and argument errors stay fast."""
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    setup_logging(args)
    warn_command_line_secrets(argv)
    args = read_config_from_file(args, parser, argv)
    try:
        verify_training_args(args, command_line)
        warn_ineffective(args, parser, command_line)
        trainer_class = recipe()
        settings = run_settings(args, command_line, trainer_class.memory_profile)
        return trainer_class(args, settings).run()
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run_settings(args, command_line: TrainerCommandLine, profile):
    """The run's frozen settings, with --blocks_to_swap auto answered by the memory planner for recipes it plans."""
    from library.training.settings import RunSettings  # imports torch: after parsing

    planned = None
    if getattr(args, "blocks_to_swap", None) == "auto" and profile is not None:
        from library.planner.plan import choose_blocks_to_swap  # the planner builds models: only when asked

        planned = int(choose_blocks_to_swap(args, profile.name))
    return RunSettings.from_args(args, fp8_allowed=command_line.fp8_base, training=command_line.training,
                                 blocks_to_swap=planned)


def tool_main(parser, run: Callable, argv: list[str] | None = None) -> int:
    """The shell of the other tools (inference, LoRA convert/merge/extract): parse, log to stderr, run; a
    ValueError or missing file is the user's to fix and ends with one `error: ...` line and exit 2."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that describe a problem with the user's options, data or files (printed without a traceback)."""
    # imported when an error is being reported: these modules bring numpy and torch, which --help does not need
    from library.data.config import DatasetConfigError
    from library.data.images import BadImageError
    from library.formats.safetensors_io import ModelFileError
    from library.training.arguments import TrainingArgumentError
    from library.training.errors import TrainingError

    return (TrainingArgumentError, DatasetConfigError, BadImageError, ModelFileError, TrainingError, ValueError)
