"""A model component loaded to run in a given dtype, fp8 weight storage and GGUF files included (inference's loader)."""

from __future__ import annotations

import os

import torch

from library.formats.dtypes import is_fp8, str_to_dtype
from library.memory.fp8 import prepare_fp8, prepare_t5xxl_fp8
from library.memory.gguf_linear import load_gguf_transformer
from library.memory.quantized_base import load_quantized_transformer
from library.models import autoencoder as flux_ae
from library.models import text_encoders
from library.models.checkpoint import FluxCheckpointInfo, analyze_checkpoint, load_transformer


def load_for_compute(kind: str, path: str | os.PathLike, dtype: torch.dtype | str | None, device: str | torch.device,
                     compute_dtype: torch.dtype = torch.bfloat16, info: FluxCheckpointInfo | None = None,
                     fp8_matmul: bool = False, quantization: str | None = None,
                     quantize_device: str | torch.device | None = None):
    """Load one component ("flux", "ae", "clip_l", "t5xxl") to run in `dtype`; an fp8 dtype stores the Linear
    weights in fp8 (an fp8 file, scaled or not, is used as stored) and computes in `compute_dtype`, with
    torch._scaled_mm where `fp8_matmul` and the GPU allow; another dtype dequantises a scaled fp8 file. A GGUF
    transformer keeps its quantized weights and computes in `dtype` (in `compute_dtype` when `dtype` is fp8 or None).
    `quantization` "nf4" or "int8" (the transformer only) stores its block Linears so, quantised while loading (on
    `quantize_device`, default `device` when that is a GPU, else the CPU), computing in `dtype`; "fp8_scaled" stores
    them in fp8 with a scale per tensor (a scaled file keeps its own scales)."""
    scaled = None
    if quantization == "fp8_scaled":
        quantization, scaled, dtype = None, "tensor", torch.float8_e4m3fn
    if quantization is not None:
        if kind != "flux":
            raise ValueError(f"{quantization} storage is for the transformer only, not {kind}")
        if (info or analyze_checkpoint(path)).layout == "gguf":
            raise ValueError(f"{path} is a GGUF file, quantized already: {quantization} does not apply to it")
        if quantize_device is None:
            quantize_device = device if torch.device(device).type == "cuda" else "cpu"
        return load_quantized_transformer(path, quantization, str_to_dtype(dtype), info=info,
                                          quantize_device=quantize_device).to(device)
    dtype = str_to_dtype(dtype)
    fp8 = is_fp8(dtype)
    load_dtype = None if fp8 else dtype
    if kind == "flux":
        info = info or analyze_checkpoint(path)
        if info.layout == "gguf":
            return load_gguf_transformer(path, load_dtype or compute_dtype, device, info=info)
        model = load_transformer(path, load_dtype, "cpu", info=info)
    else:
        model = {"ae": flux_ae.load_ae, "clip_l": text_encoders.load_clip_l,
                 "t5xxl": text_encoders.load_t5xxl}[kind](path, load_dtype, "cpu")
    if fp8:
        if kind == "t5xxl":
            prepare_t5xxl_fp8(model, dtype, compute_dtype)
        else:
            prepare_fp8(model, dtype, compute_dtype, fp8_matmul=fp8_matmul, scaled=scaled)
    return model.to(device)
