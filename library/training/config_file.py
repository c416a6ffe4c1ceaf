"""sd-scripts' --config_file (reference 1.17): a TOML of training options under the command line, and
--output_config to write one. Split from train_args.py, which defines the options themselves."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import tomllib
from pathlib import Path

from library.data.arguments import add_dataset_arguments
from library.formats.atomic_io import atomic_write
from library.training.arguments import (
                                        add_custom_train_arguments,
                                        add_deepspeed_arguments,
                                        add_dit_arguments,
                                        add_flux_arguments,
                                        add_full_train_arguments,
                                        add_logging_arguments,
                                        add_model_path_arguments,
                                        add_modelspec_arguments,
                                        add_network_arguments,
                                        add_training_arguments,
                                        option_actions,
                                        parser_defaults,
                                        )

logger = logging.getLogger(__name__)


# --- --config_file (reference 1.17) -------------------------------------------------------------------------------

_NOT_WRITTEN = {"config_file", "output_config", "wandb_api_key", "huggingface_token"}


def read_config_from_file(args: argparse.Namespace, parser: argparse.ArgumentParser,
                          argv: list[str] | None = None) -> argparse.Namespace:
    """sd-scripts' --config_file: write it (--output_config, then exit 0) or read it under the command line.

    The TOML's top-level tables are flattened (their names do not matter); the values seed the namespace and the
    command line (`argv`, default sys.argv[1:]) is parsed again over them, so an option given on the command line
    wins over the file, which wins over the defaults. A missing file, unknown keys and wrong values end the
    program (exit 1) with one line per problem. Afterwards `args.config_file` has no extension (as sd-scripts)."""
    if not args.config_file:
        if getattr(args, "output_config", False):
            parser.exit(1, "error: --output_config needs --config_file FILE to write\n")
        return args
    path = args.config_file if args.config_file.endswith(".toml") else args.config_file + ".toml"
    if getattr(args, "output_config", False):
        write_config_file(args, parser, path)
        logger.info("wrote the options to %s", path)
        parser.exit(0)
    if not os.path.isfile(path):
        parser.exit(1, f"error: config file {path} not found\n")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        parser.exit(1, f"error: config file {path} is not valid TOML: {e}\n")
    values, problems = _config_values(data, parser, path)
    if problems:
        parser.exit(1, f"error: config file {path}:\n  " + "\n  ".join(problems) + "\n")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv, namespace=argparse.Namespace(**values))
    args.config_file = os.path.splitext(args.config_file)[0]
    return args


def _config_values(data: dict, parser: argparse.ArgumentParser, path: str) -> tuple[dict, list[str]]:
    flat, where, problems = {}, {}, []
    for key, value in data.items():
        for k, v, table in ([(k, v, f"[{key}]") for k, v in value.items()] if isinstance(value, dict)
                            else [(key, value, "top level")]):
            if k in flat and flat[k] != v:
                logger.warning("config file %s: '%s' in %s replaces the value in %s", path, k, table, where[k])
            flat[k], where[k] = v, table
    actions, values = option_actions(parser), {}
    for key, value in flat.items():
        if key in ("config_file", "output_config"):
            continue
        action = actions.get(key)
        if action is None:
            message = _unknown_key(key, actions)
            if message:
                problems.append(f"{where[key]}: {message}")
            continue
        try:
            values[key] = _convert(action, value)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            problems.append(f"{where[key]}: '{key}' {e}")
    return values, problems


def _unknown_key(key: str, actions: dict) -> str | None:
    import difflib

    if key in ("datasets", "general", "subsets"):
        return f"'{key}' belongs in a dataset config: give that file with --dataset_config"
    if key in _all_flux_option_names():
        logger.warning("config file key '%s' is an option of another FLUX trainer: ignored", key)
        return None
    close = difflib.get_close_matches(key, list(actions), n=1, cutoff=0.7)
    return f"unknown option '{key}'" + (f" (did you mean '{close[0]}'?)" if close else "")


@functools.lru_cache(maxsize=1)
def _all_flux_option_names() -> frozenset[str]:
    """Options of any FLUX trainer (keys a shared config file may hold for another trainer)."""
    p = argparse.ArgumentParser(conflict_handler="resolve", add_help=False)
    for add in (add_logging_arguments, add_model_path_arguments, add_modelspec_arguments, add_training_arguments,
                add_deepspeed_arguments, add_custom_train_arguments, add_dit_arguments, add_flux_arguments,
                add_network_arguments, add_full_train_arguments):
        add(p)
    add_dataset_arguments(p, support_controlnet=True)
    return frozenset(option_actions(p))


def _convert(action: argparse.Action, value):
    """A TOML value as the option's type: the value argparse would have made from the command line."""
    if isinstance(value, dict):
        raise TypeError("is a table; options are plain values")
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise TypeError(f"is a switch: write true or false, not {value!r}")
        return value
    many = action.nargs in ("*", "+") or isinstance(action.nargs, int)
    if isinstance(value, list) and not many:
        raise TypeError(f"takes one value, not a list {value!r}")
    if many:
        return [_convert_one(action, v) for v in (value if isinstance(value, list) else [value])]
    return _convert_one(action, value)


def _convert_one(action: argparse.Action, value):
    kind = action.type
    number = getattr(kind, "base", kind)  # a checked number type (library.formats.command_line) checks TOML values too
    if not isinstance(value, (str, int, float, bool)):
        raise TypeError(f"must be a plain value, not {value!r}")
    if kind in (None, str):
        if isinstance(value, bool):
            raise TypeError(f"takes text, not {value!r}")
        value = str(value)
    elif number in (int, float):
        if isinstance(value, bool):
            raise TypeError(f"takes a number, not {value!r}")
        if number is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"takes an integer, not {value!r}")
        value = kind(value)
    elif isinstance(value, str) or kind is Path:
        value = kind(value)
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"must be one of {', '.join(map(str, action.choices))}, not {value!r}")
    return value


def write_config_file(args: argparse.Namespace, parser: argparse.ArgumentParser, path: str) -> None:
    """Write the options that differ from the defaults as flat TOML (secrets left out); refuse to overwrite."""
    if os.path.exists(path):
        parser.exit(1, f"error: config file {path} already exists: not overwritten\n")
    defaults = parser_defaults(parser)
    lines = []
    for key, value in vars(args).items():
        if key in _NOT_WRITTEN or value is None or (key in defaults and value == defaults[key]):
            continue
        lines.append(f"{key} = {_toml_value(value)}")
    text = "".join(line + "\n" for line in lines)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        return {float("inf"): "inf", float("-inf"): "-inf"}.get(value, repr(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value if v is not None) + "]"
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")
