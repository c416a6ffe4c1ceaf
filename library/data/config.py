"""sd-scripts-compatible dataset configuration (`--dataset_config` TOML/JSON or command-line fallbacks).

Everything is resolved and validated here, before any model loads, and every problem found is reported at once
(one line each, naming the file, the table and the key). Reference: sd-scripts-flux.md sections 1.5, 2 and 18.4.
Deliberate differences from sd-scripts (its bugs or silent failures): a dataset without subsets is an error (not
ControlNet); `validation_split = 1` is accepted and values outside [0, 1] are errors (not a warning); missing or
empty image folders are errors; bucket steps need only be multiples of 16; without bucketing the resolution must
be a multiple of 16; text-encoder caching also rejects `caption_dropout_every_n_epochs` and `enable_wildcard`.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from library.data import NOTE
from library.data.schema import (  # noqa: F401 (INTERPOLATIONS, resolve_resolution: re-exported)
    CLI_NAMES, COMMAND_LINE_ONLY, HINTS, IMAGE_EXTENSIONS, INTERPOLATIONS, INVALID, KIND_KEYS, KIND_NAMES, KIND_ONLY,
    LEVEL_KEYS, LEVEL_NAMES, NO_CLI_FALLBACK, REFERENCE_ALIASES, BadValue, convert_value, resolve_resolution,
    show_value,
)

logger = logging.getLogger(__name__)



class DatasetConfigError(ValueError):
    """Every problem of a dataset configuration, one line each (`problems` holds the lines)."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        count = f"{len(problems)} problem" + ("s" if len(problems) != 1 else "")
        super().__init__(f"invalid dataset configuration ({count}):\n" + "\n".join(f"  {p}" for p in problems))


@dataclass
class SubsetConfig:
    """One `[[datasets.subsets]]` entry with every value resolved (subset > dataset > general > CLI > default).

    Paths are kept as written: relative ones are relative to the current working directory (as in sd-scripts),
    not to the config file. `index` is the 1-based position in its dataset, `where` the file and table for
    messages, `sources` maps each key to where its value came from ("[general]", "--flip_aug", "default", ...).
    """

    image_dir: Path | None = None
    num_repeats: int = 1
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    color_aug: bool = False
    flip_aug: bool = False
    face_crop_aug_range: tuple[float, float] | None = None
    random_crop: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    token_warmup_min: int = 1
    token_warmup_step: float = 0
    custom_attributes: dict = field(default_factory=dict)
    resize_interpolation: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    is_reg: bool = False
    alpha_mask: bool = False
    caption_extension: str = ".caption"
    class_tokens: str | None = None
    cache_info: bool = False
    metadata_file: Path | None = None
    conditioning_data_dir: Path | None = None
    fill_mask_dir: Path | None = None  # FLUX.1 Fill: masks (white = generate) matched to the images by file stem
    reference_image_dir: Path | None = None  # FLUX.1 Kontext: reference images matched to the images by file stem
    index: int = 1
    where: str = field(default="", compare=False, repr=False)
    sources: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def kind(self) -> str:
        """"controlnet" (has conditioning_data_dir), "finetune" (has metadata_file) or "dreambooth"."""
        return _subset_kind({"conditioning_data_dir": self.conditioning_data_dir, "metadata_file": self.metadata_file})


@dataclass
class DatasetConfig:
    """One `[[datasets]]` entry: its kind, dataset-level values (resolution as (w, h)) and its subsets.

    `index` is the 1-based position in the file; `where`/`sources` as in SubsetConfig.
    """

    kind: str = "dreambooth"
    subsets: list[SubsetConfig] = field(default_factory=list)
    index: int = 1
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    resolution: tuple[int, int] | None = None
    network_multiplier: float = 1.0
    validation_seed: int | None = None
    validation_split: float = 0.0
    resize_interpolation: str | None = None
    prior_loss_weight: float = 1.0
    debug_dataset: bool = False
    # FLUX.1 Kontext: a dataset with reference images buckets with these sizes (at 1 MP; scaled to `resolution`)
    bucket_sizes: tuple[tuple[int, int], ...] | None = None
    where: str = field(default="", compare=False, repr=False)
    sources: dict = field(default_factory=dict, compare=False, repr=False)


