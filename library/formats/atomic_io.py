"""Atomic file writes: nothing a user made is left half-written by a crash or an interrupted run.

A write goes to a hidden temporary file beside its target, named `.<target>.flux-tmp-<pid>-<8 random><suffix>`, and
is renamed over the target when complete. A run killed mid-write leaves that file behind; `remove_stale_temporaries`
deletes such leftovers at the next start, recognised by that exact name and only when the process that wrote them
is no longer running on this machine.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Callable

logger = logging.getLogger(__name__)

TEMP_MARK = ".flux-tmp-"
# .<target><TEMP_MARK><writer pid>-<mkstemp's 8 characters><suffix>
TEMP_NAME = re.compile(r"\..+" + re.escape(TEMP_MARK) + r"(?P<pid>\d+)-[a-z0-9_]{8}(\.[A-Za-z0-9]+)?")


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], suffix: str = ".tmp") -> Path:
    """Call `write(temp_path)` on a temporary file in the target folder, then rename it to `path`.

    `suffix` is the temporary file's ending, for writers that insist on one (numpy adds .npz otherwise).
    The file gets the mode a plain open() would give it (mkstemp creates 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARK}{os.getpid()}-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def remove_stale_temporaries(folder: str | os.PathLike, subfolders: bool = False) -> list[Path]:
    """Delete the temporary files interrupted writes of ours left in `folder` (and its direct subfolders with
    `subfolders`: sample images, state folders). Only files named exactly as `atomic_write` names them are
    considered, and only those whose writer is no longer running here (another run may be saving into the same
    folder). Returns the paths removed; logs how many."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    folders = [folder, *(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink())] if subfolders else [folder]
    removed = []
    for place in folders:
        for entry in os.scandir(place):
            match = TEMP_NAME.fullmatch(entry.name)
            if match and entry.is_file(follow_symlinks=False) and not _running(int(match["pid"])):
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:  # removed meanwhile
                    continue
                removed.append(Path(entry.path))
    if removed:
        logger.info("removed %d temporary file(s) left by an interrupted save in %s", len(removed), folder)
    return removed


def _running(pid: int) -> bool:
    """Whether process `pid` runs on this machine (when unsure: yes, so that its file is kept)."""
    if pid == os.getpid() or os.name == "nt":  # on Windows os.kill would terminate the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: someone else's live process
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
