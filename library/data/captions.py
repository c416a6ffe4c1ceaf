"""Caption files and per-item caption processing, compatible with sd-scripts (reference 2.6, 3.1, 3.7, 4.3).

Differences from sd-scripts, on purpose (reference 17):

* bug 14: a ``keep_tokens_separator`` found in a caption never stays in the output, even when no
  shuffle / token warm-up / tag dropout is active;
* bug 10: :func:`text_encoder_cache_caption` gives the caption that cached text-encoder outputs must be built
  from (prefix/suffix, separators applied) instead of the raw caption, and :func:`deterministic_caption_options`
  names the options that cannot be honoured with a cache;
* every random decision draws from an explicit ``random.Random`` instead of the global ``random`` module, and
  options are never mutated (sd-scripts overwrites a fractional ``token_warmup_step`` in the subset).
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

__all__ = [
    "CaptionOptions",
    "deterministic_caption_options",
    "find_caption_file",
    "finetune_caption",
    "has_wildcard_choice",
    "process_caption",
    "read_caption_file",
    "tag_frequency",
    "text_encoder_cache_caption",
]

# Private-use code points stand in for escaped "{{" / "}}" while wildcard groups are expanded.
_LBRACE, _RBRACE = "\ue000", "\ue001"
_WILDCARD_GROUP = re.compile(r"\{([^{}]+)\}")


# ----------------------------------------------------------------------------------------------- caption files


def find_caption_file(image_path: str | Path, caption_extension: str) -> Path | None:
    """Caption file for ``dir/name.ext``: ``dir/name<caption_extension>``, else the face-crop fallback.

    Face-crop tools name crops ``<name>_<cx>_<cy>_<w>_<h>``; such a crop (stem with >= 5 ``_``-separated tokens)
    shares the caption of ``<name>``. A missing leading dot on the extension is added, as the config loader does.
    """
    image_path = Path(image_path)
    if caption_extension and not caption_extension.startswith("."):
        caption_extension = "." + caption_extension
    candidates = [image_path.parent / (image_path.stem + caption_extension)]
    tokens = image_path.stem.split("_")
    if len(tokens) >= 5:
        candidates.append(image_path.parent / ("_".join(tokens[:-4]) + caption_extension))
    return next((c for c in candidates if c.is_file()), None)


def read_caption_file(path: str | Path, enable_wildcard: bool = False) -> str:
    """Caption text of a caption file: first non-empty stripped line, or all of them joined by ``\\n`` (wildcard).

    An empty file gives ``""`` (sd-scripts asserts; the caller decides whether to warn). A UTF-8 BOM is ignored.
    """
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"caption file {path} is not valid UTF-8 ({e.reason}); caption files must be UTF-8") from e
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    return "\n".join(lines) if enable_wildcard else lines[0]


def finetune_caption(entry: Mapping, caption_separator: str = ",", enable_wildcard: bool = False) -> str:
    """Caption of one fine-tuning metadata entry (JSON value or JSONL object, reference 2.6).

    Without wildcards: ``caption + caption_separator + tags`` (tags only when non-empty). With wildcards the tags
    must be one line (their newlines become the separator) and are appended to each non-empty caption line, so
    whichever line the wildcard picks carries them. A missing caption falls back to the tags alone.
    """
    caption = entry.get("caption")
    tags = entry.get("tags") or ""
    if enable_wildcard:
        tags = tags.replace("\n", caption_separator)
        if caption is None:
            return tags
        suffix = caption_separator + tags if tags else ""
        return "\n".join(line.strip() + suffix for line in caption.split("\n") if line.strip())
    if caption is None:
        return tags
    return caption + caption_separator + tags if tags else caption


def tag_frequency(captions: Iterable[str]) -> dict[str, int]:
    """Tag counts for ``ss_tag_frequency``: comma-split, stripped, lower-cased, empty tags ignored."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return counts


# ----------------------------------------------------------------------------------------------- options


