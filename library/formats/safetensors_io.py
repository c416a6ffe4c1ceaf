"""Reading and writing model files: safetensors only, checked before anything is loaded.

Every loader in the suite goes through `read_header` first, so a pickle, a truncated download or a file of the
wrong kind is reported with the file name, what it looks like and what was expected -- before any weights are read.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch

from library.formats.atomic_io import atomic_write
from library.formats.dtypes import SAFETENSORS_DTYPES

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class ModelFileError(ValueError):
    """A model file that cannot be used, with a message meant for the user (no traceback needed)."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors spelling: F32, BF16, F8_E4M3, ...
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return SAFETENSORS_DTYPES.get(self.dtype)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    data_start: int = 0  # file offset of the data block (8 + header length)

    @property
    def keys(self) -> list[str]:
        return list(self.tensors)


def _looks_like_pickle(head: bytes) -> bool:
    """torch.save writes a zip archive (PK..) since 1.6; older files open with the pickle PROTO opcode 0x80 and a
    protocol number. A safetensors file opens with its header length, whose low byte can also be 0x80, so the
    caller also checks that the JSON header ('{') follows those 8 bytes."""
    return head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
                                          and head[8:9] != b"{")


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and validate a safetensors header without reading tensor data.

    Raises ModelFileError for a missing file, a pickle, a non-safetensors file or a truncated file.
    """
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path}: file not found")
    if path.is_dir():
        raise ModelFileError(f"{path}: is a folder, expected a .safetensors file")
    size = path.stat().st_size
    pickle_message = (
        f"{path}: this is a pickled PyTorch file ({path.suffix or 'no suffix'}); pickles can run arbitrary code "
        "and are never loaded by this suite. Convert it to .safetensors with a tool you trust "
        "(for example safetensors.torch.save_file on a state dict you loaded yourself) and pass that file."
    )
    with open(path, "rb") as f:
        head = f.read(9)
        if _looks_like_pickle(head):
            raise ModelFileError(pickle_message)
        if head[:4] == b"GGUF":  # the transformer's loader reads GGUF before it gets here (models/checkpoint.py)
            raise ModelFileError(f"{path}: is a GGUF file; only the FLUX transformer can be a .gguf file here, give "
                                 "this component as .safetensors")
        if len(head) < 9:
            raise ModelFileError(f"{path}: file is {size} bytes, too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", head[:8])
        if header_len > _MAX_HEADER_BYTES or header_len + 8 > size:
            if path.suffix.lower() in PICKLE_SUFFIXES:
                raise ModelFileError(pickle_message)
            raise ModelFileError(
                f"{path}: not a valid safetensors file (header length {header_len} does not fit a {size}-byte file); "
                "it may be truncated or in another format"
            )
        f.seek(8)
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path}: not a valid safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: not a valid safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    data_end = 0
    for name, info in header.items():
        try:
            begin, end = info["data_offsets"]
            tensors[name] = TensorInfo(info["dtype"], tuple(info["shape"]), begin, end)
        except (KeyError, TypeError, ValueError):
            raise ModelFileError(f"{path}: not a valid safetensors file (bad header entry for {name!r})") from None
        data_end = max(data_end, end)
    expected = 8 + header_len + data_end
    if size < expected:
        raise ModelFileError(
            f"{path}: file is truncated ({size:,} bytes, its header needs {expected:,}); download it again"
        )
    return SafetensorsHeader(path, tensors, {str(k): str(v) for k, v in metadata.items()}, 8 + header_len)


# ----------------------------------------------------------------------------------------------------------------
# What a file looks like, from its keys alone

FILE_KINDS = {
    "flux_bfl": "a FLUX transformer (BFL layout)",
    "flux_diffusers": "a FLUX transformer (diffusers layout)",
    "ae": "a FLUX autoencoder (ae.safetensors)",
    "clip_l": "a CLIP-L text encoder",
    "t5": "a T5 text encoder",
    "lora": "a LoRA",
    "unknown": "an unrecognised model file",
}

TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


_LORA_MARKERS = (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".lora.down.", ".lora.up.")


def strip_prefix(keys: Iterable[str], prefixes: Iterable[str]) -> str:
    """Return the first of `prefixes` that every key starts with ('' if none)."""
    keys = list(keys)
    for p in prefixes:
        if keys and all(k.startswith(p) for k in keys):
            return p
    return ""


def detect_kind(keys: Iterable[str]) -> str:
    keys = list(keys)
    if any(marker in k for k in keys for marker in _LORA_MARKERS):
        return "lora"
    if any(k.endswith("double_blocks.0.img_attn.qkv.weight") for k in keys):
        return "flux_bfl"
    if any(k.endswith("transformer_blocks.0.attn.to_q.weight") for k in keys):
        return "flux_diffusers"
    if any(k.endswith("decoder.conv_in.weight") for k in keys) and any("encoder.down." in k for k in keys):
        return "ae"
    if any(k.endswith("embeddings.token_embedding.weight") for k in keys):
        return "clip_l"
    if any(k.endswith("SelfAttention.q.weight") for k in keys) or any(k.endswith("shared.weight") for k in keys):
        return "t5"
    return "unknown"


def sample_keys(keys: Iterable[str], n: int = 5) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys)} keys)" if len(keys) > n else "")


def expect_kind(header: SafetensorsHeader, expected: str, role: str) -> None:
    """Raise a ModelFileError naming the file, what it looks like and what `role` needs."""
    kind = detect_kind(header.keys)
    if kind == expected:
        return
    looks = FILE_KINDS[kind]
    if kind == "unknown":
        looks += f" (sample keys: {sample_keys(header.keys)})" if header.keys else " (it holds no tensors)"
    raise ModelFileError(f"{header.path}: expected {FILE_KINDS[expected]} for {role}, but this file looks like {looks}")


# ----------------------------------------------------------------------------------------------------------------
# Loading and saving


class TensorReader:
    """Reads the tensors of one safetensors file into private memory, one at a time.

    Why not safetensors' `safe_open`: on CPU it returns tensors that point into a memory map of the whole file, so a
    dtype cast keeps every read page of the file resident beside the converted weights until the file is closed
    (1.5x to 3x the model in RSS, see docs/benchmarks.md), and weights that stay mapped break if the file is
    rewritten in place. Plain reads into fresh buffers keep the peak at the loaded weights plus one tensor.
    """

    def __init__(self, path: str | os.PathLike, header: SafetensorsHeader | None = None):
        self.header = header or read_header(path)
        self._file = open(self.header.path, "rb", buffering=0)

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def keys(self) -> list[str]:
        return self.header.keys

    def get(self, key: str) -> torch.Tensor:
        info = self.header.tensors[key]
        path = self.header.path
        dtype = info.torch_dtype
        if dtype is None:
            raise ModelFileError(f"{path}: tensor {key!r} has a dtype this suite cannot read ({info.dtype})")
        size = info.end - info.begin
        if size != info.numel * torch.empty(0, dtype=dtype).element_size():
            raise ModelFileError(f"{path}: tensor {key!r} is {size} bytes, its shape {info.shape} needs another size")
        buf = torch.empty(size, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        self._file.seek(self.header.data_start + info.begin)
        done = 0
        while done < size:
            n = self._file.readinto(view[done:])
            if not n:
                raise ModelFileError(f"{path}: file ended while reading {key!r}; it is truncated")
            done += n
        return buf.view(dtype).reshape(info.shape)


def load_tensors(
    path: str | os.PathLike,
    keys: Iterable[str] | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    rename: Mapping[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """Read tensors one at a time into private memory, casting floating ones to `dtype` (None keeps the stored
    dtype). Peak memory is the returned tensors plus one tensor. `rename` maps file keys to returned names."""
    out: dict[str, torch.Tensor] = {}
    with TensorReader(path) as reader:
        for key in (keys if keys is not None else reader.keys()):
            t = reader.get(key)
            if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                t = t.to(dtype)
            if str(device) != "cpu":
                t = t.to(device)
            out[rename.get(key, key) if rename else key] = t
    return out


def save_file_atomic(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file atomically (temporary file in the same folder, then rename)."""
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
                                             metadata=dict(metadata or {})))


def assign_weights(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Assign loaded tensors to a model built on the `meta` device (no second copy), checking every key and shape.

    Unlike sd-scripts' non-strict loading, a missing, unexpected or mis-shaped tensor is an error naming the file.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [f"{k}: file {tuple(state_dict[k].shape)}, model {tuple(expected[k].shape)}"
             for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s) ({sample_keys(missing, 3)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s) ({sample_keys(unexpected, 3)})")
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) of the wrong shape ({'; '.join(wrong[:3])})")
    if problems:
        raise ModelFileError(f"{path}: does not match the model built from it: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ModelFileError(f"{path}: internal error, tensors left unloaded: {sample_keys(left, 3)}")

