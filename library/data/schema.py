"""The dataset config schema as data: every key's type and the levels it may appear at, and value conversion.

Split from dataset_config.py (which resolves and validates whole files) so the tables read on their own.
"""

from __future__ import annotations

import json
from pathlib import Path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")
KIND_NAMES = {"dreambooth": "DreamBooth", "finetune": "fine-tuning", "controlnet": "ControlNet"}

# --- key tables: value type of every key, and where it may appear -------------------------------------------------

DATASET_TYPES = {
    "batch_size": "pos_int", "enable_bucket": "bool", "min_bucket_reso": "pos_int", "max_bucket_reso": "pos_int",
    "bucket_reso_steps": "pos_int", "bucket_no_upscale": "bool", "resolution": "resolution",
    "network_multiplier": "float", "validation_seed": "int", "validation_split": "fraction",
    "resize_interpolation": "interpolation",
}
ARGPARSE_ONLY_TYPES = {"prior_loss_weight": "float", "debug_dataset": "bool"}
# subset keys that may also be written in [[datasets]] / [general] and are inherited from there
ASCENDABLE_TYPES = {
    "num_repeats": "int", "shuffle_caption": "bool", "caption_separator": "str", "keep_tokens": "nonneg_int",
    "keep_tokens_separator": "str", "secondary_separator": "str", "enable_wildcard": "bool", "color_aug": "bool",
    "flip_aug": "bool", "face_crop_aug_range": "range", "random_crop": "bool", "caption_prefix": "str",
    "caption_suffix": "str", "token_warmup_min": "nonneg_int", "token_warmup_step": "nonneg_number",
    "custom_attributes": "table", "resize_interpolation": "interpolation", "caption_dropout_rate": "fraction",
    "caption_dropout_every_n_epochs": "nonneg_int", "caption_tag_dropout_rate": "fraction",
    "caption_extension": "str", "class_tokens": "str", "cache_info": "bool",
}
SUBSET_ONLY_TYPES = {"image_dir": "path", "is_reg": "bool", "alpha_mask": "bool", "metadata_file": "path",
                      "conditioning_data_dir": "path", "reference_image_dir": "path", "control_directory": "path",
                      "fill_mask_dir": "path"}
# musubi-tuner's name for the reference folder of its Kontext trainer, read as `reference_image_dir`
REFERENCE_ALIASES = {"control_directory": "reference_image_dir"}
KEY_TYPES = {**DATASET_TYPES, **ARGPARSE_ONLY_TYPES, **ASCENDABLE_TYPES, **SUBSET_ONLY_TYPES}
KIND_ONLY = {"image_dir", "is_reg", "alpha_mask", "metadata_file", "conditioning_data_dir", "caption_extension",
              "class_tokens", "cache_info", "reference_image_dir", "control_directory", "fill_mask_dir"}
KIND_KEYS = {  # subset keys beyond the common ones, per kind
    "dreambooth": {"image_dir", "is_reg", "alpha_mask", "caption_extension", "class_tokens", "cache_info",
                   "reference_image_dir", "control_directory", "fill_mask_dir"},
    "finetune": {"metadata_file", "image_dir", "alpha_mask", "reference_image_dir", "control_directory",
                 "fill_mask_dir"},
    "controlnet": {"image_dir", "conditioning_data_dir", "caption_extension", "cache_info"},
}
GENERAL_KEYS = set(DATASET_TYPES) | set(ASCENDABLE_TYPES)
DATASET_KEYS = GENERAL_KEYS | {"subsets"}
SUBSET_KEYS = set(ASCENDABLE_TYPES) | set(SUBSET_ONLY_TYPES)
LEVEL_NAMES = {"general": "[general]", "dataset": "[[datasets]]", "subset": "[[datasets.subsets]]"}
LEVEL_KEYS = {"general": GENERAL_KEYS, "dataset": DATASET_KEYS, "subset": SUBSET_KEYS}
HINTS = {  # keys people write from the docs or from the command line
    "interpolation_type": "use 'resize_interpolation' (the sd-scripts docs name a key that does not exist)",
    "train_batch_size": "use 'batch_size'", "dataset_repeats": "use 'num_repeats'",
    "caption_extention": "use 'caption_extension'", "train_data_dir": "use 'image_dir' in [[datasets.subsets]]",
    "reg_data_dir": "use 'image_dir' with 'is_reg = true' in [[datasets.subsets]]",
    "in_json": "use 'metadata_file' in [[datasets.subsets]]",
}
COMMAND_LINE_ONLY = {"prior_loss_weight", "debug_dataset", "cache_latents", "cache_latents_to_disk", "vae_batch_size",
                      "skip_cache_check", "cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk",
                      "text_encoder_batch_size", "dataset_class", "masked_loss", "skip_bad_images"}
