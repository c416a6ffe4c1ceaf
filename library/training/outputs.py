"""Where a run writes, checked before any model loads, and a rescue place for saves that fail mid-run.

A run that can only find out at its final save that --output_dir is a file (or read-only, or on a full disk) loses
everything it trained; so every folder it will write is tried up front, and a save that still fails (the disk filled
up during the run) goes to a clearly named file in the temp folder or the current folder instead.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

from safetensors import SafetensorError

from library.training.errors import TrainingError

# What a failed write raises: OSError from Python, RuntimeError from torch.save, SafetensorError from safetensors
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)
MIN_FREE_BYTES = 1 << 20  # below this a folder counts as full: not even a small LoRA fits


def reason(e: Exception) -> str:
    return getattr(e, "strerror", None) or str(e)


def check_writable_folder(path: str | os.PathLike, what: str) -> None:
    """Raise TrainingError (one line naming `what` and `path`) unless `path` is, or can become, a writable folder
    with some free space. Only the folder itself is created (it would be at the first save anyway); a probe file
    is written and removed."""
    path = Path(path)
    for parent in (path, *path.parents):
        if parent.exists() and not parent.is_dir():
            where = "is a file" if parent == path else f"cannot be created: {parent} is a file"
            raise TrainingError(f"{what} {path}: {where}, expected a folder")
        if parent.exists():
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path, prefix=".write-probe-"):
            pass
        free = shutil.disk_usage(path).free
    except OSError as e:
        raise TrainingError(f"{what} {path}: not writable ({reason(e)}); expected a folder this user can write to") \
            from None
    if free < MIN_FREE_BYTES:
        raise TrainingError(f"{what} {path}: the disk is full ({free:,} bytes free); free some space or choose "
                            "another folder")


def check_output_paths(args, image_folders: Iterable[Path] = ()) -> None:
    """Every folder the run will write to: --output_dir (checkpoints and states), its sample/ folder with
    --sample_prompts, --logging_dir, and the image folders when caches go to disk beside the images."""
    if not args.output_dir:  # the final save needs one: say so now, not after training
        raise TrainingError("--output_dir: not given; expected the folder for checkpoints, states and samples")
    check_writable_folder(args.output_dir, "--output_dir")
    if getattr(args, "sample_prompts", None):
        check_writable_folder(Path(args.output_dir) / "sample", "--sample_prompts: the sample folder")
    if getattr(args, "logging_dir", None):
        check_writable_folder(args.logging_dir, "--logging_dir")
    cache_option = ("--cache_latents_to_disk" if getattr(args, "cache_latents_to_disk", False) else
                    "--cache_text_encoder_outputs_to_disk" if getattr(args, "cache_text_encoder_outputs_to_disk",
                                                                      False) else None)
    if cache_option:
        for folder in sorted(set(image_folders)):
            check_writable_folder(folder, f"{cache_option}: the image folder")


def rescue_path(target: Path) -> list[Path]:
    """Places for a file or folder that could not be written at `target`, in order: the temp folder, then the
    current folder; the name says what it is and when it was rescued."""
    name = f"{target.stem}-rescued-{time.strftime('%Y%m%d-%H%M%S')}{target.suffix}"
    return [Path(tempfile.gettempdir()) / name, Path.cwd() / name]


def write_or_rescue(target: Path, write: Callable[[Path], None]) -> tuple[Path, Exception | None]:
    """(where it was written, the error at `target` or None). Writes to `target`; when that fails, to the first
    rescue place that works. Raises TrainingError when no place works."""
    try:
        write(target)
        return target, None
    except WRITE_ERRORS as e:
        first = e
    tried = []
    for place in rescue_path(target):
        try:
            write(place)
            return place, first
        except WRITE_ERRORS as e:
            tried.append(f"{place} ({reason(e)})")
    raise TrainingError(f"could not write {target} ({reason(first)}), nor {' nor '.join(tried)}: nothing could be "
                        "saved")
