"""GGUF files: recognising them, their header (tensor names, types, shapes, offsets, metadata), reading one tensor's
raw bytes at a time, and writing them (tools/make_tiny_models.py).

The header is parsed by the `gguf` package (an optional requirement: a missing package is one line saying what to
install); tensor bytes are read with plain file reads at their offsets, so a load holds one tensor at a time and no
mapped file pages. GGUF stores dimensions innermost first; everything here is in torch order (rows, columns).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from library.formats.gguf_quants import GGUF_TYPE_BY_ID, GGUFType, dequantize, gguf_type, raw_shape

GGUF_MAGIC = b"GGUF"
# ComfyUI-GGUF records the real shape of tensors it had to reshape under this metadata key prefix
ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."


class GGUFFileError(ValueError):
    """A GGUF file this suite cannot read; the message names the file."""


def is_gguf(path: str | os.PathLike) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def import_gguf():
    try:
        import gguf
    except ImportError:
        raise GGUFFileError("reading or writing .gguf files needs the gguf package: pip install gguf") from None
    return gguf


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    qtype: GGUFType
    shape: tuple[int, ...]  # torch order
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass
class GGUFHeader:
    path: Path
    tensors: dict[str, GGUFTensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)  # string and number fields, as text

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")


def _field_value(f) -> str | list | None:
    try:
        value = f.contents()
    except Exception:  # noqa: BLE001 - a field this gguf version cannot decode is not one we need
        return None
    return value if isinstance(value, list) else str(value)


def read_gguf_header(path: str | os.PathLike) -> GGUFHeader:
    """Names, types, shapes and offsets of every tensor, and the metadata; no tensor data is read."""
    path = Path(path)
    gguf = import_gguf()
    try:
        reader = gguf.GGUFReader(path, "r")
    except (ValueError, OSError, IndexError) as e:
        raise GGUFFileError(f"{path}: not a readable GGUF file ({e})") from None
    metadata, orig_shapes = {}, {}
    for name, f in reader.fields.items():
        value = _field_value(f)
        if name.startswith(ORIG_SHAPE_KEY) and isinstance(value, list):
            orig_shapes[name[len(ORIG_SHAPE_KEY):]] = tuple(int(v) for v in value)
        elif value is not None and not isinstance(value, list):
            metadata[name] = value
    tensors = {}
    for t in reader.tensors:
        qtype = GGUF_TYPE_BY_ID.get(int(t.tensor_type))
        if qtype is None:
            supported = ", ".join(sorted(q.name for q in GGUF_TYPE_BY_ID.values()))
            raise GGUFFileError(f"{path}: tensor {t.name} is stored as {t.tensor_type.name}, which this suite cannot "
                                f"dequantize (supported: {supported})")
        stored = tuple(int(d) for d in reversed(t.shape.tolist()))
        shape = orig_shapes.get(t.name, stored)
        tensors[t.name] = GGUFTensorInfo(t.name, qtype, shape, int(t.data_offset), int(t.n_bytes))
    del reader  # releases its memory map
    return GGUFHeader(path, tensors, metadata)


class GGUFTensorReader:
    """Reads tensors of one GGUF file one at a time (an open file, closed with close() or `with`)."""

    def __init__(self, header: GGUFHeader):
        self.header = header
        self._file = open(header.path, "rb")

    def raw(self, name: str) -> torch.Tensor:
        """The stored bytes as uint8, shaped (rows..., bytes per row) in torch order."""
        info = self.header.tensors[name]
        out = torch.empty(raw_shape(_stored_shape(info), info.qtype), dtype=torch.uint8)
        self._file.seek(info.offset)
        if self._file.readinto(out.numpy()) != info.nbytes:
            raise GGUFFileError(f"{self.header.path}: truncated: tensor {name} ends past the end of the file")
        return out

    def dequantized(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        info = self.header.tensors[name]
        return dequantize(self.raw(name), info.qtype.name, info.shape, dtype)

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _stored_shape(info: GGUFTensorInfo) -> tuple[int, ...]:
    """The shape the bytes are laid out in: the tensor's own, or one row per block-multiple when ComfyUI-GGUF
    reshaped it (the values are the same in row-major order)."""
    if info.shape[-1] % info.qtype.block_size == 0:
        return info.shape
    count = info.nbytes // info.qtype.type_size * info.qtype.block_size
    return (count // info.qtype.block_size, info.qtype.block_size)


def write_gguf(path: str | os.PathLike, tensors: dict[str, tuple[torch.Tensor, str]], arch: str,
               metadata: dict[str, str] | None = None) -> None:
    """Write a GGUF file: each tensor is (values, type name) and is quantized with the gguf package, or (raw uint8
    bytes in torch order, type name) already quantized."""
    import numpy as np

    gguf = import_gguf()
    writer = gguf.GGUFWriter(str(path), arch=arch)
    for key, value in (metadata or {}).items():
        writer.add_string(key, value)
    for name, (t, type_name) in tensors.items():
        gguf_type(type_name)  # a supported type, or a one-line error
        ggml = gguf.GGMLQuantizationType[type_name]
        if t.dtype == torch.uint8:
            data = t.numpy()
        else:
            data = gguf.quants.quantize(t.detach().float().numpy(), ggml)
        # as bytes, so the writer derives each type's shape the same way
        writer.add_tensor(name, np.ascontiguousarray(data).view(np.uint8), raw_dtype=ggml)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