@dataclasses.dataclass(frozen=True)
class CaptionOptions:
    """Subset-level caption settings; attribute names are sd-scripts' TOML keys (reference 2.3)."""

    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0

    @classmethod
    def from_subset(cls, subset: object) -> CaptionOptions:
        """Read the caption attributes (or keys, for a mapping) of any subset-like object.

        Missing or ``None`` values take the defaults above, except for the options whose default is ``None``.
        """
        values = {}
        for field in dataclasses.fields(cls):
            if isinstance(subset, Mapping):
                value = subset.get(field.name)
            else:
                value = getattr(subset, field.name, None)
            if value is not None:
                values[field.name] = value
        return cls(**values)


def _random_options_active(options: CaptionOptions) -> bool:
    """sd-scripts' gate for step 4 (restructuring); a fractional warm-up counts even if it resolves to 0 steps."""
    return options.shuffle_caption or options.token_warmup_step > 0 or options.caption_tag_dropout_rate > 0


def deterministic_caption_options(options: CaptionOptions, captions: Iterable[str] | None = None) -> list[str]:
    """Names of the set options that change a caption randomly or per epoch, i.e. cannot be text-encoder cached.

    ``enable_wildcard`` is listed when some caption has a choice to make; without ``captions`` that cannot be
    ruled out, so it is listed whenever it is on.
    """
    names = []
    if options.shuffle_caption:
        names.append("shuffle_caption")
    if options.caption_dropout_rate > 0:
        names.append("caption_dropout_rate")
    if options.caption_dropout_every_n_epochs > 0:
        names.append("caption_dropout_every_n_epochs")
    if options.caption_tag_dropout_rate > 0:
        names.append("caption_tag_dropout_rate")
    if options.token_warmup_step > 0:
        names.append("token_warmup_step")
    if options.enable_wildcard and (captions is None or any(has_wildcard_choice(c) for c in captions)):
        names.append("enable_wildcard")
    return names


# ----------------------------------------------------------------------------------------------- processing


def _add_prefix_suffix(caption: str, options: CaptionOptions) -> str:
    if options.caption_prefix:
        caption = options.caption_prefix + " " + caption
    if options.caption_suffix:
        caption = caption + " " + options.caption_suffix
    return caption


def has_wildcard_choice(caption: str) -> bool:
    """True when wildcard expansion of ``caption`` is random: several lines, or a ``{a|b}`` group."""
    if "\n" in caption:
        return True
    escaped = caption.replace("{{", _LBRACE).replace("}}", _RBRACE)
    return any("|" in m.group(1) for m in _WILDCARD_GROUP.finditer(escaped))


def _expand_wildcards(caption: str, rng: random.Random) -> str:
    """Pick a random line, then replace each ``{a|b|c}`` by one alternative; ``{{``/``}}`` are literal braces."""
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    caption = caption.replace("{{", _LBRACE).replace("}}", _RBRACE)
    caption = _WILDCARD_GROUP.sub(lambda m: rng.choice(m.group(1).split("|")), caption)
    return caption.replace(_LBRACE, "{").replace(_RBRACE, "}")


def _split_items(text: str, separator: str) -> list[str]:
    return [t.strip() for t in text.split(separator) if t.strip()]


def _warmup_steps(options: CaptionOptions, max_train_steps: int) -> float:
    """Effective warm-up length: a value below 1 is a fraction of the run (computed, never stored back)."""
    if options.token_warmup_step < 1:
        return math.floor(options.token_warmup_step * max_train_steps)
    return options.token_warmup_step