CLI_NAMES = {"batch_size": "train_batch_size", "num_repeats": "dataset_repeats"}
NO_CLI_FALLBACK = {"image_dir", "metadata_file", "conditioning_data_dir", "is_reg", "class_tokens",
                    "custom_attributes", "reference_image_dir", "fill_mask_dir"}

# --- values ------------------------------------------------------------------------------------------------------


class BadValue(Exception):
    """A value that does not fit its key (message without location)."""


INVALID = object()  # stands for a reported bad value, so resolution stops there instead of cascading


def show_value(value) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
             tuple: "an array", dict: "a table"}
    return f"{json.dumps(value, default=str)} ({names.get(type(value), type(value).__name__)})"


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def resolve_resolution(value) -> tuple[int, int]:
    """Parse a resolution: 512, "512", "512,768", [512, 768] or (512, 768) -> (width, height).

    Raises ValueError for anything else (sizes must be positive integers).
    """
    if isinstance(value, str):
        try:
            sizes = [int(part) for part in value.split(",")]
        except ValueError:
            sizes = []
    elif is_int(value):
        sizes = [value]
    elif isinstance(value, (list, tuple)) and all(is_int(v) for v in value):
        sizes = list(value)
    else:
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes) < 1:
        raise ValueError(f"must be one size or width,height (512, \"512,768\" or [512, 768]), got {show_value(value)}")
    return (sizes[0], sizes[-1])


def parse_range(value) -> tuple[float, float]:
    parts = value.split(",") if isinstance(value, str) else value
    try:
        if not isinstance(parts, (list, tuple)) or len(parts) != 2 or not all(
                is_number(p) or isinstance(p, str) for p in parts):
            raise ValueError
        lo, hi = (float(p) for p in parts)
    except ValueError:
        raise BadValue("must be exactly 2 numbers [low, high] (\"low,high\" on the command line), "
                       f"got {show_value(value)}")
    if lo > hi:
        raise BadValue(f"must be [low, high] with low <= high, got {show_value(value)}")
    return (lo, hi)


def convert_value(key: str, value):
    """Check `value` against the type of `key` and return it in its resolved form; raises BadValue."""
    kind = KEY_TYPES[key]
    if kind == "bool":
        if not isinstance(value, bool):
            raise BadValue(f"'{key}' must be true or false, got {show_value(value)}")
    elif kind in ("int", "pos_int", "nonneg_int"):
        if not is_int(value):
            raise BadValue(f"'{key}' must be an integer, got {show_value(value)}")
        if (kind == "pos_int" and value < 1) or (kind == "nonneg_int" and value < 0):
            raise BadValue(f"'{key}' must be at least {1 if kind == 'pos_int' else 0}, got {value}")
    elif kind in ("float", "nonneg_number", "fraction"):  # integers are fine where numbers are expected
        if not is_number(value):
            raise BadValue(f"'{key}' must be a number, got {show_value(value)}")
        if kind == "fraction" and not 0 <= value <= 1:
            raise BadValue(f"'{key}' must be between 0 and 1, got {value}")
        if kind == "nonneg_number" and value < 0:
            raise BadValue(f"'{key}' must not be negative, got {value}")
        return value if kind == "nonneg_number" else float(value)
    elif kind in ("str", "path", "interpolation"):
        if not isinstance(value, str):
            raise BadValue(f"'{key}' must be a string, got {show_value(value)}")
        if kind == "interpolation" and value not in INTERPOLATIONS:
            raise BadValue(f"'{key}' must be one of {', '.join(INTERPOLATIONS)}, got {show_value(value)}")
        if kind == "path":
            if not value.strip():
                raise BadValue(f"'{key}' must not be empty")
            return Path(value).expanduser()
        if key == "caption_extension" and value and not value.startswith("."):
            return "." + value
    elif kind == "table":
        if not isinstance(value, dict):
            raise BadValue(f"'{key}' must be a table, got {show_value(value)}")
        return dict(value)
    elif kind == "resolution":
        try:
            return resolve_resolution(value)
        except ValueError as e:
            raise BadValue(f"'{key}' {e}")
    elif kind == "range":
        try:
            return parse_range(value)
        except BadValue as e:
            raise BadValue(f"'{key}' {e}")
    return value
