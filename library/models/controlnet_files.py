"""Which ControlNet layout a file is, and its loader: sd-scripts' (library/models/controlnet.py) or diffusers'
(library/models/diffusers_controlnet.py: a file or a folder)."""

from __future__ import annotations

import os

import torch

from library.formats.safetensors_io import FILE_KINDS, ModelFileError, detect_kind, read_header, sample_keys
from library.models.controlnet import REQUIRED_KEYS, load_controlnet
from library.models.diffusers_controlnet import is_diffusers_controlnet, load_diffusers_controlnet, weights_file
from library.models.transformer import FluxParams


def controlnet_layout(path: str | os.PathLike) -> str:
    """"sd-scripts" or "diffusers"; ModelFileError naming what the file looks like otherwise."""
    keys = read_header(weights_file(path)).keys
    if is_diffusers_controlnet(keys):
        return "diffusers"
    if all(k in keys for k in REQUIRED_KEYS):
        return "sd-scripts"
    kind = detect_kind(keys)
    looks = FILE_KINDS[kind] + (f" (sample keys: {sample_keys(keys)})" if kind == "unknown" else "")
    raise ModelFileError(f"{path}: expected a FLUX ControlNet (sd-scripts keys {', '.join(REQUIRED_KEYS)}, or "
                         f"diffusers keys controlnet_blocks.*, transformer_blocks.*), but this file looks like {looks}")


def load_any_controlnet(path: str | os.PathLike, base: FluxParams, dtype: torch.dtype | None = torch.float32,
                        device: torch.device | str = "cpu") -> torch.nn.Module:
    if controlnet_layout(path) == "diffusers":
        return load_diffusers_controlnet(path, base, dtype, device)
    return load_controlnet(path, base, dtype, device)