def _restructure(caption: str, options: CaptionOptions, rng: random.Random, step: int, max_train_steps: int) -> str:
    """Step 4: split into fixed / flex / fixed-suffix items, warm up, shuffle, tag-drop the flex items, re-join."""
    sep, kts = options.caption_separator, options.keep_tokens_separator
    fixed_suffix: list[str] = []
    if kts and kts in caption:
        fixed_part, flex_part = caption.split(kts, 1)
        fixed_suffix_part = ""
        if kts in flex_part:
            flex_part, fixed_suffix_part = flex_part.split(kts, 1)
        fixed = _split_items(fixed_part, sep)
        flex = _split_items(flex_part, sep)
        # sd-scripts leaves a third occurrence inside the suffix verbatim; treat it as one more item boundary.
        fixed_suffix = [item for chunk in fixed_suffix_part.split(kts) for item in _split_items(chunk, sep)]
    else:
        tokens = [t.strip() for t in caption.strip().split(sep)]  # empty items kept, as in sd-scripts
        keep = max(options.keep_tokens, 0)
        fixed, flex = tokens[:keep], tokens[keep:]

    warmup = _warmup_steps(options, max_train_steps)
    if warmup and step < warmup:
        count = math.floor(step * (len(flex) - options.token_warmup_min) / warmup) + options.token_warmup_min
        flex = flex[: max(count, 0)]  # clamp: a non-positive token_warmup_min must not slice from the end
    if options.shuffle_caption:
        rng.shuffle(flex)
    if options.caption_tag_dropout_rate > 0:
        flex = [t for t in flex if rng.random() >= options.caption_tag_dropout_rate]
    return ", ".join(fixed + flex + fixed_suffix)


def process_caption(
    caption: str,
    options: CaptionOptions,
    rng: random.Random,
    epoch: int = 1,
    step: int = 0,
    max_train_steps: int = 0,
) -> str:
    """Caption as fed to the tokenizer for one item (reference 3.7 steps 1-5, in order).

    ``epoch`` is 1-based, ``step`` is the global optimisation step, ``max_train_steps`` resolves a fractional
    ``token_warmup_step``. All randomness comes from ``rng``, consumed in sd-scripts' order: caption dropout,
    wildcard line and groups, shuffle, tag dropout.
    """
    # 1. prefix / suffix
    caption = _add_prefix_suffix(caption, options)

    # 2. whole-caption dropout (the rng is only consumed when a rate is set)
    dropped = options.caption_dropout_rate > 0 and rng.random() < options.caption_dropout_rate
    every_n = options.caption_dropout_every_n_epochs
    if dropped or (every_n > 0 and epoch % every_n == 0):
        return ""

    # 3. wildcards, or the first line only
    caption = _expand_wildcards(caption, rng) if options.enable_wildcard else caption.split("\n")[0]

    # 4. restructuring; also forced when a keep_tokens_separator is present so it never survives (bug 14)
    kts = options.keep_tokens_separator
    if _random_options_active(options) or (kts and kts in caption):
        caption = _restructure(caption, options, rng, step, max_train_steps)

    # 5. secondary separator (after shuffling, so "a;;;b" moves as one tag)
    if options.secondary_separator:
        caption = caption.replace(options.secondary_separator, options.caption_separator)
    return caption


def text_encoder_cache_caption(caption: str, options: CaptionOptions) -> str:
    """Caption that cached text-encoder outputs must encode: the deterministic parts of :func:`process_caption`.

    Prefix/suffix, first line only, keep_tokens_separator removal and the secondary separator are applied; the
    random options are ignored (validation rejects them with caching, see :func:`deterministic_caption_options`).
    With ``enable_wildcard``, a caption without a choice is expanded (``{{``/``}}`` unescaped); one with a choice
    raises ValueError because no single cached encoding can represent it.
    """
    caption = _add_prefix_suffix(caption, options)
    if options.enable_wildcard:
        if has_wildcard_choice(caption):
            raise ValueError(f"caption {caption!r} has a wildcard choice and cannot be text-encoder cached")
        caption = _expand_wildcards(caption, random.Random(0))  # one alternative per group: seed-independent
    else:
        caption = caption.split("\n")[0]
    fixed = dataclasses.replace(
        options,
        shuffle_caption=False,
        caption_dropout_rate=0.0,
        caption_dropout_every_n_epochs=0,
        caption_tag_dropout_rate=0.0,
        token_warmup_step=0,
        enable_wildcard=False,
        caption_prefix=None,
        caption_suffix=None,
    )
    return process_caption(caption, fixed, random.Random(0))
