"""Latent cache: AE latents of every training image, in RAM or in sd-scripts' npz files (reference 4.1, 4.2, 18.3).

File `<image stem>_<W:04d>x<H:04d>_flux.npz` (W, H: original image size); per resolution, keys suffixed
`_<h>x<w>` (latent size, height first): `latents_*` float32 (16, h, w), `original_size_*` [W, H], `crop_ltrb_*`
[l, t, r, b], optionally `latents_flipped_*` and `alpha_mask_*` float32 (H, W). One file holds several resolutions.

Unlike sd-scripts, which only checks that a key exists (reference 17 item 10), every entry we write carries a
provenance record `flux_suite_meta_<h>x<w>` (JSON: AE identity, bucket, resize filter, flip, alpha mask, sample
or mean, image file size and content hash, format version); an entry whose record differs from the current settings
is recomputed, so an image edited in place is re-encoded even when its size stays the same. Files written by
sd-scripts (no record) are used when their keys and shapes fit, with one warning.

Posterior: sd-scripts encodes a random sample of the AE posterior. We sample too by default, but with one
generator per image seeded from a hash of the image's path relative to its dataset root (`latent_seed`), so
re-caching gives identical latents whatever the batch size, the set of files being recomputed or the folder the
dataset was moved to. `sample=False` stores the posterior mean.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from json import JSONDecodeError
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from library.data.cache_common import (FORMAT_VERSION, CacheError, LatentCacheItem, NoOp, differing_fields,
                                       file_content_hash, load_npz, log_stale, meta_from_array, meta_to_array,
                                       npz_index, process_share, progress_bar, warn_foreign_files, write_npz_atomic)

logger = logging.getLogger(__name__)

LATENTS_SUFFIX = "_flux.npz"
LATENT_CHANNELS = 16
LATENT_STRIDE = 8
META_KEY = "flux_suite_meta"
ENTRY_KEYS = ("latents", "latents_flipped", "original_size", "crop_ltrb", "alpha_mask", META_KEY)
_UNREADABLE = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, JSONDecodeError)

# rgb uint8 (H, W, 3) at bucket size, alpha float32 (H, W) in 0..1 or None, crop_ltrb (l, t, r, b); further
# elements of the returned tuple are ignored
LoadPixels = Callable[[LatentCacheItem], tuple[np.ndarray, "np.ndarray | None", Sequence[int]]]


@dataclass
class LatentEntry:
    """One image's cached latents, as CPU tensors. Optional parts are None when the item did not ask for them."""

    latents: torch.Tensor  # float32 (16, h, w)
    latents_flipped: torch.Tensor | None
    alpha_mask: torch.Tensor | None  # float32 (H, W), bucket pixels
    original_size: torch.Tensor  # [W, H]
    crop_ltrb: torch.Tensor  # [l, t, r, b]


def latents_npz_path(image_path: str | os.PathLike, image_size: tuple[int, int]) -> Path:
    """sd-scripts' file name: the original image size is part of it, the bucket is not."""
    w, h = image_size
    return Path(f"{os.path.splitext(os.fspath(image_path))[0]}_{w:04d}x{h:04d}{LATENTS_SUFFIX}")


def resolution_suffix(bucket_reso: tuple[int, int]) -> str:
    """`_<h>x<w>` in latent cells, height first, from a (W, H) bucket."""
    w, h = bucket_reso
    return f"_{h // LATENT_STRIDE}x{w // LATENT_STRIDE}"