@dataclass
class DatasetGroupConfig:
    """All datasets of one run; `source` is the config file path or "command line"."""

    datasets: list[DatasetConfig]
    source: str

    def all_subsets(self) -> list[SubsetConfig]:
        """Every subset of every dataset, in order."""
        return [s for d in self.datasets for s in d.subsets]


_SUBSET_FIELDS = [f.name for f in fields(SubsetConfig) if f.name not in ("index", "where", "sources")]
_DATASET_FIELDS = [f.name for f in fields(DatasetConfig) if f.name not in ("kind", "subsets", "index", "where",
                                                                            "sources", "bucket_sizes")]


# --- reading -----------------------------------------------------------------------------------------------------


class _Problems:
    """Ordered, de-duplicated problem lines."""

    def __init__(self):
        self.lines: list[str] = []

    def add(self, where: str, message: str):
        line = f"{where}: {message}"
        if line not in self.lines:
            self.lines.append(line)

    def raise_if_any(self):
        if self.lines:
            raise DatasetConfigError(self.lines)


@dataclass
class _Context:
    source: str
    args: argparse.Namespace
    supported: set
    problems: _Problems

    def where(self, table: str) -> str:
        return f"{self.source}: {table}" if table else self.source


def _subset_kind(raw: dict) -> str:
    if raw.get("conditioning_data_dir") is not None:
        return "controlnet"
    return "finetune" if raw.get("metadata_file") is not None else "dreambooth"


def _kind_reason(kind: str) -> str:
    return {"controlnet": "it has 'conditioning_data_dir'", "finetune": "it has 'metadata_file'",
            "dreambooth": "it has neither 'metadata_file' nor 'conditioning_data_dir'"}[kind]


def _check_table(raw: dict, level: str, table: str, ctx: _Context, kind: str | None = None) -> dict:
    """Report unknown, misplaced and mistyped keys of one table; return the valid entries, converted."""
    clean = {}
    allowed = LEVEL_KEYS[level]
    for key, value in raw.items():
        if key not in allowed:
            ctx.problems.add(ctx.where(table), _misplaced_key_message(key, level))
        elif level == "subset" and key in KIND_ONLY and key not in KIND_KEYS[kind]:
            owners = " or ".join(KIND_NAMES[k] for k in KIND_KEYS if key in KIND_KEYS[k])
            ctx.problems.add(ctx.where(table), f"'{key}' is only allowed in {owners} subsets; this subset is "
                             f"{KIND_NAMES[kind]} ({_kind_reason(kind)})")
        elif key != "subsets" and value is not None:  # JSON null counts as absent
            try:
                clean[key] = convert_value(key, value)
            except BadValue as e:
                ctx.problems.add(ctx.where(table), str(e))
                clean[key] = INVALID
    return clean


def _misplaced_key_message(key: str, level: str) -> str:
    levels = [name for lvl, name in LEVEL_NAMES.items() if key in LEVEL_KEYS[lvl]]
    if levels:
        return f"'{key}' is only allowed in {' or '.join(levels)}"
    if key in HINTS:
        return f"unknown key '{key}'; {HINTS[key]}"
    if key in COMMAND_LINE_ONLY:
        return f"'{key}' is a command-line option (--{key}), not a dataset config key"
    close = difflib.get_close_matches(key, sorted(LEVEL_KEYS[level] - {"subsets"}), n=1, cutoff=0.6)
    suggestion = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown key '{key}' in {LEVEL_NAMES[level]}{suggestion}"


def _cli_value(key: str, ctx: _Context):
    """The argparse value for a config key (with sd-scripts' name mapping), as (value, '--option') or None."""
    if key in NO_CLI_FALLBACK:
        return None
    names = ["caption_extention", "caption_extension"] if key == "caption_extension" else [CLI_NAMES.get(key, key)]
    for name in names:
        value = getattr(ctx.args, name, None)
        if value is not None:
            return value, f"--{name}"
    return None


