"""Tensor-by-tensor reading of whole checkpoints, so tools that rewrite a model (LoRA merge, LoRA
extraction, --mem_eff_save) hold about one tensor at a time instead of the whole model.

`transformer_entries` lists a FLUX transformer's tensors under BFL names (BFL, ComfyUI-prefixed or diffusers
files, shards; GGUF files dequantized to float32) with a getter per tensor; `plain_entries` does the same for
any other file (text encoders). A scaled fp8 file's weights are read dequantised to float32 (its scales are not
entries of their own). The writer is library/formats/streaming_writer.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from library.formats.diffusers_keys import count_diffusers_blocks, key_rules
from library.formats import fp8_scaled
from library.formats.dtypes import SAFETENSORS_DTYPES
from library.formats.gguf_io import GGUFTensorReader, read_gguf_header
from library.formats.safetensors_io import TensorReader, read_header
from library.models.checkpoint import analyze_checkpoint


@dataclass
class Entry:
    key: str  # name in the output (BFL name for a transformer)
    shape: tuple[int, ...]
    dtype: torch.dtype  # as stored (float32 for a scaled fp8 weight: read dequantised)
    read: Callable[[], torch.Tensor]
    scale_mode: str | None = None  # a scaled fp8 weight's scales: "tensor", "channel" or "block"
    # the tensor as consecutive row blocks, read one at a time (concatenated along dim 0 they are `read()`): a
    # diffusers entry fused from several file tensors never needs the fused copy beside its parts
    read_parts: Callable[[], Iterator[torch.Tensor]] | None = None

    def parts(self) -> Iterator[torch.Tensor]:
        return self.read_parts() if self.read_parts is not None else iter((self.read(),))


class Readers:
    """Open TensorReaders, one per file, closed together."""

    def __init__(self):
        self.readers: dict[Path, TensorReader | GGUFTensorReader] = {}

    def get(self, path: Path, key: str) -> torch.Tensor:
        if path not in self.readers:
            self.readers[path] = TensorReader(path)
        return self.readers[path].get(key)

    def get_gguf(self, path: Path, key: str) -> torch.Tensor:
        if path not in self.readers:
            self.readers[path] = GGUFTensorReader(read_gguf_header(path))
        return self.readers[path].dequantized(key, torch.float32)

    def close(self) -> None:
        for r in self.readers.values():
            r.close()
        self.readers.clear()


def transformer_entries(path: str | os.PathLike, readers: Readers) -> tuple[list[Entry], object]:
    """The transformer's tensors under BFL names, in the BFL file order, each read on demand."""
    info = analyze_checkpoint(path)
    if info.layout == "gguf":
        return [Entry(k[len(info.prefix):], info.shapes[k[len(info.prefix):]], torch.float32,
                      lambda k=k: readers.get_gguf(info.path, k)) for k in info.file_keys[info.path]], info
    owner = {k: f for f, keys in info.file_keys.items() for k in keys}
    headers = {f: read_header(f) for f in info.file_keys}

    def stored(key: str) -> torch.dtype:
        return SAFETENSORS_DTYPES[headers[owner[key]].tensors[key].dtype]

    entries = []
    if info.layout == "bfl":
        for key in owner:
            name, shape = key[len(info.prefix):], tuple(headers[owner[key]].tensors[key].shape)
            if name in info.scales:
                f, skey, sshape = info.scales[name]
                mode = "block" if len(sshape) == 3 else fp8_scaled.scale_mode([sshape])
                entries.append(Entry(name, shape, torch.float32, lambda key=key, f=f, skey=skey: fp8_scaled.dequantize(
                    readers.get(owner[key], key), readers.get(f, skey), torch.float32), mode))
            else:
                entries.append(Entry(name, shape, stored(key), lambda key=key: readers.get(owner[key], key)))
        return entries, info
    for rule in key_rules(*count_diffusers_blocks(owner)):
        if not all(d in owner for d in rule.diffusers):
            continue

        def read_parts(rule=rule) -> Iterator[torch.Tensor]:
            if rule.swap_halves:  # BFL stores the row halves the other way round
                parts = [readers.get(owner[d], d) for d in rule.diffusers]
                a, b = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)).chunk(2, dim=0)
                yield from (b, a)
                return
            for d in rule.diffusers:
                yield readers.get(owner[d], d)

        def read(rule=rule) -> torch.Tensor:
            parts = list(read_parts(rule))
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

        entries.append(Entry(rule.bfl, info.shapes[rule.bfl], stored(rule.diffusers[0]), read,
                             read_parts=read_parts))
    return entries, info


def plain_entries(path: str | os.PathLike, readers: Readers) -> list[Entry]:
    """Every tensor of one safetensors file under its own name."""
    header = read_header(path)
    p = Path(path)
    return [Entry(k, tuple(v.shape), SAFETENSORS_DTYPES[v.dtype], lambda k=k: readers.get(p, k))
            for k, v in header.tensors.items()]
