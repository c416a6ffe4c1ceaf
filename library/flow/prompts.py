"""Sample-prompt files for images rendered during training (reference 12.2, 12.3): .txt, .toml and .json.

    a cat in a hat --w 768 --h 512 --s 28 --d 42 --g 3.5 --l 1.0 --n blurry
    make the cat blue --ri refs/cat.png --ri refs/hat.png

`.txt`: one prompt per line; blank lines and lines starting with `#` are skipped; options follow ` --`. `--ri PATH`
(Kontext reference image) may be repeated, and one value may also list several paths separated by `;`; the
references keep that order. Relative paths are read from the working folder, as `--cn`'s.
`.toml`: a `[prompt]` table of defaults and `[[prompt.subset]]` entries, one prompt each; a subset's keys override
the defaults (sd-scripts raises a TypeError when a key appears in both, reference 17 item 21).
`.json`: a list whose items are dicts with the same keys as the TOML, or strings read like .txt lines.
In TOML and JSON, `reference_images` is a list of paths or one string (`;`-separated like `--ri`).

Unlike sd-scripts, a bad value stops with an error naming the file and the line (or entry) instead of being logged
and skipped, and an unknown option or key is warned about instead of being silently ignored.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

logger = logging.getLogger(__name__)

MAX_STEPS = 1000
MAX_SEED = 2**64 - 1
# Keys sd-scripts reads for other architectures or samplers; FLUX sampling ignores them (reference 12.3).
IGNORED_BY_FLUX = ("sample_sampler", "cfg_trunc_ratio", "renorm_cfg", "flow_shift")


class SamplePromptError(ValueError):
    """A prompt file that cannot be used; the message names the file and the line or entry."""


@dataclass
class SamplePrompt:
    """One sample prompt with sd-scripts' defaults for FLUX (reference 12.3)."""

    prompt: str = ""
    negative_prompt: str = ""  # used only when scale != 1
    width: int = 512
    height: int = 512
    sample_steps: int | None = None  # None: the model's (library/models/variants.py: 20 as sd-scripts, 4 schnell)
    seed: int | None = None  # None: a fresh random seed every time the prompt is rendered
    scale: float = 1.0  # true classifier-free guidance
    guidance_scale: float | None = None  # embedded guidance; None: the model's (3.5 dev; schnell has none)
    index: int = 0  # sd-scripts' `enum`: position in the file, used in image names
    controlnet_image: str | None = None  # ControlNet trainer only
    reference_images: list[str] = field(default_factory=list)  # Kontext: `--ri`, in order; empty: text-to-image
    ignored: dict[str, Any] = field(default_factory=dict)  # sample_sampler etc.: no effect for FLUX
    where: str = field(default="", compare=False)  # "file:line" or "file: subset N", for messages

    @property
    def enum(self) -> int:
        return self.index

    def image_size(self) -> tuple[int, int]:
        """(width, height) rendered: rounded down to a multiple of 16, at least 64 (as sd-scripts does)."""
        return max(64, self.width - self.width % 16), max(64, self.height - self.height % 16)


# ---------------------------------------------------------------------------------------------------------------
# value conversion: every converter takes the raw value (str from .txt, anything from TOML/JSON)


def _as_int(value: Any, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"expected an integer, got {value!r}")
    try:
        number = int(value.strip()) if isinstance(value, str) else value
    except ValueError:
        raise ValueError(f"expected an integer, got {value!r}") from None
    if number < minimum or (maximum is not None and number > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
        raise ValueError(f"expected an integer {bound}, got {number}")
    return number


def _as_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"expected a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"expected a finite number, got {value!r}")
    return number


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"expected text, got {value!r}")
    return value.strip()


def _as_size(value: Any) -> int:
    return _as_int(value, 1)


def _as_steps(value: Any) -> int:
    return _as_int(value, -(2**63))  # clamped to 1..MAX_STEPS by _build, with a warning


def _as_seed(value: Any) -> int | None:
    return None if value is None else _as_int(value, 0, MAX_SEED)


def _as_path(value: Any) -> str | None:
    text = _as_text(value)
    return text or None


def _as_paths(value: Any) -> list[str]:
    """Paths from a string (`a.png;b.png`) or a list of such strings (repeated `--ri`, a TOML/JSON list)."""
    items = value if isinstance(value, list) else [value]
    paths = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"expected a path or a list of paths, got {value!r}")
        paths.extend(p.strip() for p in item.split(";") if p.strip())
    if not paths and items:
        raise ValueError(f"expected one or more paths, got {value!r}")
    return paths


def _keep(value: Any) -> Any:
    return value.strip() if isinstance(value, str) else value


# field name -> converter, for TOML/JSON keys
FIELDS: dict[str, Callable[[Any], Any]] = {
    "prompt": _as_text, "negative_prompt": _as_text, "width": _as_size, "height": _as_size,
    "sample_steps": _as_steps, "seed": _as_seed, "scale": _as_float, "guidance_scale": _as_float,
    "controlnet_image": _as_path, "reference_images": _as_paths, **{k: _keep for k in IGNORED_BY_FLUX},
}
# .txt option (case-insensitive) -> field name (reference 12.2)
TXT_OPTIONS = {
    "w": "width", "h": "height", "d": "seed", "s": "sample_steps", "l": "scale", "g": "guidance_scale",
    "n": "negative_prompt", "ss": "sample_sampler", "cn": "controlnet_image", "ctr": "cfg_trunc_ratio",
    "rcfg": "renorm_cfg", "fs": "flow_shift", "ri": "reference_images",
}
REPEATABLE = ("reference_images",)  # .txt options whose repetitions add up instead of replacing


