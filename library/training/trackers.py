"""Experiment trackers (TensorBoard, wandb) through accelerate: which ones, their init arguments, sample images.

accelerate silently drops a tracker whose package is missing; a user who asked for wandb would then train for hours
without logs, so a missing package is an error before any model loads.
"""

from __future__ import annotations

import importlib.util
import logging
import tomllib
from pathlib import Path

logger = logging.getLogger(__name__)

PIP_NAMES = {"tensorboard": "tensorboard", "wandb": "wandb"}


class TrackerError(ValueError):
    """A tracker option that cannot work, with a message for the user."""


def tracker_names(args) -> list[str]:
    """The trackers --log_with asks for (tensorboard when only --logging_dir is given), checked to be installed."""
    log_with = args.log_with
    if log_with is None and args.logging_dir:
        log_with = "tensorboard"
    if not log_with:
        return []
    names = ["tensorboard", "wandb"] if log_with == "all" else [log_with]
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        raise TrackerError(f"--log_with {log_with}: {', '.join(missing)} is not installed "
                           f"(pip install {' '.join(PIP_NAMES[n] for n in missing)})")
    if "tensorboard" in names and not args.logging_dir:
        raise TrackerError(f"--log_with {log_with}: TensorBoard needs --logging_dir")
    return names


def tracker_init_kwargs(args, names: list[str]) -> dict[str, dict]:
    """Per-tracker init arguments: the --log_tracker_config TOML (tables named after trackers, as sd-scripts reads
    it) plus --wandb_run_name."""
    kwargs: dict[str, dict] = {}
    if args.log_tracker_config:
        path = Path(args.log_tracker_config)
        try:
            loaded = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise TrackerError(f"--log_tracker_config {path}: cannot read it ({e.strerror})") from None
        except tomllib.TOMLDecodeError as e:
            raise TrackerError(f"--log_tracker_config {path}: not valid TOML ({e})") from None
        for name, table in loaded.items():
            if not isinstance(table, dict):
                raise TrackerError(f"--log_tracker_config {path}: '{name}' should be a table of init arguments "
                                   f"for that tracker, e.g. [wandb] with entity = \"...\"")
            kwargs[name] = dict(table)
    if args.wandb_run_name and "wandb" in names:
        kwargs.setdefault("wandb", {})["name"] = args.wandb_run_name
    return kwargs


def resolve_trackers(args) -> tuple[list[str], dict[str, dict]]:
    """(tracker names, their init arguments), checked before any model loads; raises TrackerError."""
    names = tracker_names(args)
    return names, tracker_init_kwargs(args, names)


def login(args, names: list[str]) -> None:
    """wandb login with --wandb_api_key (otherwise wandb uses WANDB_API_KEY or its stored login)."""
    if "wandb" in names and args.wandb_api_key:
        import wandb

        wandb.login(key=args.wandb_api_key)


def log_sample_images(accelerator, paths: list[Path], prompts: list[str], step: int) -> None:
    """Preview images into wandb (TensorBoard users have them as files under output_dir/sample)."""
    tracker = next((t for t in accelerator.trackers if t.name == "wandb"), None)
    if tracker is None:
        return
    import wandb
    from PIL import Image

    images = {}
    for i, (path, prompt) in enumerate(zip(paths, prompts)):
        with Image.open(path) as im:
            images[f"sample_{i}"] = wandb.Image(im.copy(), caption=prompt)
    tracker.log(images, step=step)
