"""A --resume state folder checked before anything is loaded from it: every file present and readable, the saved
trainable weights shaped as this run's. A problem is one line naming the file; random states that cannot be
restored stop the run unless --resume_inexact (a resumed run would otherwise silently differ)."""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path
from typing import Callable

from accelerate.utils import load as accelerate_load

from library.formats.safetensors_io import ModelFileError, read_header
from library.training.errors import TrainingError

logger = logging.getLogger(__name__)

RANDOM_STATE_KEYS = ("random_state", "numpy_random_seed", "torch_manual_seed")  # what accelerate restores


def verify_state(folder: Path, weights_name: str | None, expected: dict[str, tuple[int, ...]],
                 mismatch: Callable[[str, tuple[int, ...], tuple[int, ...]], str], archives: list[str],
                 random_states: Path, inexact: bool = False) -> int:
    """The state's step, after checking `train_state.json`, the trained weights `weights_name` against the
    `expected` shapes (`mismatch` explains a difference in the run's settings), accelerate's `archives` and this
    process's `random_states`."""
    step = _read_step(folder / "train_state.json", folder)
    if weights_name is not None:  # None: the engine's checkpoint holds the weights (checked by the engine)
        _check_weights(folder / weights_name, expected, mismatch)
    for archive in archives:
        try:  # torch.save writes zip archives; the directory at their end is missing from a cut-off file
            zipfile.ZipFile(folder / archive).close()
        except (OSError, zipfile.BadZipFile) as e:
            problem = "missing" if not (folder / archive).exists() else f"damaged ({e})"
            raise TrainingError(f"{folder / archive}: {problem}; the state cannot be resumed: resume from "
                                "another state") from None
    check_random_states(random_states, inexact)
    return step


def _read_step(state_file: Path, folder: Path) -> int:
    if not state_file.exists():
        raise TrainingError(f"--resume {folder}: not a state folder of this suite (no train_state.json)")
    try:
        step = json.loads(state_file.read_text())["current_step"]
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"current_step {step!r}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TrainingError(f"{state_file}: damaged ({type(e).__name__}: {e}); expected the JSON --save_state "
                            "writes, with current_step") from None
    return step


def _check_weights(path: Path, expected: dict[str, tuple[int, ...]], mismatch) -> None:
    try:
        header = read_header(path)
        size = path.stat().st_size
    except ModelFileError as e:
        raise TrainingError(f"--resume: {e} (the state's trained weights)") from None
    if any(header.data_start + t.end > size for t in header.tensors.values()):
        raise TrainingError(f"{path}: truncated ({size:,} bytes; its header needs more); the state is "
                            "damaged: resume from another one")
    for key, shape in expected.items():
        saved = header.tensors.get(key)
        if saved is not None and tuple(saved.shape) != shape:
            raise TrainingError(f"{path}: {key} has shape {list(saved.shape)}, this run's has "
                                f"{list(shape)}: {mismatch(key, tuple(saved.shape), shape)}")


def check_random_states(path: Path, inexact: bool = False) -> None:
    """Random states that cannot be restored make a resumed run differ from an uninterrupted one; accelerate only
    logs that, so check them first (loaded the way accelerate loads them: weights_only, its safe globals)."""
    try:
        states = accelerate_load(path)
        missing = [k for k in RANDOM_STATE_KEYS if k not in states]
        if missing:
            raise KeyError(f"no {', '.join(missing)}")
        return
    except Exception as e:  # an empty, cut-off or foreign file: pickle, zip and key errors alike
        problem = "missing" if not path.exists() else \
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'empty or damaged'}"
    if not inexact:
        raise TrainingError(f"{path}: the random states cannot be restored ({problem}), so the resumed run would "
                            "differ from an uninterrupted one; resume from another state, or pass "
                            "--resume_inexact to go on with fresh random states")
    logger.warning("%s: the random states cannot be restored (%s); --resume_inexact: going on with fresh random "
                   "states, so the result differs from an uninterrupted run", path, problem)
