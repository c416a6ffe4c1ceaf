"""`StreamingWriter`: a safetensors file whose header is known up front, written one tensor at a time, atomically,
so tools that rewrite a model (LoRA merge, --mem_eff_save) hold about one tensor at a time."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from library.formats.atomic_io import atomic_write
from library.formats.dtypes import SAFETENSORS_DTYPES
from library.formats.safetensors_io import ModelFileError

_ST_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


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
