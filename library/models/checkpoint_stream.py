"""Tensor-by-tensor reading and writing of whole checkpoints, so tools that rewrite a model (LoRA merge, LoRA
extraction, --mem_eff_save) hold about one tensor at a time instead of the whole model.

`transformer_entries` lists a FLUX transformer's tensors under BFL names (BFL, ComfyUI-prefixed or diffusers
files, shards) with a getter per tensor; `plain_entries` does the same for any other file (text encoders).
`StreamingWriter` writes a safetensors file whose header is known up front, one tensor at a time, atomically.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from library.formats.atomic_io import atomic_write
from library.formats.dtypes import SAFETENSORS_DTYPES
from library.formats.safetensors_io import ModelFileError, TensorReader, read_header

_ST_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


@dataclass
class Entry:
    key: str  # name in the output (BFL name for a transformer)
    shape: tuple[int, ...]
    dtype: torch.dtype  # as stored
    read: Callable[[], torch.Tensor]


class Readers:
    """Open TensorReaders, one per file, closed together."""

    def __init__(self):
        self.readers: dict[Path, TensorReader] = {}

    def get(self, path: Path, key: str) -> torch.Tensor:
        if path not in self.readers:
            self.readers[path] = TensorReader(path)
        return self.readers[path].get(key)

    def close(self) -> None:
        for r in self.readers.values():
            r.close()
        self.readers.clear()


def transformer_entries(path: str | os.PathLike, readers: Readers) -> tuple[list[Entry], object]:
    """The transformer's tensors under BFL names, in the BFL file order, each read on demand."""
    from library.models.checkpoint import analyze_checkpoint
    from library.formats.diffusers_keys import count_diffusers_blocks, key_rules

    info = analyze_checkpoint(path)
    owner = {k: f for f, keys in info.file_keys.items() for k in keys}
    headers = {f: read_header(f) for f in info.file_keys}

    def stored(key: str) -> torch.dtype:
        return SAFETENSORS_DTYPES[headers[owner[key]].tensors[key].dtype]

    entries = []
    if info.layout == "bfl":
        for key in owner:
            entries.append(Entry(key[len(info.prefix):], tuple(headers[owner[key]].tensors[key].shape), stored(key),
                                 lambda key=key: readers.get(owner[key], key)))
        return entries, info
    for rule in key_rules(*count_diffusers_blocks(owner)):
        if not all(d in owner for d in rule.diffusers):
            continue

        def read(rule=rule) -> torch.Tensor:
            parts = [readers.get(owner[d], d) for d in rule.diffusers]
            t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
            if rule.swap_halves:
                a, b = t.chunk(2, dim=0)
                t = torch.cat((b, a), dim=0)
            return t

        entries.append(Entry(rule.bfl, info.shapes[rule.bfl], stored(rule.diffusers[0]), read))
    return entries, info


def plain_entries(path: str | os.PathLike, readers: Readers) -> list[Entry]:
    """Every tensor of one safetensors file under its own name."""
    header = read_header(path)
    p = Path(path)
    return [Entry(k, tuple(v.shape), SAFETENSORS_DTYPES[v.dtype], lambda k=k: readers.get(p, k))
            for k, v in header.tensors.items()]


class StreamingWriter:
    """Write a safetensors file tensor by tensor: the header (names, dtypes, shapes) is written first, then each
    tensor in that order as it is produced. The file appears atomically when every tensor has been written."""

    def __init__(self, path: str | os.PathLike, layout: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        self.order: list[tuple[str, tuple[int, ...], torch.dtype]] = list(layout)
        header: dict = {}
        offset = 0
        for key, shape, dtype in self.order:
            if dtype not in _ST_NAMES:
                raise ValueError(f"{key}: dtype {dtype} cannot be written to safetensors")
            n = torch.empty(0, dtype=dtype).element_size()
            for s in shape:
                n *= s
            header[key] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        raw = json.dumps(header, separators=(",", ":")).encode()
        # safetensors needs the data block 8-byte aligned; 256 (as sd-scripts' streaming writer) suits any dtype
        raw += b" " * (-(8 + len(raw)) % 256)
        self._raw = raw

    def write(self, produce: Callable[[str], torch.Tensor]) -> Path:
        """Call `produce(key)` for every tensor in order and write it; checks each shape and dtype."""

        def body(tmp: str) -> None:
            with open(tmp, "wb") as f:
                f.write(len(self._raw).to_bytes(8, "little"))
                f.write(self._raw)
                for key, shape, dtype in self.order:
                    t = produce(key)
                    if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                        raise ModelFileError(f"{self.path}: internal error, {key} is {tuple(t.shape)} {t.dtype}, "
                                             f"the header says {tuple(shape)} {dtype}")
                    f.write(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)
                    del t

        return atomic_write(self.path, body)
