"""Dtype names as sd-scripts spells them on the command line (reference 5.9)."""

from __future__ import annotations

import torch

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "fp8": torch.float8_e4m3fn,
    "float8": torch.float8_e4m3fn,
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "e4m3fn": torch.float8_e4m3fn,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e4m3fnuz": torch.float8_e4m3fnuz,
    "e4m3fnuz": torch.float8_e4m3fnuz,
    "float8_e4m3fnuz": torch.float8_e4m3fnuz,
    "fp8_e5m2": torch.float8_e5m2,
    "e5m2": torch.float8_e5m2,
    "float8_e5m2": torch.float8_e5m2,
    "fp8_e5m2fnuz": torch.float8_e5m2fnuz,
    "e5m2fnuz": torch.float8_e5m2fnuz,
    "float8_e5m2fnuz": torch.float8_e5m2fnuz,
}

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2, torch.float8_e5m2fnuz)

# safetensors header dtype names -> torch dtypes (for reading headers without loading tensors)
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def str_to_dtype(name: str | torch.dtype | None, default: torch.dtype | None = None) -> torch.dtype | None:
    """Turn a dtype name (`bf16`, `fp8_e4m3fn`, ...) into a torch dtype; None gives `default`."""
    if name is None:
        return default
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        allowed = ", ".join(sorted(_DTYPES))
        raise ValueError(f"unknown dtype {name!r}; expected one of: {allowed}") from None


def is_fp8(dtype: torch.dtype | None) -> bool:
    return dtype in FP8_DTYPES


def compute_dtype_for(storage_dtype: torch.dtype) -> torch.dtype:
    """The dtype arithmetic runs in for weights stored as `storage_dtype` (fp8 is storage only)."""
    return torch.bfloat16 if is_fp8(storage_dtype) else storage_dtype