def _build(values: dict[str, Any], index: int, where: str) -> SamplePrompt:
    """SamplePrompt from already-split raw values; unknown keys were filtered by the caller."""
    prompt = SamplePrompt(index=index, where=where)
    for key, raw in values.items():
        try:
            value = FIELDS[key](raw)
        except ValueError as e:
            raise SamplePromptError(f"{where}: {key}: {e}") from None
        if key == "sample_steps" and not 1 <= value <= MAX_STEPS:
            clamped = max(1, min(MAX_STEPS, value))
            logger.warning("%s: sample_steps %d clamped to %d", where, value, clamped)
            value = clamped
        if key in IGNORED_BY_FLUX:
            prompt.ignored[key] = value
        else:
            setattr(prompt, key, value)
    return prompt


# ---------------------------------------------------------------------------------------------------------------
# formats


def parse_prompt_line(line: str, index: int = 0, where: str = "<prompt>") -> SamplePrompt:
    """One .txt line: the prompt, then options split on " --" (`--w 768 --n blurry`)."""
    chunks = line.strip().split(" --")
    values: dict[str, Any] = {"prompt": chunks[0]}
    for chunk in chunks[1:]:
        name, _, value = chunk.strip().partition(" ")
        field_name = TXT_OPTIONS.get(name.lower())
        if field_name is None:
            logger.warning("%s: unknown option --%s ignored (known: %s)", where, chunk.strip(),
                           ", ".join(f"--{k}" for k in TXT_OPTIONS))
            continue
        if not value.strip() and field_name != "negative_prompt":
            raise SamplePromptError(f"{where}: option --{name} needs a value")
        if field_name in REPEATABLE:
            values.setdefault(field_name, []).append(value)
        else:
            values[field_name] = value
    return _build(values, index, where)


def _from_dict(entry: dict[str, Any], index: int, where: str) -> SamplePrompt:
    values = {}
    for key, value in entry.items():
        if key in ("enum", "subset"):  # sd-scripts sets enum itself and drops subset
            continue
        if key not in FIELDS:
            logger.warning("%s: unknown key %r ignored (known: %s)", where, key, ", ".join(FIELDS))
            continue
        values[key] = value
    return _build(values, index, where)


def _load_txt(path: Path) -> list[SamplePrompt]:
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            prompts.append(parse_prompt_line(line, len(prompts), f"{path}:{number}"))
    return prompts


def _load_toml(path: Path) -> list[SamplePrompt]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except tomllib.TOMLDecodeError as e:
        raise SamplePromptError(f"{path}: not valid TOML: {e}") from None
    table = data.get("prompt")
    if not isinstance(table, dict):
        raise SamplePromptError(f"{path}: a sample-prompt TOML needs a [prompt] table with [[prompt.subset]] entries")
    subsets = table.get("subset")
    if not isinstance(subsets, list) or not subsets or not all(isinstance(s, dict) for s in subsets):
        raise SamplePromptError(f"{path}: [prompt] needs one or more [[prompt.subset]] tables, one per prompt")
    for key in data:
        if key != "prompt":
            logger.warning("%s: top-level key %r ignored (prompts go in [prompt] and [[prompt.subset]])", path, key)
    defaults = {k: v for k, v in table.items() if k != "subset"}
    return [_from_dict({**defaults, **subset}, i, f"{path}: subset {i + 1}") for i, subset in enumerate(subsets)]


def _load_json(path: Path) -> list[SamplePrompt]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise SamplePromptError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, list):
        raise SamplePromptError(f"{path}: a sample-prompt JSON must be a list of prompts (dicts or strings)")
    prompts = []
    for i, item in enumerate(data):
        where = f"{path}: item {i + 1}"
        if isinstance(item, str):
            prompts.append(parse_prompt_line(item, i, where))
        elif isinstance(item, dict):
            prompts.append(_from_dict(item, i, where))
        else:
            raise SamplePromptError(f"{where}: expected a dict or a string, got {type(item).__name__}")
    return prompts


LOADERS = {".txt": _load_txt, ".toml": _load_toml, ".json": _load_json}


def load_prompts(path: str | os.PathLike) -> list[SamplePrompt]:
    """Read a sample-prompt file (.txt, .toml or .json); prompts carry their position in `index`."""
    path = Path(path)
    loader = LOADERS.get(path.suffix.lower())
    if loader is None:
        raise SamplePromptError(f"{path}: sample prompts must be a .txt, .toml or .json file")
    if not path.is_file():
        raise SamplePromptError(f"{path}: sample-prompt file not found")
    prompts = loader(path)
    ignored = sorted({k for p in prompts for k in p.ignored})
    if ignored:
        logger.info("%s: %s have no effect on FLUX sample images", path, ", ".join(ignored))
    return prompts
