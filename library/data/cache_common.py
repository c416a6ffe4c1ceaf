"""Pieces shared by the latent and text-encoder caches: the item protocol, model identities, provenance records,
npz reading/writing and the split of work between processes.

Cache files keep sd-scripts' npz layout (reference 18.3) so both tools read each other's files. Our provenance
travels in extra keys that sd-scripts never reads: a JSON string stored as a numpy unicode scalar, which
`np.load(..., allow_pickle=False)` accepts (an object array would not load there).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Mapping, Protocol, Sequence

import numpy as np

from library.formats.atomic_io import atomic_write
from library.formats.safetensors_io import read_header

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # bump when what we store, or how we compute it, changes: every file of ours becomes stale


class CacheError(ValueError):
    """A cache file or entry that is missing or lacks what the caller needs; the message names the file and key."""


class LatentCacheItem(Protocol):
    """What the latent cache needs from a dataset item.

    An item may also carry `resize_interpolation: str | None` (the filter used to reach the bucket size; None means
    the default choice); it is read with getattr and recorded in the provenance when present. Likewise
    `relative_path: str`, the image's path relative to its dataset root, seeds its posterior sample (the file name
    when absent), so a dataset moved to another folder gets the same latents.
    """

    absolute_path: Path  # the image file
    image_size: tuple[int, int]  # original (W, H)
    bucket_reso: tuple[int, int]  # (W, H), multiples of 8
    flip_aug: bool
    alpha_mask: bool


class TextEncoderCacheItem(Protocol):
    """What the text-encoder cache needs from a dataset item."""

    absolute_path: Path
    te_caption: str  # the exact text to encode, every caption option already applied


class CacheItem(LatentCacheItem, TextEncoderCacheItem, Protocol):
    """A dataset item usable by both caches."""


# ----------------------------------------------------------------------------------------------------------------
# Identities and provenance


def model_file_identity(path: str | os.PathLike) -> str:
    """`<file name>:<16 hex digits>` from the content fingerprint of the weights (`weights_fingerprint`).

    The header alone missed a different file of the same architecture, dtype and size (another fine-tune): names,
    shapes and offsets are all the same. A folder (diffusers layout) combines its .safetensors files in name order.
    """
    path = Path(path)
    files = sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise CacheError(f"{path}: no .safetensors files to identify")
    digest = hashlib.sha256()
    for f in files:
        read_header(f)  # validates (pickles, truncation) with the suite's usual messages
        digest.update(weights_fingerprint(f).encode())
    return f"{path.name}:{digest.hexdigest()[:16]}"


FINGERPRINT_INDEX_ENV = "FLUX_SUITE_FINGERPRINTS"
FINGERPRINT_SCHEME = 1  # bump when what weights_fingerprint reads changes: remembered fingerprints are recomputed
SAMPLE_CHUNK = 1 << 16  # 64 KiB
SAMPLE_CHUNKS = 1024  # at most 64 MiB read per file: about 1 s from an SSD, seconds from a disk, once per file


def weights_fingerprint(path: str | os.PathLike) -> str:
    """BLAKE2b (32 hex digits) of a safetensors file's size, its header and a strided sample of its data section.

    Data sections up to SAMPLE_CHUNK * SAMPLE_CHUNKS bytes (64 MiB: CLIP-L, tiny models) are read whole. Larger ones
    are sampled: SAMPLE_CHUNKS chunks of SAMPLE_CHUNK bytes at evenly spaced offsets, the first and last included,
    so a 24 GB file costs a 64 MiB read instead of minutes. What it detects: any change of size, of the header
    (names, dtypes, shapes, offsets, metadata) or of a byte inside a sampled chunk (about 0.3 % of a 24 GB file). A
    different fine-tune, a merge or a re-quantisation of the same architecture changes every tensor, so every
    chunk; an edit confined to a few bytes between chunks goes unseen (delete the caches, or rename the file).

    Computed once per file: the result is remembered in `fingerprint_index_path()` by real path, size, mtime,
    ctime and inode, and reused while all of those stay the same.
    """
    path = Path(path)
    st = path.stat()
    real = os.path.realpath(path)
    stamp = [FINGERPRINT_SCHEME, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    index = _read_index()
    entry = index.get(real)
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("fingerprint"), str):
        return entry["fingerprint"]
    fingerprint = _sampled_digest(path, st.st_size)
    index[real] = {"stamp": stamp, "fingerprint": fingerprint}
    _write_index(index)
    return fingerprint


def _sampled_digest(path: Path, size: int) -> str:
    digest = hashlib.blake2b(str(size).encode(), digest_size=16)
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        digest.update(fh.read(n))
        start = 8 + n
        length = size - start
        if length <= SAMPLE_CHUNK * SAMPLE_CHUNKS:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        else:
            step = (length - SAMPLE_CHUNK) / (SAMPLE_CHUNKS - 1)
            for i in range(SAMPLE_CHUNKS):
                fh.seek(start + round(i * step))
                digest.update(fh.read(SAMPLE_CHUNK))
    return digest.hexdigest()


def fingerprint_index_path() -> Path:
    """Where model fingerprints are remembered: $FLUX_SUITE_FINGERPRINTS, else
    `$XDG_CACHE_HOME/flux-train-suite/fingerprints.json` (`~/.cache/...`). A user cache rather than a file beside
    each model: model folders are often read-only or shared."""
    override = os.environ.get(FINGERPRINT_INDEX_ENV)
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "flux-train-suite" / "fingerprints.json"


def _read_index() -> dict:
    try:
        data = json.loads(fingerprint_index_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: fingerprints are recomputed and the index rewritten
    return data if isinstance(data, dict) else {}


def _write_index(index: dict) -> None:
    """Atomic rewrite (concurrent runs may each win; a lost entry is only recomputed), dropping files now gone."""
    index = {k: v for k, v in index.items() if os.path.exists(k)}
    target = fingerprint_index_path()

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(index, f, indent=0, sort_keys=True)

    try:
        atomic_write(target, write)
    except OSError as e:  # a read-only home costs a re-read per run, nothing else
        logger.info("cannot remember model fingerprints in %s (%s); they are recomputed on every run", target, e)


def file_content_hash(path: str | os.PathLike) -> str | None:
    """BLAKE2b (32 hex digits) of every byte of a file, e.g. an image; None when it cannot be read."""
    digest = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def meta_to_array(meta: Mapping[str, object]) -> np.ndarray:
    """Provenance dict -> 0-d numpy unicode array (JSON, sorted keys so equal dicts give equal files)."""
    return np.array(json.dumps(meta, sort_keys=True))


def meta_from_array(array: np.ndarray) -> dict:
    return json.loads(str(array.item()))


def differing_fields(stored: Mapping[str, object], expected: Mapping[str, object],
                     ignore: Iterable[str] = ()) -> list[str]:
    """Names of provenance fields whose stored and expected values differ (missing counts as differing)."""
    skip = set(ignore)
    names = (set(stored) | set(expected)) - skip
    return sorted(n for n in names if stored.get(n, _MISSING) != expected.get(n, _MISSING))


_MISSING = object()


# ----------------------------------------------------------------------------------------------------------------
# npz files


def npz_index(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every array in an npz, from the npy headers only (no array data is read).

    Validity checks run over every file of a dataset at start-up; reading headers keeps that fast.
    Raises OSError / ValueError / zipfile.BadZipFile for unreadable files.
    """
    out = {}
    with zipfile.ZipFile(path) as zf:
        for name in zf.namelist():
            if not name.endswith(".npy"):
                continue
            with zf.open(name) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                else:  # rare header version: fall back to reading the array
                    f.seek(0)
                    a = np.lib.format.read_array(f, allow_pickle=False)
                    shape, dtype = a.shape, a.dtype
            out[name[:-4]] = (tuple(shape), np.dtype(dtype))
    return out


