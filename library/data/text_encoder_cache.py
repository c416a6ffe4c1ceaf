"""Text-encoder output cache: CLIP-L / T5-XXL outputs per caption, in RAM or in sd-scripts' npz files
(reference 4.3, 18.3).

File `<image stem>_flux_te.npz` with `l_pooled` (768,), `t5_out` (L, 4096) (float32; fp16 outputs stay fp16),
`txt_ids` float32 (L, 3) zeros, `t5_attn_mask` int64 (L,) and `apply_t5_attn_mask` (bool scalar), as sd-scripts.

sd-scripts only checks that the five keys exist and the mask flag matches, so a changed caption, token length or
text encoder silently keeps the old outputs (reference 17 item 10). We add `flux_suite_meta` (JSON: the caption
encoded, T5 token length, mask flag, the caller's encoder identities and dtype, format version) and recompute on any
difference. sd-scripts' files (no record) are used when their keys, mask flag and token length fit, with one warning.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections import Counter
from json import JSONDecodeError
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from library.data.cache_common import (FORMAT_VERSION, CacheError, NoOp, TextEncoderCacheItem, differing_fields,
                                       load_npz, log_stale, meta_from_array, meta_to_array, model_file_identity,
                                       npz_index, process_share, progress_bar, warn_foreign_files, write_npz_atomic)

TE_SUFFIX = "_flux_te.npz"
OUTPUT_KEYS = ("l_pooled", "t5_out", "txt_ids", "t5_attn_mask")
FILE_KEYS = (*OUTPUT_KEYS, "apply_t5_attn_mask")
META_KEY = "flux_suite_meta"
_UNREADABLE = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, JSONDecodeError)

TEOutputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # l_pooled, t5_out, txt_ids, t5_attn_mask


def te_npz_path(image_path: str | os.PathLike) -> Path:
    return Path(os.path.splitext(os.fspath(image_path))[0] + TE_SUFFIX)


def text_encoder_identity(clip_l_path: str | os.PathLike | None, t5xxl_path: str | os.PathLike, dtype) -> dict:
    """The `identity` a trainer passes to TextEncoderCache: both weight files (CLIP-L None: a T5-only model, Chroma)
    and the dtype they run in."""
    return {"clip_l": model_file_identity(clip_l_path) if clip_l_path else None,
            "t5xxl": model_file_identity(t5xxl_path), "dtype": str(dtype).replace("torch.", "")}


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    # numpy has no bfloat16: bf16 (and fp8-computed) outputs are stored as float32; fp16 stays fp16 (as sd-scripts)
    if t.dtype not in (torch.float16, torch.float32, torch.int64):
        t = t.float() if t.is_floating_point() else t.long()
    return t.detach().cpu().numpy()


def stack_outputs(outputs: Sequence[Sequence[torch.Tensor | None]]) -> tuple:
    """Collate per-item `(l_pooled, t5_out, txt_ids, t5_attn_mask)` into batch tensors.

    Sequences of different token lengths are zero-padded at the end (a zero mask marks the padding); a part that
    is None for every item stays None.
    """
    batched = []
    for part in zip(*outputs):
        if all(p is None for p in part):
            batched.append(None)
            continue
        if any(p is None for p in part):
            raise ValueError("cannot stack text-encoder outputs where only some items have this part")
        if part[0].dim() >= 1 and len({p.shape for p in part}) > 1:
            length = max(p.shape[0] for p in part)
            part = [torch.nn.functional.pad(p, (0, 0) * (p.dim() - 1) + (0, length - p.shape[0])) for p in part]
        batched.append(torch.stack(list(part)))
    return tuple(batched)


class TextEncoderCache:
    """Computes, validates, stores and serves text-encoder outputs of dataset items (see the module docstring).

    cache_to_disk: npz files beside the images (shared with sd-scripts) instead of RAM.
    identity: JSON-serialisable description of the encoders, e.g. `text_encoder_identity(clip_l_path, t5xxl_path,
        dtype)`; stored in the provenance and compared.
    skip_cache_check: trust any existing file, without reading it (sd-scripts' `--skip_cache_check`).
    apply_t5_attn_mask: run T5 with its attention mask (recorded in the file, as sd-scripts).
    t5_max_length: T5 token length; must be the tokenizer's.
    trust_foreign: use files without our provenance when their keys fit (else recompute them).
    """

    def __init__(self, cache_to_disk: bool, identity: dict, skip_cache_check: bool = False, batch_size: int = 1,
                 apply_t5_attn_mask: bool = False, t5_max_length: int = 512, trust_foreign: bool = True):
        self.cache_to_disk = cache_to_disk
        # through JSON now, so tuples compare equal to the lists read back and a bad value fails here
        self.identity = json.loads(json.dumps(identity, sort_keys=True))
        self.skip_cache_check = skip_cache_check
        self.batch_size = max(1, int(batch_size))
        self.apply_t5_attn_mask = bool(apply_t5_attn_mask)
        self.t5_max_length = int(t5_max_length)
        self.trust_foreign = trust_foreign
        self._memory: dict[tuple[str, str], tuple[np.ndarray, ...]] = {}

    stack = staticmethod(stack_outputs)

    def npz_path(self, item: TextEncoderCacheItem) -> Path:
        return te_npz_path(item.absolute_path)

    def _key(self, item: TextEncoderCacheItem) -> tuple[str, str]:
        # A file holds one caption per image; RAM can hold several (one image in two subsets).
        return (os.fspath(self.npz_path(item)), "" if self.cache_to_disk else item.te_caption)

    def expected_meta(self, item: TextEncoderCacheItem) -> dict:
        return {"format": FORMAT_VERSION, "caption": item.te_caption, "t5_max_length": self.t5_max_length,
                "apply_t5_attn_mask": self.apply_t5_attn_mask, "encoders": self.identity}

    # -- validity ------------------------------------------------------------------------------------------------

    def is_valid(self, item: TextEncoderCacheItem, expected_meta: dict | None = None) -> bool:
        status, _ = self._status(self._key(item), expected_meta or self.expected_meta(item))
        return status in ("valid", "foreign")

    def _status(self, key: tuple[str, str], expected: dict) -> tuple[str, str]:
        """("valid" | "foreign" | "missing" | "stale", reason)."""
        if not self.cache_to_disk:
            return ("valid", "") if key in self._memory else ("missing", "new")
        path = Path(key[0])
        if not path.exists():
            return "missing", "new"
        if self.skip_cache_check:
            return "valid", ""
        try:
            index = npz_index(path)
            if any(k not in index for k in FILE_KEYS):
                return "stale", "missing keys"
            if META_KEY not in index:
                if not self.trust_foreign:
                    return "stale", "sd-scripts file"
                if bool(load_npz(path, ["apply_t5_attn_mask"])["apply_t5_attn_mask"]) != self.apply_t5_attn_mask:
                    return "stale", "changed apply_t5_attn_mask"
                if index["t5_out"][0][0] != self.t5_max_length:
                    return "stale", "changed t5_max_length"
                return "foreign", ""
            stored = meta_from_array(load_npz(path, [META_KEY])[META_KEY])
        except _UNREADABLE:
            return "stale", "unreadable file"
        diff = differing_fields(stored, expected)
        return ("stale", "changed " + "/".join(diff)) if diff else ("valid", "")

    # -- computing -----------------------------------------------------------------------------------------------

    def _jobs(self, items: Sequence[TextEncoderCacheItem]) -> list[tuple[tuple[str, str], str, dict]]:
        """One (key, caption, meta) per distinct entry; one image file with two captions is an error on disk."""
        jobs: dict[tuple[str, str], tuple[tuple[str, str], str, dict]] = {}
        for item in items:
            key = self._key(item)
            if key in jobs:
                if jobs[key][1] != item.te_caption:
                    raise CacheError(
                        f"{key[0]}: image {item.absolute_path} is used with two captions ({jobs[key][1]!r} and "
                        f"{item.te_caption!r}); a text-encoder cache file holds one. Cache text-encoder outputs in "
                        "memory, or give the image a single caption")
                continue
            jobs[key] = (key, item.te_caption, self.expected_meta(item))
        return list(jobs.values())

    def cache(self, items: Sequence[TextEncoderCacheItem], encode: Callable[[list[str]], TEOutputs],
              process_index: int = 0, num_processes: int = 1, wait_for_everyone: Callable[[], None] = NoOp,
              progress: bool = True) -> int:
        """Encode every item whose entry is missing or stale; returns how many entries this process encoded.

        `encode(captions)` returns `(l_pooled, t5_out, txt_ids, t5_mask)` for a list of captions, T5 padded to this
        cache's `t5_max_length` and masked as its `apply_t5_attn_mask` says (library.models.text_encoding.
        caption_encoder builds one from the tokenizer and the encoders: the cache knows no model). On disk with
        several processes the k-th distinct file goes to process k % num_processes; all meet in
        `wait_for_everyone()` at the end.
        """
        jobs = self._jobs(items)  # on every process, so a conflict stops every process alike
        if self.cache_to_disk and num_processes > 1:
            jobs = [jobs[i] for i in process_share([j[0][0] for j in jobs], process_index, num_processes)]
        todo, foreign, reasons = [], [], Counter()
        for job in jobs:
            status, reason = self._status(job[0], job[2])
            if status == "foreign":
                foreign.append(Path(job[0][0]))
            elif status != "valid":
                todo.append(job)
                reasons[reason] += 1
        warn_foreign_files("text-encoder", foreign, "their captions and text encoders cannot be checked",
                           process_index, num_processes)
        log_stale("text-encoder", reasons)

        bar = progress_bar(len(todo), "caching text-encoder outputs", progress and process_index == 0)
        try:
            for start in range(0, len(todo), self.batch_size):
                batch = todo[start:start + self.batch_size]
                self._encode_batch(batch, encode)
                bar.update(len(batch))
        finally:
            bar.close()
        wait_for_everyone()
        return len(todo)

    def _encode_batch(self, batch, encode: Callable[[list[str]], TEOutputs]) -> None:
        with torch.no_grad():
            l_pooled, t5_out, txt_ids, t5_mask = encode([caption for _, caption, _ in batch])
        if t5_out.shape[1] != self.t5_max_length:
            raise CacheError(f"T5 output has {t5_out.shape[1]} tokens, expected {self.t5_max_length}")
        l_pooled, t5_out, txt_ids, t5_mask = (_to_numpy(t) for t in (l_pooled, t5_out, txt_ids.float(), t5_mask))
        for i, (key, _, meta) in enumerate(batch):
            outputs = (l_pooled[i].copy(), t5_out[i].copy(), txt_ids[i].copy(), t5_mask[i].copy())
            if not self.cache_to_disk:
                self._memory[key] = outputs
                continue
            arrays = dict(zip(OUTPUT_KEYS, outputs))
            arrays["apply_t5_attn_mask"] = np.array(self.apply_t5_attn_mask)
            arrays[META_KEY] = meta_to_array(meta)
            write_npz_atomic(key[0], arrays)

    # -- serving -------------------------------------------------------------------------------------------------

    def get(self, item: TextEncoderCacheItem) -> TEOutputs:
        """`(l_pooled, t5_out, txt_ids, t5_attn_mask)` of `item` as CPU tensors."""
        key = self._key(item)
        if not self.cache_to_disk:
            if key not in self._memory:
                raise CacheError(f"{item.absolute_path}: no text-encoder outputs cached in memory for caption "
                                 f"{item.te_caption!r}; run cache() first")
            return tuple(torch.from_numpy(a) for a in self._memory[key])
        path = Path(key[0])
        if not path.exists():
            raise CacheError(f"{path}: text-encoder cache file not found; run cache() first")
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in OUTPUT_KEYS if k not in z.files]
            if missing:
                raise CacheError(f"{path}: key {missing[0]!r} not found (file has {', '.join(z.files)})")
            return tuple(torch.from_numpy(z[k]) for k in OUTPUT_KEYS)
