"""Writing whole models (full fine-tunes, ControlNets) as .safetensors, optionally streamed (--mem_eff_save).

The plain writer converts every tensor first (to the CPU and to --save_precision) and hands them to safetensors'
save_file: when a conversion is needed that is a second copy of the model (of the saved dtype) in RAM. The
streaming writer computes the header from shapes and dtypes, then converts and writes one tensor at a time, so the
extra memory is one tensor (docs/benchmarks.md: 507 MB vs 74 MB for a 1 GB fp32 model saved as bf16). Both write
atomically (temporary file, then rename); the header is padded with spaces so that the tensor data starts at a
multiple of 256 bytes, as sd-scripts' streaming writer does.
"""

from __future__ import annotations

import os
from typing import Mapping

import torch

from library.formats.safetensors_io import save_file_atomic
from library.formats.streaming_writer import StreamingWriter

SAVE_PRECISIONS = {None: None, "float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def save_dtype(save_precision: str | None) -> torch.dtype | None:
    """--save_precision as a dtype (None: keep each tensor's dtype)."""
    if save_precision not in SAVE_PRECISIONS:
        raise ValueError(f"--save_precision {save_precision!r}: expected one of float, fp16, bf16")
    return SAVE_PRECISIONS[save_precision]


def _target_dtype(t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and t.is_floating_point() else t.dtype


def save_model(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None,
               dtype: torch.dtype | None = None, streaming: bool = False) -> None:
    """Write `tensors` (floating ones cast to `dtype` unless None) with string `metadata`, atomically."""
    if streaming:
        save_streaming(tensors, path, metadata, dtype)
        return

    save_file_atomic({k: v.detach().to("cpu", _target_dtype(v, dtype)) for k, v in tensors.items()}, path, metadata)


def save_streaming(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                   metadata: Mapping[str, str] | None = None, dtype: torch.dtype | None = None) -> None:
    """The --mem_eff_save writer: header first, then each tensor converted and written on its own."""
    def produce(key: str) -> torch.Tensor:
        t = tensors[key]
        return t.detach().to("cpu", _target_dtype(t, dtype))

    layout = [(key, tuple(t.shape), _target_dtype(t, dtype)) for key, t in tensors.items()]
    StreamingWriter(path, layout, metadata).write(produce)
