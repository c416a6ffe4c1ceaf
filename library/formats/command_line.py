"""Command lines that answer a mistake with one line: the parser every entry point uses and checked number types.

    p = ArgumentParser(description=...)
    p.add_argument("--steps", type=positive_int)   # --steps 0 -> "error: argument --steps: must be 1 or more, got 0"

It lives in formats/, the lowest layer, because every layer that builds a parser imports it: the dataset options
(`library.data.arguments`), the trainers' options (`library.training.arguments`), the shell (`library.cli`) and the
entry points (flux_minimal_inference.py, the LoRA tools, tools/). A command line is a text format; this module
imports nothing of ours and no torch, so --help stays instant.
"""

from __future__ import annotations

import argparse
import difflib
from typing import Callable


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors.

    * options are never abbreviated: `--network_di 8` is an unknown option, not a silent `--network_dim 8`;
    * an unknown option names the closest options ("did you mean --network_dim?") instead of printing the usage;
    * every error is one line `prog: error: ...` with exit status 2 (argparse prints the whole usage first)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.error(self.unknown_arguments_message(unknown))
        return parsed

    def unknown_arguments_message(self, unknown: list[str]) -> str:
        """`unknown option --netwrk_dim (did you mean --network_dim?)` for each unknown option; values that
        followed an unknown option are not named (they belong to it)."""
        options = [u.split("=", 1)[0] for u in unknown if u.startswith("-") and u not in ("-", "--")]
        if not options:
            return f"unexpected argument {' '.join(unknown)}: every value follows its --option; see --help"
        known = [o for o in self._option_string_actions if o.startswith("--") and o != "--help"]
        parts = []
        for option in options:
            close = closest(option, known)
            parts.append(f"unknown option {option}" + (f" (did you mean {' or '.join(close)}?)" if close else ""))
        return "; ".join(parts) + "; see --help"

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def closest(name: str, names: list[str]) -> list[str]:
    """Up to three of `names` nearest to `name`: those about as near as the nearest (a typo of --network_dim names
    --network_dim alone, not every --network_* option)."""
    scored = sorted(((difflib.SequenceMatcher(None, name, n).ratio(), n) for n in names), reverse=True)
    return [n for ratio, n in scored[:3] if ratio >= max(0.6, scored[0][0] - 0.1)] if scored else []


def number_in(kind: type, low: float | None = None, high: float | None = None, *,
              above: bool = False) -> Callable[[str | int | float], int | float]:
    """An argparse `type=` that converts to `kind` (int or float) and accepts low <= value <= high (low < value with
    `above`); anything else is one line saying what is allowed and what was given. Values from a --config_file TOML
    (numbers already) pass through the same check; `.base` names the number type for it."""
    if above:
        allowed = f"above {low}"
    elif high is None:
        allowed = f"{low} or more"
    else:
        allowed = f"from {low} to {high}"
    noun = "an integer" if kind is int else "a number"

    def convert(value):
        if isinstance(value, bool):  # TOML true/false is no number
            raise argparse.ArgumentTypeError(f"must be {noun}, got {value!r}")
        try:
            number = kind(value)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be {noun} {allowed}, got {value!r}") from None
        if not ((low < number) if above else (low <= number)) or (high is not None and number > high):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {value}")  # NaN fails every comparison
        return number

    convert.base = kind
    convert.__name__ = f"{kind.__name__} {allowed}"
    return convert


positive_int = number_in(int, 1)
non_negative_int = number_in(int, 0)
positive_float = number_in(float, 0, above=True)
non_negative_float = number_in(float, 0)
fraction = number_in(float, 0, 1)  # probabilities and shares: dropout rates, --validation_split
# random.seed takes any int, but numpy (seeded from it by accelerate's set_seed) only 0 to 2**32 - 1
seed_int = number_in(int, 0, 2**32 - 1)
