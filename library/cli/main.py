"""The command-line shell every training entry point shares: parse, --config_file, checks, run, one-line errors.

    main_for("full", setup_parser(), lambda args: FullTrainer(args), argv)

An entry point (flux_train_network.py, flux_train.py, flux_train_control_net.py) only names its trainer kind,
its parser and how to build its Trainer; the errors users can fix end the program with `error: ...` and exit 2.
`tool_main` is the same shell for the non-training tools.
"""

from __future__ import annotations

import sys
from typing import Callable


def main_for(trainer: str, parser, make_trainer: Callable, argv: list[str] | None = None,
             adjust: Callable | None = None) -> int:
    """Run one training CLI. `adjust(args)` may fill trainer-specific defaults after the checks."""
    from library.training.config_file import read_config_from_file
    from library.training.arguments import setup_logging, verify_training_args, warn_command_line_secrets, warn_ineffective

    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    setup_logging(args)
    warn_command_line_secrets(argv)
    args = read_config_from_file(args, parser, argv)
    try:
        verify_training_args(args, trainer)
        warn_ineffective(args, parser, trainer)
        if adjust is not None:
            adjust(args)
        return make_trainer(args).run()
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def tool_main(parser, run: Callable, argv: list[str] | None = None) -> int:
    """The shell of the other tools (inference, LoRA convert/merge/extract): parse, log to stderr, run; a
    ValueError or missing file is the user's to fix and ends with one `error: ...` line and exit 2."""
    import logging

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that describe a problem with the user's options, data or files (printed without a traceback)."""
    from library.data.config import DatasetConfigError
    from library.data.images import BadImageError
    from library.formats.safetensors_io import ModelFileError
    from library.training.arguments import TrainingArgumentError
    from library.training.errors import TrainingError

    return (TrainingArgumentError, DatasetConfigError, BadImageError, ModelFileError, TrainingError, ValueError)