def _resolve(keys: list[str], layers: list[tuple[dict, str]], ctx: _Context, defaults) -> tuple[dict, dict]:
    """First value found per key in layers (clean dicts, most specific first), then the CLI, then the default.

    A bad value (already reported) resolves to the default with the source "invalid".
    """
    values, sources = {}, {}
    for key in keys:
        found = next(((table[key], label) for table, label in layers if key in table), None)
        if found is None and (found := _cli_value(key, ctx)) is not None:
            try:
                found = (convert_value(key, found[0]), found[1])
            except BadValue as e:
                ctx.problems.add(f"command line {found[1]}", str(e))
                found = (INVALID, found[1])
        if found is None:
            values[key], sources[key] = getattr(defaults, key), "default"
        elif found[0] is INVALID:
            values[key], sources[key] = getattr(defaults, key), "invalid"
        else:
            values[key], sources[key] = found
    return values, sources


def _build_dataset(raw: dict, index: int, table: str, sub_tables: list[str], general: dict,
                   ctx: _Context) -> DatasetConfig | None:
    """Resolve one dataset from its raw table (`sub_tables` label its subsets); None when unusable."""
    clean = _check_table(raw, "dataset", table, ctx)
    raw_subsets = raw.get("subsets", [])
    if not isinstance(raw_subsets, list) or not all(isinstance(s, dict) for s in raw_subsets):
        ctx.problems.add(ctx.where(table), f"'subsets' must be an array of tables ([[datasets.subsets]]), "
                         f"got {show_value(raw_subsets)}")
        return None
    if not raw_subsets:
        ctx.problems.add(ctx.where(table), f"dataset {index} has no subsets: add [[datasets.subsets]] with "
                         "'image_dir' (DreamBooth), 'metadata_file' (fine-tuning) or 'image_dir' + "
                         "'conditioning_data_dir' (ControlNet)")
        return None
    kinds = [_subset_kind(s) for s in raw_subsets]
    values, sources = _resolve(_DATASET_FIELDS, [(clean, table), (general, "[general]")], ctx, DatasetConfig())
    dataset = DatasetConfig(kind=kinds[0], index=index, where=ctx.where(table), sources=sources, **values)
    if len(set(kinds)) > 1:
        groups = "; ".join(f"{KIND_NAMES[k]}: subsets " + ", ".join(f"#{i}" for i, sk in enumerate(kinds, 1)
                                                                     if sk == k) for k in dict.fromkeys(kinds))
        ctx.problems.add(ctx.where(table), f"mixes subset kinds ({groups}); a dataset holds one kind only "
                         "('metadata_file' marks fine-tuning, 'conditioning_data_dir' ControlNet): use separate "
                         "[[datasets]]")
    for kind in dict.fromkeys(kinds):
        if kind not in ctx.supported:
            ctx.problems.add(ctx.where(table), _unsupported_message(kind, ctx.supported))
    seen = {}
    for i, (raw_sub, kind, sub_table) in enumerate(zip(raw_subsets, kinds, sub_tables), 1):
        sub_clean = _check_table(raw_sub, "subset", sub_table, ctx, kind)
        _reference_alias(sub_clean, sub_table, ctx)
        values, sub_sources = _resolve(_SUBSET_FIELDS, [(sub_clean, sub_table), (clean, table),
                                                        (general, "[general]")], ctx, SubsetConfig())
        if kind == "controlnet":
            # the conditioning image supplies masks, never the alpha channel (as in sd-scripts)
            values["alpha_mask"], sub_sources["alpha_mask"] = False, "default"
        subset = SubsetConfig(index=i, where=ctx.where(sub_table), sources=sub_sources, **values)
        if subset.num_repeats < 1:
            logger.warning("%s: num_repeats is %d, subset ignored", subset.where, subset.num_repeats)
            continue
        # sd-scripts' identity of a subset: DreamBooth image_dir, fine-tuning metadata_file, ControlNet both dirs
        paths = {"dreambooth": [subset.image_dir], "finetune": [subset.metadata_file],
                 "controlnet": [subset.image_dir, subset.conditioning_data_dir]}[kind]
        identity = (kind, *(None if p is None else str(p.resolve()) for p in paths))
        if identity in seen:
            logger.warning("%s: same folders/files as subset #%d of this dataset, ignored", subset.where,
                           seen[identity])
            continue
        seen[identity] = i
        _check_subset(subset, ctx)
        dataset.subsets.append(subset)
    if not dataset.subsets:
        ctx.problems.add(ctx.where(table), "no usable subsets: every subset has num_repeats < 1")
    _check_dataset(dataset, ctx)
    return dataset


