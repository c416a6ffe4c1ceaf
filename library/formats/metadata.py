"""What the trainers write besides weights: file names, save_last_n pruning, ss_* and modelspec.* metadata, and
the resume state `train_state.json` (reference 13.1-13.5, 18.1, 18.6), as sd-scripts writes them.

Metadata values are `str(value)` of Python values (`True`, `None`, `(1024, 1024)`, `[0.0001]`), JSON where the
reference says so. Differences from sd-scripts, on purpose:

* full-model ModelSpec says `flux-1-schnell` for schnell models (sd-scripts always writes `flux-1-dev`, 17.18);
* `modelspec.implementation_version` and `ss_sd_scripts_commit_hash` name this project's commit, not sd-scripts'.

Only cheap imports at module level.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

from library.formats.atomic_io import atomic_write

DEFAULT_NAMES = {"epoch": "epoch", "step": "at", "last": "last"}  # when --output_name is not given (13.1)
TRAIN_STATE_FILE = "train_state.json"
MODELSPEC_VERSION = "1.0.1"
FLUX_IMPLEMENTATION = "https://github.com/black-forest-labs/flux"
CHROMA_IMPLEMENTATION = "https://huggingface.co/lodestones/Chroma"  # sd-scripts' modelspec.implementation for Chroma
IMPLEMENTATION_NAME = "flux-train-suite"
MINIMAL_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                "ss_network_args")  # what --no_metadata keeps


# --- names (13.1, 18.6) -------------------------------------------------------------------------------------------


def _dot(ext: str) -> str:
    return ext if not ext or ext.startswith(".") else "." + ext


def _stem(output_name: str | None, epoch: int | None, step: int | None) -> str:
    if epoch is not None and step is not None:
        raise ValueError("give epoch or step, not both")
    if epoch is not None:
        return f"{output_name or DEFAULT_NAMES['epoch']}-{epoch:06d}"
    if step is not None:
        return f"{output_name or DEFAULT_NAMES['step']}-step{step:08d}"
    return output_name or DEFAULT_NAMES["last"]


def checkpoint_filename(output_name: str | None, ext: str = ".safetensors", epoch: int | None = None,
                        step: int | None = None) -> str:
    """`{name}-{epoch:06d}{ext}` (epoch), `{name}-step{step:08d}{ext}` (step) or `{name}{ext}` (final).

    Without an output name: `epoch` / `at` / `last`. `ext` may be given with or without the dot."""
    return _stem(output_name, epoch, step) + _dot(ext)


def state_dirname(output_name: str | None, epoch: int | None = None, step: int | None = None) -> str:
    """State folder of a checkpoint: `{name}-{epoch:06d}-state`, `{name}-step{step:08d}-state`, `{name}-state`."""
    return _stem(output_name, epoch, step) + "-state"


def model_extension(args, trainer: str = "network") -> str:
    """`.` + --save_model_as for LoRA files (default .safetensors); full and ControlNet models: .safetensors."""
    if trainer != "network":
        return ".safetensors"
    return "." + (getattr(args, "save_model_as", None) or "safetensors")


# --- when to save, what to delete (13.2) --------------------------------------------------------------------------


def save_every_n_epochs(args, num_train_epochs: int) -> int | None:
    """--save_every_n_epochs, or floor(num_train_epochs / --save_n_epoch_ratio) (at least 1) when that is set."""
    ratio = getattr(args, "save_n_epoch_ratio", None)
    if ratio:
        return max(num_train_epochs // ratio, 1)
    return getattr(args, "save_every_n_epochs", None)


def is_epoch_save(args, epoch: int, num_train_epochs: int) -> bool:
    """Save at the end of 1-based `epoch`? Not at the last epoch: the final save covers it."""
    every = save_every_n_epochs(args, num_train_epochs)
    return bool(every) and epoch % every == 0 and epoch < num_train_epochs


def is_step_save(args, global_step: int) -> bool:
    """Save after optimizer step `global_step`?"""
    every = getattr(args, "save_every_n_steps", None)
    return bool(every) and global_step % every == 0


def files_to_remove_for_save_last_n(args, output_dir: str | os.PathLike, ext: str, *, epoch: int | None = None,
                                    step: int | None = None, num_train_epochs: int | None = None) -> list[Path]:
    """The older checkpoint and state folder in `output_dir` to delete after saving at `epoch` (1-based) or `step`.

    Steps: the checkpoint of step r = (step - save_last_n_steps - 1) rounded down to a multiple of
    save_every_n_steps; states use --save_last_n_steps_state (else --save_last_n_steps) the same way.
    Epochs: epoch e - save_every_n_epochs * save_last_n_epochs; states use --save_last_n_epochs_state (else
    --save_last_n_epochs). Give `num_train_epochs` when --save_n_epoch_ratio may set the interval. States are listed
    only with --save_state. Nothing is saved at step or epoch 0, so only r >= 1 is listed; the paths may not exist
    (the caller deletes those that do)."""
    if (epoch is None) == (step is None):
        raise ValueError("give epoch or step")
    get = lambda name: getattr(args, name, None)  # noqa: E731
    if step is not None:
        unit, now = "step", step
        every, keep, keep_state = get("save_every_n_steps"), get("save_last_n_steps"), get("save_last_n_steps_state")
        old = lambda n: (now - n - 1) - (now - n - 1) % every  # noqa: E731
    else:
        unit, now = "epoch", epoch
        every = save_every_n_epochs(args, num_train_epochs) if num_train_epochs else get("save_every_n_epochs")
        keep, keep_state = get("save_last_n_epochs"), get("save_last_n_epochs_state")
        old = lambda n: now - every * n  # noqa: E731
    if not every:
        return []
    out = []
    if keep is not None and old(keep) >= 1:
        out.append(checkpoint_filename(get("output_name"), ext, **{unit: old(keep)}))
    keep_state = keep_state or keep
    if get("save_state") and keep_state is not None and old(keep_state) >= 1:
        out.append(state_dirname(get("output_name"), **{unit: old(keep_state)}))
    return [Path(output_dir) / name for name in out]


# --- resume state (13.5) ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainState:
    """`current_epoch`: the 1-based epoch at save time; `current_step`: optimizer steps done when saved;
    `extra`: any other keys of the file (sd-scripts reads only the two counters)."""

    current_epoch: int
    current_step: int
    extra: dict = dataclasses.field(default_factory=dict)


def train_state_json(current_epoch: int, current_step: int, **extra) -> str:
    """The text of `train_state.json`: sd-scripts' two counters, then any `extra` JSON values (e.g. seed=42)."""
    return json.dumps({"current_epoch": int(current_epoch), "current_step": int(current_step), **extra})


