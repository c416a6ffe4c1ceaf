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

from library.formats import fp8_scaled as scaled
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
               dtype: torch.dtype | None = None, streaming: bool = False, fp8_scaled: str | None = None) -> None:
    """Write `tensors` (floating ones cast to `dtype` unless None) with string `metadata`, atomically.
    `fp8_scaled` "tensor" / "channel": a FLUX transformer's Linear weights written as scaled fp8 instead
    (library/formats/fp8_scaled.py), quantised from their trained values."""
    if streaming:
        save_streaming(tensors, path, metadata, dtype, fp8_scaled)
        return
    layout, produce = _plan(tensors, dtype, fp8_scaled)
    save_file_atomic({key: produce(key) for key, _, _ in layout}, path, metadata)


def save_streaming(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                   metadata: Mapping[str, str] | None = None, dtype: torch.dtype | None = None,
                   fp8_scaled: str | None = None) -> None:
    """The --mem_eff_save writer: header first, then each tensor converted and written on its own."""
    layout, produce = _plan(tensors, dtype, fp8_scaled)
    StreamingWriter(path, layout, metadata).write(produce)


def _plan(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None, fp8_scaled: str | None):
    """The (key, shape, dtype) layout and the producer of each tensor."""
    modes = {} if fp8_scaled is None else {k: fp8_scaled for k, t in tensors.items()
                                           if scaled.is_quantizable(k, tuple(t.shape), t.dtype)}

    def produce(key: str) -> torch.Tensor:
        t = tensors[key].detach()
        return t if key in modes else t.to("cpu", _target_dtype(t, dtype))

    layout = [(key, tuple(t.shape), _target_dtype(t, dtype)) for key, t in tensors.items()]
    return scaled.scaled_layout(layout, modes), scaled.scaled_producer(produce, modes)