def latent_seed(item: LatentCacheItem) -> int:
    """Seed of an image's posterior sample: the first 8 bytes of SHA-256 of `item.relative_path` (63 bits).

    The path relative to the dataset root, not the absolute one: the same dataset in another folder must give the
    same latents, hence the same training (an absolute path made a moved dataset train a different LoRA). Items
    without `relative_path` use the file name.
    """
    relative = getattr(item, "relative_path", None) or Path(item.absolute_path).name
    digest = hashlib.sha256(str(relative).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@torch.no_grad()
def encode_latents(ae, images: torch.Tensor, generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """`ae.encode` with one generator per image (None: the posterior mean).

    `AutoEncoder.encode` takes a single generator for the whole batch, which would tie each image's noise to its
    batch position; drawing per image keeps cached latents independent of batching. Image i gets exactly what
    `ae.encode(images[i:i+1], sample=True, generator=generators[i])` gives (tested), generators used in list
    order (a generator listed twice draws twice).
    """
    if generators is None:
        return ae.encode(images, sample=False)
    moments = ae.encoder(images.to(device=ae.device, dtype=ae.dtype))
    mean, logvar = moments.chunk(2, dim=1)
    eps = torch.cat([torch.randn((1, *mean.shape[1:]), generator=g, dtype=torch.float32, device=g.device)
                     for g in generators])
    z = mean + torch.exp(0.5 * logvar) * eps.to(mean)
    return ae.params.scale_factor * (z - ae.params.shift_factor)


def _pixels_to_tensor(rgb: np.ndarray) -> torch.Tensor:
    # uint8 -> [0, 1] -> [-1, 1] in this order, as sd-scripts' ToTensor + Normalize(0.5, 0.5)
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float() / 255.0
    return (x - 0.5) / 0.5


def _meta_differences(stored: dict, expected: dict) -> list[str]:
    """Fields that make a stored entry unusable for `expected`.

    Flipped latents or an alpha mask that are stored but not needed do no harm; crop_ltrb is a record only (it
    follows from the image size and bucket, both compared); the image file size and hash are skipped when the image
    is gone, the hash also when `expected` has none (RAM mode: entries never outlive the run).
    """
    ignore = {"crop_ltrb"}
    for flag in ("flip", "alpha_mask"):
        if stored.get(flag) is True and expected.get(flag) is False:
            ignore.add(flag)
    if expected.get("image_file_size") is None:
        ignore.update(("image_file_size", "image_hash"))
    if "image_hash" not in expected:
        ignore.add("image_hash")
    return differing_fields(stored, expected, ignore)


@dataclass
class _Job:
    """One cache entry to check or compute: a file and resolution, which several items may share."""

    key: tuple[str, str]  # (npz path, resolution suffix)
    item: LatentCacheItem  # the item whose pixels are loaded (one that asks for an alpha mask if any does)
    meta: dict
    items: list = field(default_factory=list)


class LatentCache:
    """Computes, validates, stores and serves AE latents of dataset items (see the module docstring).

    cache_to_disk: npz files beside the images (shared with sd-scripts) instead of RAM.
    ae_identity: a string that changes when the AE does, e.g. `model_file_identity(ae_path)`; append the AE dtype
        to it if a dtype change should invalidate caches.
    skip_cache_check: trust any existing file (sd-scripts' `--skip_cache_check`), without reading it.
    batch_size: images per AE call; a batch has one (bucket, flip, alpha mask, posterior) combination.
    sample: store a seeded posterior sample (default, as sd-scripts' sampling) or the posterior mean; an item with
        `posterior = "mean"` (a Kontext reference image) gets the mean either way.
    trust_foreign: use files without our provenance when their keys and shapes fit (else recompute them).
    """

    def __init__(self, cache_to_disk: bool, ae_identity: str, skip_cache_check: bool = False, batch_size: int = 1,
                 sample: bool = True, trust_foreign: bool = True):
        self.cache_to_disk = cache_to_disk
        self.ae_identity = ae_identity
        self.skip_cache_check = skip_cache_check
        self.batch_size = max(1, int(batch_size))
        self.sample = sample
        self.trust_foreign = trust_foreign
        self._memory: dict[tuple[str, str], tuple[LatentEntry, dict]] = {}
        self._hashes: dict[str, str | None] = {}  # image content hashes of the current call: each image read once

    # -- naming and provenance -----------------------------------------------------------------------------------

    def npz_path(self, item: LatentCacheItem) -> Path:
        return latents_npz_path(item.absolute_path, item.image_size)

    def _key(self, item: LatentCacheItem) -> tuple[str, str]:
        return os.fspath(self.npz_path(item)), resolution_suffix(item.bucket_reso)

    def expected_meta(self, item: LatentCacheItem) -> dict:
        """The provenance an up-to-date entry for `item` has (crop_ltrb is added when written)."""
        try:
            file_size = os.path.getsize(item.absolute_path)
        except OSError:
            file_size = None  # image gone: the cache is all there is, keep using it
        return {
            "format": FORMAT_VERSION,
            "ae": self.ae_identity,
            "bucket_reso": [int(v) for v in item.bucket_reso],
            "original_size": [int(v) for v in item.image_size],
            "resize_interpolation": getattr(item, "resize_interpolation", None),
            # an item may ask for the mean itself (FLUX.1 Kontext reference images: `posterior = "mean"`)
            "posterior": getattr(item, "posterior", None) or ("sample" if self.sample else "mean"),
            "flip": bool(item.flip_aug),
            "alpha_mask": bool(item.alpha_mask),
            "image_file_size": file_size,
        }

    def _image_hash(self, path: str | os.PathLike) -> str | None:
        """Content hash of an image file, in disk mode only: added to the provenance when an entry is checked or
        written (not in expected_meta, so --skip_cache_check reads no image bytes for existing files)."""
        key = os.fspath(path)
        if key not in self._hashes:
            self._hashes[key] = file_content_hash(path)
        return self._hashes[key]

    # -- validity ------------------------------------------------------------------------------------------------

    def is_valid(self, item: LatentCacheItem, expected_meta: dict | None = None) -> bool:
        """Whether `item` can be served from the cache without encoding."""
        self._hashes.clear()
        status, _ = self._status(self._key(item), expected_meta or self.expected_meta(item), item.absolute_path)
        return status in ("valid", "foreign")

    def _status(self, key: tuple[str, str], expected: dict, image_path: Path) -> tuple[str, str]:
        """("valid" | "foreign" | "missing" | "stale", reason)."""
        if not self.cache_to_disk:
            stored = self._memory.get(key)
            if stored is None:
                return "missing", "new"
            diff = _meta_differences(stored[1], expected)
            return ("stale", "changed " + "/".join(diff)) if diff else ("valid", "")
        path, suffix = Path(key[0]), key[1]
        if not path.exists():
            return "missing", "new"
        if self.skip_cache_check:
            return "valid", ""
        try:
            index = npz_index(path)
            w, h = expected["bucket_reso"]
            latent_shape = (LATENT_CHANNELS, h // LATENT_STRIDE, w // LATENT_STRIDE)
            need = {"latents": latent_shape, "original_size": (2,), "crop_ltrb": (4,)}
            if expected["flip"]:
                need["latents_flipped"] = latent_shape
            if expected["alpha_mask"]:
                need["alpha_mask"] = (h, w)
            for name, shape in need.items():
                if index.get(name + suffix, ((),))[0] != shape:
                    return "stale", f"no {name} of shape {shape}"
            if META_KEY + suffix not in index:
                return ("foreign", "") if self.trust_foreign else ("stale", "sd-scripts file")
            stored = meta_from_array(load_npz(path, [META_KEY + suffix])[META_KEY + suffix])
        except _UNREADABLE:
            return "stale", "unreadable file"
        if expected.get("image_file_size") is not None:
            expected = {**expected, "image_hash": self._image_hash(image_path)}
        diff = _meta_differences(stored, expected)
        return ("stale", "changed " + "/".join(diff)) if diff else ("valid", "")

    # -- computing -----------------------------------------------------------------------------------------------

    def _jobs(self, items: Sequence[LatentCacheItem]) -> list[_Job]:
        """Group items by entry (file + resolution), joining their flip / alpha needs; settings must agree."""
        jobs: dict[tuple[str, str], _Job] = {}
        for item in items:
            key, meta = self._key(item), self.expected_meta(item)
            job = jobs.get(key)
            if job is None:
                jobs[key] = _Job(key, item, meta, [item])
                continue
            diff = differing_fields(job.meta, meta, ignore=("flip", "alpha_mask"))
            if diff:
                raise CacheError(f"{key[0]}: image {item.absolute_path} is used twice at bucket {item.bucket_reso} "
                                 f"with different settings ({', '.join(diff)}); one cache entry cannot hold both")
            job.meta["flip"] |= meta["flip"]
            if meta["alpha_mask"] and not job.meta["alpha_mask"]:
                job.meta["alpha_mask"], job.item = True, item
            job.items.append(item)
        return list(jobs.values())

    def cache(self, items: Sequence[LatentCacheItem], ae, load_pixels: LoadPixels, device: str | torch.device,
              dtype: torch.dtype, process_index: int = 0, num_processes: int = 1,
              wait_for_everyone: Callable[[], None] = NoOp, progress: bool = True) -> int:
        """Encode every item whose entry is missing or stale; returns how many entries this process encoded.

        On disk with several processes, the k-th distinct cache file goes to process k % num_processes and all
        processes meet in `wait_for_everyone()` at the end. In RAM every process caches everything.
        `ae` must already sit on `device` in `dtype` (the images are sent there).
        """
        self._hashes.clear()  # an image may have changed since the last call
        jobs = self._jobs(items)  # all items on every process, so a conflict stops every process alike
        if self.cache_to_disk and num_processes > 1:
            jobs = [jobs[i] for i in process_share([j.key[0] for j in jobs], process_index, num_processes)]
        todo, foreign, reasons = [], [], Counter()
        for job in jobs:
            status, reason = self._status(job.key, job.meta, job.item.absolute_path)
            if status == "foreign":
                foreign.append(Path(job.key[0]))
            elif status != "valid":
                todo.append(job)
                reasons[reason] += 1
        warn_foreign_files("latent", foreign, "their settings (AE, resize, sampling) cannot be checked",
                           process_index, num_processes)
        log_stale("latent", reasons)
        if self.cache_to_disk:  # hashed before the pixels are read: an edit in between makes the entry stale
            for job in todo:
                job.meta["image_hash"] = self._image_hash(job.item.absolute_path)

        def group(job: _Job) -> tuple:
            return job.meta["bucket_reso"], job.meta["flip"], job.meta["alpha_mask"], job.meta["posterior"]

        todo.sort(key=lambda j: (j.meta["bucket_reso"][0] * j.meta["bucket_reso"][1], *group(j)))
        batches: list[list[_Job]] = []
        for job in todo:
            last = batches[-1] if batches else None
            if last and len(last) < self.batch_size and group(last[0]) == group(job):
                last.append(job)
            else:
                batches.append([job])

        bar = progress_bar(len(todo), "caching latents", progress and process_index == 0)
        # Images of the next batch are decoded in threads while the AE encodes the current one.
        pool = ThreadPoolExecutor(max_workers=max(1, min(self.batch_size, os.cpu_count() or 1)))
        try:
            pending = [pool.submit(load_pixels, j.item) for j in batches[0]] if batches else []
            for b, batch in enumerate(batches):
                loaded = [f.result() for f in pending]
                pending = [pool.submit(load_pixels, j.item) for j in batches[b + 1]] if b + 1 < len(batches) else []
                self._encode_batch(batch, loaded, ae, device, dtype)
                bar.update(len(batch))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
        wait_for_everyone()
        return len(todo)

    def _encode_batch(self, batch: list[_Job], loaded: list, ae, device, dtype) -> None:
        flip, alpha_wanted = batch[0].meta["flip"], batch[0].meta["alpha_mask"]
        w, h = batch[0].meta["bucket_reso"]
        images, alphas, crops = [], [], []
        for job, pixels in zip(batch, loaded):
            rgb, alpha, crop_ltrb = pixels[:3]  # a loader may return more (e.g. the crop offset); unused here
            name = job.item.absolute_path
            if rgb.dtype != np.uint8 or rgb.shape != (h, w, 3):
                raise CacheError(f"{name}: load_pixels gave {rgb.dtype} {rgb.shape}, expected uint8 ({h}, {w}, 3)")
            if alpha is not None and tuple(alpha.shape) != (h, w):
                raise CacheError(f"{name}: alpha mask of shape {alpha.shape}, expected ({h}, {w})")
            images.append(_pixels_to_tensor(rgb))
            # An image without alpha channel gets an all-ones mask (reference 3.6).
            alphas.append(None if not alpha_wanted else
                          np.ones((h, w), np.float32) if alpha is None else np.asarray(alpha, np.float32))
            crops.append(np.asarray(crop_ltrb))
        x = torch.stack(images)
        if flip:
            x = torch.cat([x, torch.flip(x, dims=[-1])])
        generators = None
        if batch[0].meta["posterior"] == "sample":
            generators = [torch.Generator().manual_seed(latent_seed(j.item)) for j in batch]
            generators = generators * 2 if flip else generators  # flipped images take each seed's second draw
        z = encode_latents(ae, x.to(device=device, dtype=dtype), generators).float().cpu()
        n = len(batch)
        for i, job in enumerate(batch):
            entry = LatentEntry(
                latents=z[i].clone(), latents_flipped=z[n + i].clone() if flip else None,
                alpha_mask=torch.from_numpy(alphas[i]) if alphas[i] is not None else None,
                original_size=torch.tensor(job.meta["original_size"]), crop_ltrb=torch.from_numpy(crops[i]))
            meta = {**job.meta, "crop_ltrb": crops[i].tolist()}
            if self.cache_to_disk:
                self._write(job.key, entry, meta)
            else:
                self._memory[job.key] = (entry, meta)

    def _write(self, key: tuple[str, str], entry: LatentEntry, meta: dict) -> None:
        """Add this resolution's keys to the file (replacing its old ones, other resolutions kept)."""
        path, suffix = Path(key[0]), key[1]
        arrays: dict[str, np.ndarray] = {}
        if path.exists():
            try:
                arrays = load_npz(path)
            except _UNREADABLE as e:
                logger.warning("%s: unreadable (%s); writing a new file", path, e)
        for name in ENTRY_KEYS:  # an old flipped latent or mask must not outlive the entry it belonged to
            arrays.pop(name + suffix, None)
        arrays["latents" + suffix] = entry.latents.numpy()
        arrays["original_size" + suffix] = entry.original_size.numpy()
        arrays["crop_ltrb" + suffix] = entry.crop_ltrb.numpy()
        if entry.latents_flipped is not None:
            arrays["latents_flipped" + suffix] = entry.latents_flipped.numpy()
        if entry.alpha_mask is not None:
            arrays["alpha_mask" + suffix] = entry.alpha_mask.numpy()
        arrays[META_KEY + suffix] = meta_to_array(meta)
        write_npz_atomic(path, arrays)

    # -- serving -------------------------------------------------------------------------------------------------

    def get(self, item: LatentCacheItem) -> LatentEntry:
        """The cached entry of `item` (flipped latents / alpha mask only when the item uses them)."""
        key = self._key(item)
        suffix = key[1]
        if not self.cache_to_disk:
            if key not in self._memory:
                raise CacheError(f"{item.absolute_path}: no latents cached in memory for bucket {item.bucket_reso} "
                                 f"(key latents{suffix}); run cache() first")
            e = self._memory[key][0]
            if item.flip_aug and e.latents_flipped is None or item.alpha_mask and e.alpha_mask is None:
                raise CacheError(f"{item.absolute_path}: cached latents{suffix} lack the flipped latents or mask")
            return LatentEntry(e.latents, e.latents_flipped if item.flip_aug else None,
                               e.alpha_mask if item.alpha_mask else None, e.original_size, e.crop_ltrb)
        path = Path(key[0])
        names = ["latents", "original_size", "crop_ltrb"]
        names += ["latents_flipped"] * bool(item.flip_aug) + ["alpha_mask"] * bool(item.alpha_mask)
        if not path.exists():
            raise CacheError(f"{path}: latent cache file not found (key latents{suffix}); run cache() first")
        with np.load(path, allow_pickle=False) as z:
            missing = [n + suffix for n in names if n + suffix not in z.files]
            if missing:
                raise CacheError(f"{path}: key {missing[0]!r} not found (file has {', '.join(z.files)})")
            a = {n: torch.from_numpy(z[n + suffix]) for n in names}
        return LatentEntry(a["latents"], a.get("latents_flipped"), a.get("alpha_mask"), a["original_size"],
                           a["crop_ltrb"])