def _reference_alias(clean: dict, table: str, ctx: _Context) -> None:
    """musubi-tuner's `control_directory` read as `reference_image_dir`; both at once, or either where the trainer
    takes no reference images, is a problem."""
    for alias, key in REFERENCE_ALIASES.items():
        if alias in clean:
            if key in clean:
                ctx.problems.add(ctx.where(table), f"'{alias}' and '{key}' name the same folder; keep one")
            clean.setdefault(key, clean.pop(alias))
    if "reference_image_dir" in clean and "reference" not in ctx.supported:
        ctx.problems.add(ctx.where(table), "'reference_image_dir' (reference images) is for FLUX.1 Kontext "
                         "training: pass --model_type kontext, or remove the key")


def _unsupported_message(kind: str, supported: set) -> str:
    if kind == "controlnet":
        return ("ControlNet subsets ('conditioning_data_dir') need --masked_loss (the conditioning image's red "
                "channel as loss mask), a frozen ControlNet (--controlnet_model_name_or_path) or "
                "flux_train_control_net.py")
    if supported == {"controlnet"}:
        return (f"{KIND_NAMES[kind]} subsets are not supported by ControlNet training: every subset needs "
                "'image_dir' and 'conditioning_data_dir'")
    return f"{KIND_NAMES[kind]} subsets are not supported by this trainer"


# --- checks on resolved values -----------------------------------------------------------------------------------


def _check_folder(path: Path, key: str, where: str, ctx: _Context, need_images: bool):
    if not path.exists():
        ctx.problems.add(where, f"'{key}' folder {_show_path(path)} does not exist")
    elif not path.is_dir():
        ctx.problems.add(where, f"'{key}' {_show_path(path)} is not a folder")
    elif need_images:
        try:
            found = any(p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() for p in path.iterdir())
        except OSError as e:
            ctx.problems.add(where, f"'{key}' folder {_show_path(path)} cannot be read: {e.strerror}")
            return
        if not found:
            ctx.problems.add(where, f"'{key}' folder {_show_path(path)} is empty: no {' '.join(IMAGE_EXTENSIONS)} "
                             "images directly inside (subfolders are not searched)")


def _show_path(path: Path) -> str:
    shown = f"'{path}'"
    return shown if path.is_absolute() else f"{shown} (relative to the current folder {Path.cwd()})"


def _check_subset(subset: SubsetConfig, ctx: _Context):
    kind, where = subset.kind, subset.where
    if subset.image_dir is None and kind != "finetune":
        ctx.problems.add(where, f"missing required key 'image_dir' ({KIND_NAMES[kind]} subset)")
    if subset.image_dir is not None:
        _check_folder(subset.image_dir, "image_dir", where, ctx, need_images=kind != "finetune")
    if subset.conditioning_data_dir is not None:
        _check_folder(subset.conditioning_data_dir, "conditioning_data_dir", where, ctx, need_images=True)
    if subset.metadata_file is not None and not subset.metadata_file.is_file():
        state = "is not a file" if subset.metadata_file.exists() else "does not exist"
        ctx.problems.add(where, f"'metadata_file' {_show_path(subset.metadata_file)} {state}")
    if subset.fill_mask_dir is not None:
        _check_folder(subset.fill_mask_dir, "fill_mask_dir", where, ctx, need_images=True)
        if "fill" not in ctx.supported:
            ctx.problems.add(where, "'fill_mask_dir' (inpainting masks) is for FLUX.1 Fill training: give a Fill "
                             "model (--model_type fill), or remove the key")
        for key, what in (("random_crop", "cropped"),):
            if getattr(subset, key):
                ctx.problems.add(where, f"'{key}'{_origin(subset, key)} cannot be used with 'fill_mask_dir': the "
                                 f"mask would not be {what} the same way")
    if subset.reference_image_dir is not None:
        _check_folder(subset.reference_image_dir, "reference_image_dir", where, ctx, need_images=True)
        for key, what in (("random_crop", "cropped"), ("color_aug", "recoloured")):
            if getattr(subset, key):
                ctx.problems.add(where, f"'{key}'{_origin(subset, key)} cannot be used with 'reference_image_dir': "
                                 f"the reference would not be {what} the same way")
    if kind == "controlnet" and subset.random_crop:
        ctx.problems.add(where, f"'random_crop'{_origin(subset, 'random_crop')} cannot be used in a ControlNet "
                         "subset: the conditioning image would not be cropped the same way")