def load_npz(path: str | os.PathLike, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """The named arrays (all when keys is None); pickled object arrays are refused."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in (z.files if keys is None else keys)}


def write_npz_atomic(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    """np.savez (uncompressed, as sd-scripts) into a temporary file beside `path`, then rename it into place.

    A crash or an exception mid-write leaves the previous file untouched and no temporary file behind. Writing
    through an open file object keeps np.savez from appending `.npz` to the temporary name.
    """
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, write)


# ----------------------------------------------------------------------------------------------------------------
# Work split and reporting


def process_share(file_keys: Sequence[object], process_index: int, num_processes: int) -> list[int]:
    """Indices of the entries this process handles: the k-th distinct file goes to process k % num_processes.

    Splitting by file rather than by item keeps two processes from rewriting the same npz at once (one image in two
    datasets at two resolutions shares a latent file); when every item has its own file this is sd-scripts'
    `i % num_processes`.
    """
    order: dict[object, int] = {}
    share = []
    for i, key in enumerate(file_keys):
        k = order.setdefault(key, len(order))
        if k % num_processes == process_index:
            share.append(i)
    return share


def warn_foreign_files(what: str, paths: Sequence[Path], why: str, process_index: int = 0,
                       num_processes: int = 1) -> None:
    """The single warning a cache gives when it uses files without our provenance (written by sd-scripts)."""
    if not paths:
        return
    where = f" (process {process_index} of {num_processes})" if num_processes > 1 else ""
    logger.warning(
        "%s cache%s: %d file(s) have no flux-suite provenance (written by sd-scripts?) and are used as they are; %s. "
        "To rebuild them, delete those files (e.g. %s) and run again.",
        what, where, len(paths), why, paths[0])


def log_stale(what: str, reasons: Mapping[str, int]) -> None:
    """One line saying how many entries are recomputed, and why."""
    if reasons:
        text = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()))
        logger.info("%s cache: recomputing %d entr%s (%s)", what, sum(reasons.values()),
                    "y" if sum(reasons.values()) == 1 else "ies", text)


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar (disabled off the main process, when asked, or with nothing to do), imported lazily."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="item", disable=not enabled or total == 0)


NoOp: Callable[[], None] = lambda: None  # noqa: E731 (default for wait_for_everyone)
