"""FLUX.1 Fill cache: the masked picture's latents (AE posterior mean of `image * (1 - mask)`) and the mask at bucket
size, for items whose mask comes from a file, kept with the same staleness rules as the target latents
(library/data/latent_cache.py): in RAM, or on disk beside the image in `<stem>_<W:04d>x<H:04d>_flux_fill.npz`, one
entry per bucket (`masked_latents_<h>x<w>`, `masked_latents_flipped_<h>x<w>` with flip_aug, `mask_<h>x<w>`,
`mask_flipped_<h>x<w>`) with a provenance record (`flux_suite_meta_<h>x<w>`: AE identity, bucket, original size,
resize filter, flip, format version, and the content hashes of the picture *and* the mask file). An entry whose
record differs (another AE, an edited picture or mask, another bucket) is recomputed.

Generated masks change every step, so their masked pictures are encoded live (library/training/recipes/fill.py).
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections import Counter
from json import JSONDecodeError
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from library.data.cache_common import (FORMAT_VERSION, differing_fields, file_content_hash, load_npz, log_stale,
                                       meta_from_array, meta_to_array, npz_index, process_share, progress_bar,
                                       write_npz_atomic)
from library.data.fill_masks import bucket_mask, bucket_pixels
from library.data.latent_cache import META_KEY, resolution_suffix

logger = logging.getLogger(__name__)

FILL_SUFFIX = "_flux_fill.npz"
_UNREADABLE = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, JSONDecodeError)
# (pictures (B, 3, H, W) in [-1, 1], masks (B, H, W)) -> latents (B, 16, H/8, W/8) of the masked pictures
EncodeMasked = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def fill_npz_path(image_path: str | os.PathLike, image_size: tuple[int, int]) -> Path:
    w, h = image_size
    return Path(f"{os.path.splitext(os.fspath(image_path))[0]}_{w:04d}x{h:04d}{FILL_SUFFIX}")


class FillCache:
    """Computes, checks, stores and serves the Fill entries of a dataset's items (see the module docstring)."""

    def __init__(self, cache_to_disk: bool, ae_identity: str, skip_cache_check: bool = False):
        self.cache_to_disk, self.ae_identity, self.skip_cache_check = cache_to_disk, ae_identity, skip_cache_check
        self._memory: dict[tuple[str, str], dict[str, torch.Tensor]] = {}

    def _key(self, item) -> tuple[str, str]:
        return os.fspath(fill_npz_path(item.absolute_path, item.image_size)), resolution_suffix(item.bucket_reso)

    def expected_meta(self, item) -> dict:
        return {"format": FORMAT_VERSION, "kind": "fill_masked_image", "ae": self.ae_identity,
                "bucket_reso": [int(v) for v in item.bucket_reso], "original_size": [int(v) for v in item.image_size],
                "resize_interpolation": getattr(item, "resize_interpolation", None), "posterior": "mean",
                "flip": bool(item.flip_aug), "image_hash": file_content_hash(item.absolute_path),
                "mask_hash": file_content_hash(item.fill_mask_path)}

    def _status(self, key, expected: dict) -> str:
        """"valid", or why the entry must be computed."""
        if not self.cache_to_disk:
            stored = self._memory.get(key)
            return "new" if stored is None else "valid"  # RAM entries never outlive the run
        path, suffix = Path(key[0]), key[1]
        if not path.exists():
            return "new"
        if self.skip_cache_check:
            return "valid"
        try:
            if META_KEY + suffix not in npz_index(path):
                return "no record"
            stored = meta_from_array(load_npz(path, [META_KEY + suffix])[META_KEY + suffix])
        except _UNREADABLE:
            return "unreadable file"
        diff = differing_fields(stored, expected, ignore=("flip",) if stored.get("flip") else ())
        return "changed " + "/".join(diff) if diff else "valid"

    def cache(self, dataset, encode: EncodeMasked, process_index: int = 0, num_processes: int = 1,
              wait_for_everyone: Callable[[], None] = lambda: None, progress: bool = True) -> int:
        """Encode every missing or stale entry of `dataset`'s items with a mask file; returns how many this process
        encoded (on disk, the files are shared out between processes, as the latent cache does)."""
        items = {self._key(i): i for i in dataset.items if i.fill_mask_path is not None}
        keys = list(items)
        if self.cache_to_disk and num_processes > 1:
            keys = [keys[i] for i in process_share([k[0] for k in keys], process_index, num_processes)]
        todo, reasons = [], Counter()
        for key in keys:
            status = self._status(key, self.expected_meta(items[key]))
            if status != "valid":
                todo.append(key)
                reasons[status] += 1
        log_stale("FLUX.1 Fill masked-picture latent", reasons)
        bar = progress_bar(len(todo), "caching Fill latents", progress and process_index == 0)
        for key in todo:
            item = items[key]
            meta = self.expected_meta(item)  # hashed before the pixels are read: an edit in between is stale
            arrays = {}
            for flipped in (False, True) if item.flip_aug else (False,):
                pixels = bucket_pixels(dataset, item, flipped)[None]
                mask = torch.from_numpy(bucket_mask(dataset, item, flipped))[None]
                name = "_flipped" if flipped else ""
                arrays[f"masked_latents{name}"] = encode(pixels, mask)[0].float().cpu()
                arrays[f"mask{name}"] = mask[0]
            self._store(key, arrays, meta)
            bar.update(1)
        bar.close()
        wait_for_everyone()
        return len(todo)

    def _store(self, key, arrays: dict[str, torch.Tensor], meta: dict) -> None:
        if not self.cache_to_disk:
            self._memory[key] = arrays
            return
        path, suffix = Path(key[0]), key[1]
        stored: dict[str, np.ndarray] = {}
        if path.exists():
            try:
                stored = {k: v for k, v in load_npz(path).items() if not k.endswith(suffix)}  # other buckets kept
            except _UNREADABLE as e:
                logger.warning("%s: unreadable (%s); writing a new file", path, e)
        stored.update({name + suffix: a.numpy() for name, a in arrays.items()})
        stored[META_KEY + suffix] = meta_to_array(meta)
        write_npz_atomic(path, stored)

    def get(self, item, flipped: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked-picture latents (16, h, w), mask (H, W)) of `item`, flipped if asked."""
        key = self._key(item)
        name = "_flipped" if flipped else ""
        if not self.cache_to_disk:
            arrays = self._memory[key]
            return arrays[f"masked_latents{name}"], arrays[f"mask{name}"]
        suffix = key[1]
        a = load_npz(key[0], [f"masked_latents{name}{suffix}", f"mask{name}{suffix}"])
        return torch.from_numpy(a[f"masked_latents{name}{suffix}"]), torch.from_numpy(a[f"mask{name}{suffix}"])