def _check_dataset(dataset: DatasetConfig, ctx: _Context):
    where, res = dataset.where, dataset.resolution
    keys = ("resolution", "enable_bucket", "bucket_reso_steps", "min_bucket_reso", "max_bucket_reso")
    if any(dataset.sources.get(k) == "invalid" for k in keys):
        return  # already reported; checking the stand-in defaults would only add noise
    if res is None:
        ctx.problems.add(where, "'resolution' is missing: set it in [general] or [[datasets]], or pass --resolution")
        return
    if not dataset.enable_bucket:
        if res[0] % 16 or res[1] % 16:  # FLUX packs 2x2 latent patches of the /8 latent
            ctx.problems.add(where, f"'resolution' {res[0]}x{res[1]} must be a multiple of 16 for FLUX without "
                             "bucketing (or set enable_bucket = true)")
        return
    steps, lo, hi = dataset.bucket_reso_steps, dataset.min_bucket_reso, dataset.max_bucket_reso
    if steps % 16:
        ctx.problems.add(where, f"'bucket_reso_steps' must be a multiple of 16 for FLUX, got {steps}")
    if min(res) < lo:
        ctx.problems.add(where, f"'min_bucket_reso' {lo} is larger than the smaller side of 'resolution' "
                         f"{res[0]}x{res[1]}")
    if max(res) > hi:
        ctx.problems.add(where, f"'max_bucket_reso' {hi} is smaller than the larger side of 'resolution' "
                         f"{res[0]}x{res[1]}")
    if steps % 16 == 0 and lo % steps:
        dataset.min_bucket_reso = max(steps, lo - lo % steps)
        logger.warning("%s: min_bucket_reso %d is not a multiple of bucket_reso_steps %d: rounded down to %d",
                       where, lo, steps, dataset.min_bucket_reso, extra=NOTE)
    if steps % 16 == 0 and hi % steps:
        dataset.max_bucket_reso = hi + steps - hi % steps
        logger.warning("%s: max_bucket_reso %d is not a multiple of bucket_reso_steps %d: rounded up to %d",
                       where, hi, steps, dataset.max_bucket_reso, extra=NOTE)


def _origin(config, key: str) -> str:
    source = config.sources.get(key, "")
    if not source or config.where.endswith(": " + source):
        return ""
    return f" (set by {source} on the command line)" if source.startswith("--") else f" (inherited from {source})"


_LATENT_CACHE_CONFLICTS = {"random_crop": "the crop would be the same every epoch",
                           "color_aug": "the colour change would be the same every epoch"}
_TE_CACHE_CONFLICTS = {
    "shuffle_caption": lambda v: v, "caption_dropout_rate": lambda v: v > 0,
    "caption_dropout_every_n_epochs": lambda v: v > 0, "caption_tag_dropout_rate": lambda v: v > 0,
    "token_warmup_step": lambda v: v > 0, "enable_wildcard": lambda v: v,
}


def _contradictions(group: DatasetGroupConfig, args) -> list[str]:
    problems = _Problems()
    latents = [f"--{n}" for n in ("cache_latents", "cache_latents_to_disk") if getattr(args, n, False)]
    te = [f"--{n}" for n in ("cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk")
          if getattr(args, n, False)]
    for subset in group.all_subsets():
        for key, why in _LATENT_CACHE_CONFLICTS.items():
            if latents and getattr(subset, key):
                problems.add(subset.where, f"'{key}'{_origin(subset, key)} cannot be used with {latents[-1]}: "
                             f"latents are encoded once, so {why}; drop one of them")
        for key, active in _TE_CACHE_CONFLICTS.items():
            if te and active(getattr(subset, key)):
                problems.add(subset.where, f"'{key}'{_origin(subset, key)} cannot be used with {te[-1]}: the "
                             "text encoders see each caption once, so the caption must not change between "
                             "epochs; drop one of them")
    return problems.lines


