"""The `sshs_*` model hashes sd-scripts writes into LoRA metadata (reference 9.6).

Indexers (the sd-webui additional-networks extension and tools built on it) read these instead of hashing the
file. Both are computed over an in-memory safetensors serialisation of the tensors with only the `ss_*` metadata:
- `sshs_model_hash`: sha256 of the bytes after the header (the tensor data, independent of the metadata);
- `sshs_legacy_hash`: the first 8 hex digits of the sha256 of the 64 KiB at offset 1 MiB of that serialisation.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Mapping, MutableMapping

import torch

_LEGACY_OFFSET = 0x100000
_LEGACY_LENGTH = 0x10000


def model_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) of `tensors` saved with the `ss_*` part of `metadata`."""
    from safetensors.torch import save

    ss_metadata = {k: str(v) for k, v in metadata.items() if k.startswith("ss_")}
    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=ss_metadata)
    (header_len,) = struct.unpack("<Q", data[:8])
    model_hash = hashlib.sha256(data[8 + header_len:]).hexdigest()
    legacy_hash = hashlib.sha256(data[_LEGACY_OFFSET:_LEGACY_OFFSET + _LEGACY_LENGTH]).hexdigest()[:8]
    return model_hash, legacy_hash


def add_model_hashes(tensors: Mapping[str, torch.Tensor], metadata: MutableMapping[str, str]) -> None:
    """Set metadata["sshs_model_hash"] and metadata["sshs_legacy_hash"] for the tensors about to be saved."""
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = model_hashes(tensors, metadata)