def write_train_state(state_dir: str | os.PathLike, current_epoch: int, current_step: int, **extra) -> Path:
    """Write `<state_dir>/train_state.json` atomically."""
    text = train_state_json(current_epoch, current_step, **extra)
    return atomic_write(Path(state_dir) / TRAIN_STATE_FILE, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def read_train_state(path: str | os.PathLike) -> TrainState | None:
    """`train_state.json` of a state folder (or the file itself); None when the folder has none."""
    path = Path(path)
    if path.is_dir():
        path = path / TRAIN_STATE_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        values = [data[k] for k in ("current_epoch", "current_step")]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a train_state.json with current_epoch and current_step ({e})") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"{path}: current_epoch and current_step must be integers >= 0, got {values}")
    return TrainState(*values, {k: v for k, v in data.items() if k not in ("current_epoch", "current_step")})


# --- hashes and provenance ----------------------------------------------------------------------------------------


def file_hashes(path: str | os.PathLike) -> tuple[str, str] | None:
    """(legacy, full) hashes of a model file for ss_sd_model_hash / ss_new_sd_model_hash: sha256 of the 64 KiB at
    offset 1 MiB (first 8 hex digits), and sha256 of the whole file. None for folders and missing files."""
    import hashlib

    path = Path(path)
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        f.seek(0x100000)
        legacy = hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
        f.seek(0)
        full = hashlib.sha256()
        for chunk in iter(lambda: f.read(1 << 24), b""):
            full.update(chunk)
    return legacy, full.hexdigest()


def source_commit() -> str | None:
    """This checkout's git commit, read from .git without running git; None when unknown."""
    git = Path(__file__).resolve().parents[1] / ".git"
    try:
        if git.is_file():  # a worktree: "gitdir: <path>"
            git = Path(git.read_text().split(":", 1)[1].strip())
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(":", 1)[1].strip()
        common = Path((git / "commondir").read_text().strip()) if (git / "commondir").exists() else None
        for base in filter(None, (git, git / common if common else None)):
            if (base / ref).exists():
                return (base / ref).read_text().strip()
            packed = base / "packed-refs"
            if packed.exists():
                for line in packed.read_text().splitlines():
                    if line.endswith(" " + ref):
                        return line.split()[0]
    except (OSError, IndexError):
        pass
    return None


# --- ss_* metadata of LoRA files (13.3) ---------------------------------------------------------------------------


def _pair(text, kind=int):
    """'1024' -> (1024, 1024), '1024,768' -> (1024, 768); tuples and None as they are (sd-scripts' parsed form)."""
    if text is None or isinstance(text, (tuple, list)):
        return tuple(text) if text is not None else None
    parts = [kind(p) for p in str(text).split(",")]
    return (parts[0], parts[0]) if len(parts) == 1 and kind is int else tuple(parts)


def _base(path) -> str | None:
    return os.path.basename(os.fspath(path).rstrip("/\\")) if path else None


def _subset_record(subset: dict, is_dreambooth: bool) -> dict:
    record = {"img_count": subset.get("img_count", 0), "num_repeats": subset.get("num_repeats", 1)}
    for key in ("color_aug", "flip_aug", "random_crop", "shuffle_caption"):
        record[key] = bool(subset.get(key, False))
    record["keep_tokens"] = subset.get("keep_tokens", 0)
    record["keep_tokens_separator"] = subset.get("keep_tokens_separator", "")
    record["secondary_separator"] = subset.get("secondary_separator")
    record["enable_wildcard"] = bool(subset.get("enable_wildcard", False))
    for key in ("caption_prefix", "caption_suffix", "resize_interpolation"):
        record[key] = subset.get(key)
    if subset.get("image_dir"):
        record["image_dir"] = _base(subset["image_dir"])
    if is_dreambooth:
        record["class_tokens"] = subset.get("class_tokens")
        record["is_reg"] = bool(subset.get("is_reg", False))
    elif subset.get("metadata_file"):
        record["metadata_file"] = _base(subset["metadata_file"])
    return record


def _dir_name(subset: dict, is_dreambooth: bool) -> str | None:
    """The ss_dataset_dirs name of a subset: metadata file or image folder basename; None for reg subsets."""
    if is_dreambooth and subset.get("is_reg"):
        return None
    return _base(subset.get("metadata_file")) if not is_dreambooth and subset.get("metadata_file") else \
        _base(subset.get("image_dir"))


def bucket_info(dataset: dict) -> dict | None:
    """`{"buckets": {i: {"resolution": [w, h], "count": n}}, "mean_img_ar_error": e}` of a dataset record."""
    if dataset.get("bucket_info") is not None:
        return dataset["bucket_info"]
    if dataset.get("buckets") is None:
        return None
    buckets = {i: {"resolution": list(b["resolution"]), "count": b["count"]} for i, b in enumerate(dataset["buckets"])}
    return {"buckets": buckets, "mean_img_ar_error": dataset.get("mean_img_ar_error")}


def _dataset_keys(args, datasets: list[dict], num_processes: int) -> dict:
    if getattr(args, "dataset_config", None):
        records, tags, dirs = [], {}, {}
        for ds in datasets:
            db = bool(ds.get("is_dreambooth", True))
            records.append({
                "is_dreambooth": db, "batch_size_per_device": ds.get("batch_size", 1),
                "num_train_images": ds.get("num_train_images", 0), "num_reg_images": ds.get("num_reg_images", 0),
                "resolution": _pair(ds.get("resolution")), "enable_bucket": bool(ds.get("enable_bucket", False)),
                "min_bucket_reso": ds.get("min_bucket_reso"), "max_bucket_reso": ds.get("max_bucket_reso"),
                "tag_frequency": ds.get("tag_frequency", {}), "bucket_info": bucket_info(ds),
                "resize_interpolation": ds.get("resize_interpolation"),
                "subsets": [_subset_record(s, db) for s in ds.get("subsets", [])]})
            for subset in ds.get("subsets", []):
                name = _dir_name(subset, db)
                if name is not None:
                    unique, i = name, 2
                    while unique in dirs:
                        unique, i = f"{name} ({i})", i + 1
                    dirs[unique] = {"n_repeats": subset.get("num_repeats", 1), "img_count": subset.get("img_count", 0)}
            for folder, freq in ds.get("tag_frequency", {}).items():
                tags.setdefault(folder, freq)
        return {"ss_datasets": json.dumps(records), "ss_tag_frequency": json.dumps(tags),
                "ss_dataset_dirs": json.dumps(dirs)}
    ds = datasets[0] if datasets else {}
    db = bool(ds.get("is_dreambooth", True))
    dirs, reg_dirs = {}, {}
    for subset in ds.get("subsets", []):
        info = {"n_repeats": subset.get("num_repeats", 1), "img_count": subset.get("img_count", 0)}
        if db and subset.get("is_reg"):
            reg_dirs[_base(subset.get("image_dir"))] = info
        else:
            dirs[_dir_name(subset, db)] = info
    batch = args.train_batch_size
    return {
        "ss_batch_size_per_device": batch,
        "ss_total_batch_size": batch * num_processes * args.gradient_accumulation_steps,
        "ss_resolution": _pair(args.resolution), "ss_color_aug": bool(args.color_aug),
        "ss_flip_aug": bool(args.flip_aug), "ss_random_crop": bool(args.random_crop),
        "ss_shuffle_caption": bool(args.shuffle_caption),
        "ss_enable_bucket": bool(ds.get("enable_bucket", args.enable_bucket)),
        "ss_bucket_no_upscale": bool(ds.get("bucket_no_upscale", args.bucket_no_upscale)),
        "ss_min_bucket_reso": ds.get("min_bucket_reso", args.min_bucket_reso),
        "ss_max_bucket_reso": ds.get("max_bucket_reso", args.max_bucket_reso),
        "ss_keep_tokens": args.keep_tokens, "ss_dataset_dirs": json.dumps(dirs),
        "ss_reg_dataset_dirs": json.dumps(reg_dirs), "ss_tag_frequency": json.dumps(ds.get("tag_frequency", {})),
        "ss_bucket_info": json.dumps(bucket_info(ds))}


def network_args_dict(args, network_args=None) -> dict:
    """--network_args as recorded in ss_network_args: key -> string value, plus "dropout" = --network_dropout."""
    items = getattr(args, "network_args", None) if network_args is None else network_args
    if isinstance(items, dict):
        out = dict(items)
    else:
        out = {}
        for item in items or []:
            key, _, value = item.partition("=")
            out[key] = value
    out.setdefault("dropout", getattr(args, "network_dropout", None))
    return out


def lora_metadata(args, *, seed: int | None = None, network_module: str, network_dim, network_alpha,
                  network_args=None, datasets_info: list[dict], num_train_images: int, num_reg_images: int,
                  num_validation_images: int = 0, num_batches_per_epoch: int, num_epochs: int, max_train_steps: int,
                  optimizer_text: str, session_id: int, training_started_at: float, num_processes: int = 1,
                  sd_model_hashes: tuple[str, str] | None = None, vae_hashes: tuple[str, str] | None = None,
                  commit: str | None = None, guidance_scale: float | None = None, family: str = "flux",
                  apply_t5_attn_mask: bool | None = None) -> dict[str, str]:
    """Every ss_* key sd-scripts' LoRA trainer writes before the first save (13.3), values as str().
    `guidance_scale`: the value trained with when --guidance_scale was left to the model's default; `family`
    "chroma": ss_model_type and ss_base_model_version "chroma", as sd-scripts writes them for Chroma;
    `apply_t5_attn_mask`: the masking trained with when the model implies it (default: --apply_t5_attn_mask).

    `args` is the parsed training namespace; `seed` the run's seed (default --seed). `network_dim` and
    `network_alpha` are recorded as given (sd-scripts records the command-line values). `network_args` is a list
    of "k=v" or a dict (default: args.network_args); "dropout" is added as sd-scripts does. `datasets_info`: one
    dict per dataset (with --dataset_config they become ss_datasets; without it, the first one gives the bucket
    settings, folders, tags and ss_bucket_info):

        {"is_dreambooth": bool, "batch_size": int, "num_train_images": int, "num_reg_images": int,
         "resolution": (w, h), "enable_bucket": bool, "bucket_no_upscale": bool,
         "min_bucket_reso": int, "max_bucket_reso": int, "resize_interpolation": str | None,
         "tag_frequency": {folder basename: {tag: count}},
         "buckets": [{"resolution": [w, h], "count": n}, ...], "mean_img_ar_error": float | None,
         (or "bucket_info": the whole ss_bucket_info dict),
         "subsets": [{"image_dir": path, "metadata_file": path | None, "is_reg": bool, "class_tokens": str | None,
                      "img_count": int, "num_repeats": int, "color_aug": bool, "flip_aug": bool,
                      "random_crop": bool, "shuffle_caption": bool, "keep_tokens": int,
                      "keep_tokens_separator": str, "secondary_separator": str | None, "enable_wildcard": bool,
                      "caption_prefix": str | None, "caption_suffix": str | None,
                      "resize_interpolation": str | None}, ...]}

    Missing keys take the defaults shown by their types (False, 0, None). Paths are reduced to basenames.
    `sd_model_hashes` / `vae_hashes`: `file_hashes(...)` of the model / --vae files, when computed.
    With --no_metadata only MINIMAL_KEYS are returned."""
    get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    net_args = network_args_dict(args, network_args)
    md = {
        "ss_session_id": session_id, "ss_training_started_at": training_started_at,
        "ss_output_name": get("output_name"), "ss_learning_rate": get("learning_rate"),
        "ss_text_encoder_lr": get("text_encoder_lr"), "ss_unet_lr": get("unet_lr"),
        "ss_num_train_images": num_train_images, "ss_num_validation_images": num_validation_images,
        "ss_num_reg_images": num_reg_images, "ss_num_batches_per_epoch": num_batches_per_epoch,
        "ss_num_epochs": num_epochs, "ss_gradient_checkpointing": get("gradient_checkpointing", False),
        "ss_gradient_accumulation_steps": get("gradient_accumulation_steps", 1), "ss_max_train_steps": max_train_steps,
        "ss_lr_warmup_steps": get("lr_warmup_steps"), "ss_lr_scheduler": get("lr_scheduler"),
        "ss_network_module": network_module, "ss_network_dim": network_dim, "ss_network_alpha": network_alpha,
        "ss_network_dropout": get("network_dropout"), "ss_mixed_precision": get("mixed_precision"),
        "ss_full_fp16": bool(get("full_fp16")), "ss_v2": bool(get("v2")),
        "ss_base_model_version": "chroma" if family == "chroma" else "flux1",
        "ss_clip_skip": get("clip_skip"), "ss_max_token_length": get("max_token_length"),
        "ss_cache_latents": bool(get("cache_latents")), "ss_seed": seed if seed is not None else get("seed"),
        "ss_lowram": get("lowram", False),
        "ss_noise_offset": get("noise_offset"), "ss_multires_noise_iterations": get("multires_noise_iterations"),
        "ss_multires_noise_discount": get("multires_noise_discount"),
        "ss_adaptive_noise_scale": get("adaptive_noise_scale"), "ss_zero_terminal_snr": get("zero_terminal_snr"),
        "ss_training_comment": get("training_comment"), "ss_sd_scripts_commit_hash": commit or "(unknown)",
        "ss_optimizer": optimizer_text, "ss_max_grad_norm": get("max_grad_norm"),
        "ss_caption_dropout_rate": get("caption_dropout_rate", 0.0),
        "ss_caption_dropout_every_n_epochs": get("caption_dropout_every_n_epochs", 0),
        "ss_caption_tag_dropout_rate": get("caption_tag_dropout_rate", 0.0),
        "ss_face_crop_aug_range": _pair(get("face_crop_aug_range"), float),
        "ss_prior_loss_weight": get("prior_loss_weight", 1.0), "ss_min_snr_gamma": get("min_snr_gamma"),
        "ss_scale_weight_norms": get("scale_weight_norms"), "ss_ip_noise_gamma": get("ip_noise_gamma"),
        "ss_debiased_estimation": bool(get("debiased_estimation_loss")),
        "ss_noise_offset_random_strength": get("noise_offset_random_strength", False),
        "ss_ip_noise_gamma_random_strength": get("ip_noise_gamma_random_strength", False),
        "ss_loss_type": get("loss_type"), "ss_huber_schedule": get("huber_schedule"),
        "ss_huber_scale": get("huber_scale"), "ss_huber_c": get("huber_c"), "ss_fp8_base": bool(get("fp8_base")),
        "ss_fp8_base_unet": bool(get("fp8_base_unet")), "ss_validation_seed": get("validation_seed"),
        "ss_validation_split": get("validation_split"), "ss_max_validation_steps": get("max_validation_steps"),
        "ss_validate_every_n_epochs": get("validate_every_n_epochs"),
        "ss_validate_every_n_steps": get("validate_every_n_steps"),
        "ss_resize_interpolation": get("resize_interpolation"),
        # FLUX
        "ss_model_type": "chroma" if family == "chroma" else get("model_type", "flux"),
        "ss_apply_t5_attn_mask": get("apply_t5_attn_mask", False) if apply_t5_attn_mask is None else apply_t5_attn_mask,
        "ss_weighting_scheme": get("weighting_scheme"), "ss_logit_mean": get("logit_mean"),
        "ss_logit_std": get("logit_std"), "ss_mode_scale": get("mode_scale"),
        "ss_guidance_scale": get("guidance_scale") if guidance_scale is None else guidance_scale,
        "ss_timestep_sampling": get("timestep_sampling"),
        "ss_sigmoid_scale": get("sigmoid_scale"), "ss_model_prediction_type": get("model_prediction_type"),
        "ss_discrete_flow_shift": get("discrete_flow_shift"),
    }
    md.update(_dataset_keys(args, datasets_info, num_processes))
    if net_args:
        md["ss_network_args"] = json.dumps(net_args)
    model = get("pretrained_model_name_or_path")
    if model is not None:
        exists = os.path.exists(model)
        md["ss_sd_model_name"] = _base(model) if exists else model
        if exists and sd_model_hashes:
            md["ss_sd_model_hash"], md["ss_new_sd_model_hash"] = sd_model_hashes
    if get("vae"):
        md["ss_vae_name"] = _base(get("vae")) if os.path.exists(get("vae")) else get("vae")
        if vae_hashes:
            md["ss_vae_hash"], md["ss_new_vae_hash"] = vae_hashes
    md = {k: str(v) for k, v in md.items()}
    if get("no_metadata"):
        return {k: md[k] for k in MINIMAL_KEYS if k in md}
    return md


def update_for_save(metadata: dict[str, str], epoch: int, steps: int, *, finished_at: float | None = None,
                    modelspec: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of `metadata` for one saved file: ss_training_finished_at, ss_steps, ss_epoch (not for --no_metadata
    metadata, as sd-scripts) and the `modelspec` keys of this save."""
    out = dict(metadata)
    if "ss_session_id" in out:  # full metadata; --no_metadata keeps MINIMAL_KEYS only
        out["ss_training_finished_at"] = str(time.time() if finished_at is None else finished_at)
        out["ss_steps"], out["ss_epoch"] = str(steps), str(epoch)
    out.update(modelspec or {})
    return out


# --- modelspec.* (13.4) -------------------------------------------------------------------------------------------

_MODELSPEC_NAMED = ("description", "author", "license", "tags")


def modelspec_metadata(args, *, architecture: str, lora: bool = True, resolution: tuple[int, int] | None = None,
                       title: str | None = None, timestamp: float | None = None,
                       commit: str | None = None) -> dict[str, str]:
    """ModelSpec 1.0.1 keys of a saved LoRA (`lora=True`) or full model, computed at save time.

    Title: --metadata_title, else `title`, else --output_name, else `LoRA@<timestamp>` / `Checkpoint@<timestamp>`.
    Resolution: `resolution` (w, h), else --resolution, else 1024x1024. Every other --metadata_<x> option that is
    set becomes modelspec.<x> (--metadata_thumbnail: a file becomes a data: URL)."""
    get = lambda name: getattr(args, name, None)  # noqa: E731
    timestamp = time.time() if timestamp is None else timestamp
    import datetime

    w, h = resolution or _pair(get("resolution")) or (1024, 1024)
    md = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": architecture + ("/lora" if lora else ""),
        "modelspec.implementation": CHROMA_IMPLEMENTATION if architecture == "chroma" else FLUX_IMPLEMENTATION,
        "modelspec.title": get("metadata_title") or title or get("output_name")
        or f"{'LoRA' if lora else 'Checkpoint'}@{timestamp}",
        "modelspec.resolution": f"{w}x{h}",
        "modelspec.date": datetime.datetime.fromtimestamp(timestamp).replace(microsecond=0).isoformat(),
        "modelspec.implementation_version": f"{IMPLEMENTATION_NAME}/{commit or 'unknown'}",
    }
    if get("min_timestep") is not None or get("max_timestep") is not None:
        lo, hi = get("min_timestep"), get("max_timestep")
        md["modelspec.timestep_range"] = f"{0 if lo is None else lo},{1000 if hi is None else hi}"
    if get("clip_skip") is not None:
        md["modelspec.encoder_layer"] = str(get("clip_skip"))
    extra = [k[len("metadata_"):] for k in sorted(vars(args)) if k.startswith("metadata_") and k != "metadata_title"]
    for name in [*_MODELSPEC_NAMED, *(k for k in extra if k not in _MODELSPEC_NAMED)]:
        value = get(f"metadata_{name}")
        if value is not None:
            md[f"modelspec.{name}"] = thumbnail_data_url(value) if name == "thumbnail" else str(value)
    return md


def thumbnail_data_url(value: str) -> str:
    """A --metadata_thumbnail value as a data: URL (an image file is read and base64-encoded)."""
    if value.startswith("data:"):
        return value
    import base64
    import mimetypes

    mime = mimetypes.guess_type(value)[0]
    if not mime or not mime.startswith("image/"):
        raise ValueError(f"--metadata_thumbnail {value}: not an image file name (.png, .jpg, .webp, ...)")
    return f"data:{mime};base64," + base64.b64encode(Path(value).read_bytes()).decode("ascii")