def validate_against_training_args(group: DatasetGroupConfig, args: argparse.Namespace) -> None:
    """Reject dataset settings that contradict caching options of `args`; raises DatasetConfigError.

    Latent caching (`cache_latents`, `cache_latents_to_disk`) excludes random_crop and color_aug; text-encoder
    output caching excludes everything that changes a caption between epochs (shuffle, dropout, token warm-up,
    wildcards). Prefixes and suffixes are fine: they are applied before caching.
    """
    lines = _contradictions(group, args)
    if lines:
        raise DatasetConfigError(lines)


# --- entry points ------------------------------------------------------------------------------------------------


def load_dataset_config(args: argparse.Namespace, *, support_dreambooth: bool = True, support_finetuning: bool = True,
                        support_controlnet: bool | None = None, support_reference: bool = False,
                        reference_buckets: tuple[tuple[int, int], ...] | None = None,
                        support_fill: bool = False) -> DatasetGroupConfig:
    """Resolve and validate the datasets of a run from `args.dataset_config` or the command-line fallbacks.

    The support flags say which dataset kinds the trainer accepts; `support_controlnet=None` means
    `args.masked_loss` (as in sd-scripts' LoRA and full fine-tuning trainers). A ControlNet-only trainer
    (`support_dreambooth=support_finetuning=False, support_controlnet=True`) builds its command-line dataset from
    `--train_data_dir` + `--conditioning_data_dir`. `support_reference`: subsets may name reference images
    (`reference_image_dir`, FLUX.1 Kontext); a dataset holding such a subset buckets with `reference_buckets`
    (sizes at 1 MP) when given. Raises DatasetConfigError listing every problem.
    """
    if support_controlnet is None:
        support_controlnet = bool(getattr(args, "masked_loss", False))
    supported = {k for k, on in (("dreambooth", support_dreambooth), ("finetune", support_finetuning),
                                 ("controlnet", support_controlnet), ("reference", support_reference),
                                 ("fill", support_fill)) if on}
    config_path = getattr(args, "dataset_config", None)
    ctx = _Context(str(config_path) if config_path else "command line", args, supported, _Problems())
    if config_path:
        ignored = [f"--{n}" for n in ("train_data_dir", "reg_data_dir", "in_json", "conditioning_data_dir")
                   if getattr(args, n, None)]
        if ignored:
            logger.warning("%s ignored: --dataset_config %s defines the datasets", ", ".join(ignored), config_path)
        datasets = _datasets_from_file(Path(config_path), ctx)
    else:
        datasets = _datasets_from_command_line(ctx)
    group = DatasetGroupConfig([d for d in datasets if d is not None], ctx.source)
    for dataset in group.datasets:
        if reference_buckets and any(s.reference_image_dir is not None for s in dataset.subsets):
            dataset.bucket_sizes = tuple(reference_buckets)
    ctx.problems.lines += [line for line in _contradictions(group, args) if line not in ctx.problems.lines]
    ctx.problems.raise_if_any()
    return group


def _read_file(path: Path, ctx: _Context) -> dict | None:
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        ctx.problems.add(ctx.source, "a dataset config must be a .toml or .json file")
    elif not path.is_file():
        ctx.problems.add(ctx.source, "dataset config file not found")
    else:
        try:
            text = path.read_text(encoding="utf-8")
            data = tomllib.loads(text) if suffix == ".toml" else json.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
            ctx.problems.add(ctx.source, f"cannot be read as {suffix[1:].upper()}: {e}")
            return None
        if isinstance(data, dict):
            return data
        ctx.problems.add(ctx.source, f"must hold a table with [general] and [[datasets]], got {show_value(data)}")
    return None


