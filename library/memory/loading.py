"""A model component loaded to run in a given dtype, fp8 weight storage included (inference's loader)."""

from __future__ import annotations

import os

import torch

from library.formats.dtypes import is_fp8, str_to_dtype
from library.memory.fp8 import prepare_fp8, prepare_t5xxl_fp8
from library.memory.quantized_base import load_quantized_transformer
from library.models import autoencoder as flux_ae
from library.models import text_encoders
from library.models.checkpoint import FluxCheckpointInfo, load_transformer


def load_for_compute(kind: str, path: str | os.PathLike, dtype: torch.dtype | str | None, device: str | torch.device,
                     compute_dtype: torch.dtype = torch.bfloat16, info: FluxCheckpointInfo | None = None,
                     quantization: str | None = None, quantize_device: str | torch.device | None = None):
    """Load one component ("flux", "ae", "clip_l", "t5xxl") to run in `dtype`; an fp8 dtype stores the Linear
    weights in fp8 (an fp8 file is used as stored) and computes in `compute_dtype`. `quantization` "nf4" or "int8"
    (the transformer only) stores its block Linears so, quantised while loading (on `quantize_device`, default
    `device` when that is a GPU, else the CPU), computing in `dtype`."""
    if quantization is not None:
        if kind != "flux":
            raise ValueError(f"{quantization} storage is for the transformer only, not {kind}")
        if quantize_device is None:
            quantize_device = device if torch.device(device).type == "cuda" else "cpu"
        return load_quantized_transformer(path, quantization, str_to_dtype(dtype), info=info,
                                          quantize_device=quantize_device).to(device)
    dtype = str_to_dtype(dtype)
    fp8 = is_fp8(dtype)
    load_dtype = None if fp8 else dtype
    if kind == "flux":
        model = load_transformer(path, load_dtype, "cpu", info=info)
    else:
        model = {"ae": flux_ae.load_ae, "clip_l": text_encoders.load_clip_l,
                 "t5xxl": text_encoders.load_t5xxl}[kind](path, load_dtype, "cpu")
    if fp8:
        (prepare_t5xxl_fp8 if kind == "t5xxl" else prepare_fp8)(model, dtype, compute_dtype)
    return model.to(device)