def _datasets_from_file(path: Path, ctx: _Context) -> list:
    data = _read_file(path, ctx)
    if data is None:
        ctx.problems.raise_if_any()
    for key in data:
        if key not in ("general", "datasets"):
            hint = "; did you mean 'datasets'?" if key in ("dataset", "subsets") else ""
            ctx.problems.add(ctx.source, f"unknown top-level key '{key}': only [general] and [[datasets]] are "
                             f"allowed{hint}")
    general = data.get("general", {})
    if not isinstance(general, dict):
        ctx.problems.add(ctx.where("[general]"), f"'general' must be a table, got {show_value(general)}")
        general = {}
    general = _check_table(general, "general", "[general]", ctx)
    raw_datasets = data.get("datasets", [])
    if not isinstance(raw_datasets, list) or not all(isinstance(d, dict) for d in raw_datasets):
        ctx.problems.add(ctx.source, "'datasets' must be an array of tables ([[datasets]]), "
                                     f"got {show_value(raw_datasets)}")
        return []
    if not raw_datasets:
        ctx.problems.add(ctx.source, "no [[datasets]] table")
    out = []
    for i, raw in enumerate(raw_datasets, 1):
        table = f"[[datasets]] #{i}"
        subs = raw.get("subsets")
        count = len(subs) if isinstance(subs, list) else 0
        sub_tables = [f"{table} > [[datasets.subsets]] #{j}" for j in range(1, count + 1)]
        out.append(_build_dataset(raw, i, table, sub_tables, general, ctx))
    return out


_FOLDER_NAME = re.compile(r"^(\d+)(?:_(.*))?$")


def _dreambooth_folders(parent: str, is_reg: bool, option: str, ctx: _Context) -> tuple[list, list]:
    """Subsets from `<repeats>_<class tokens>` subfolders of `parent` (reference 2.4)."""
    root = Path(parent).expanduser()
    if not root.is_dir():
        ctx.problems.add(f"command line {option}", f"folder {_show_path(root)} does not exist")
        return [], []
    subsets, tables = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        match = _FOLDER_NAME.match(folder.name)
        if not match:
            logger.warning("%s: folder '%s' ignored: not named <repeats>_<class tokens>", option, folder.name)
        elif int(match.group(1)) < 1:
            logger.warning("%s: folder '%s' ignored: repeats are %s", option, folder.name, match.group(1))
        else:
            subsets.append({"image_dir": str(folder), "num_repeats": int(match.group(1)), "is_reg": is_reg,
                            "class_tokens": match.group(2) or None})
            tables.append(f"{option} folder '{folder.name}'")
    if not subsets:
        ctx.problems.add(f"command line {option}", f"no <repeats>_<class tokens> subfolders (e.g. '10_sks dog') "
                         f"with repeats >= 1 in {_show_path(root)}")
    return subsets, tables


def _datasets_from_command_line(ctx: _Context) -> list:
    args = ctx.args
    train_dir, in_json = getattr(args, "train_data_dir", None), getattr(args, "in_json", None)
    reg_dir = getattr(args, "reg_data_dir", None)
    if ctx.supported == {"controlnet"}:
        cond_dir = getattr(args, "conditioning_data_dir", None)
        if not train_dir or not cond_dir:
            ctx.problems.add("command line", "ControlNet training needs --dataset_config, or --train_data_dir and "
                             "--conditioning_data_dir")
            return []
        subsets = [{"image_dir": train_dir, "conditioning_data_dir": cond_dir, "num_repeats": 1}]
        tables = ["--train_data_dir/--conditioning_data_dir"]
    elif in_json:
        subsets = [{"metadata_file": in_json, "image_dir": train_dir}]
        tables = ["--in_json"]
    elif train_dir:
        subsets, tables = _dreambooth_folders(train_dir, False, "--train_data_dir", ctx)
        if reg_dir:
            reg_subsets, reg_tables = _dreambooth_folders(reg_dir, True, "--reg_data_dir", ctx)
            subsets, tables = subsets + reg_subsets, tables + reg_tables
        if getattr(args, "conditioning_data_dir", None):
            logger.warning("--conditioning_data_dir is only used by flux_train_control_net.py without "
                           "--dataset_config; for masks write 'conditioning_data_dir' in [[datasets.subsets]]")
    else:
        ctx.problems.add("command line", "no training data: pass --dataset_config or --train_data_dir")
        return []
    if not subsets:
        return []
    return [_build_dataset({"subsets": subsets}, 1, "dataset", tables, {}, ctx)]
