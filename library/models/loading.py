"""Public Python API for scripting the suite (notebooks, node packs), named as in sd-scripts' `library.flux_utils`.

    from library import flux_utils
    is_schnell, flux = flux_utils.load_flow_model("flux1-dev.safetensors", torch.bfloat16, "cuda")
    ae = flux_utils.load_ae("ae.safetensors", torch.bfloat16, "cuda")
    clip_l = flux_utils.load_clip_l("clip_l.safetensors", torch.bfloat16, "cuda")
    t5xxl = flux_utils.load_t5xxl("t5xxl_fp16.safetensors", torch.bfloat16, "cuda")
    tokenizer = flux_utils.load_tokenizer(is_schnell=is_schnell)
    l_pooled, t5_out, txt_ids, t5_mask = flux_utils.encode_prompts(clip_l, t5xxl, *tokenizer("a cat"))

Every loader accepts safetensors only and raises `ModelFileError` (a ValueError) naming the file and what it
looks like when it is not what was expected. `disable_mmap` is accepted for sd-scripts compatibility; our loaders
always read tensor by tensor, which is what that flag was for.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from library.formats.dtypes import compute_dtype_for
from library.formats.safetensors_io import ModelFileError  # noqa: F401 (public API)
from library.models import autoencoder as flux_ae
from library.models import text_encoders
from library.models.checkpoint import FluxCheckpointInfo, analyze_checkpoint, load_transformer
from library.models.controlnet import ControlNetFlux
from library.models.controlnet import load_controlnet as load
from library.models.packing import pack_latents, prepare_img_ids, unpack_latents  # noqa: F401 (public API)
from library.models.text_encoding import FluxTokenizer, encode_prompts, t5_max_length_for  # noqa: F401 (public API)
from library.models.tokenizers import load_clip_tokenizer, load_t5_tokenizer
from library.models.transformer import FLUX_PRESETS, Flux

PathLike = str | os.PathLike


def analyze_checkpoint_state(ckpt_path: PathLike) -> tuple[bool, bool, tuple[int, int], list[Path]]:
    """sd-scripts' summary of a transformer checkpoint: (is_diffusers, is_schnell, (double, single), files)."""
    info = analyze_checkpoint(ckpt_path)
    files = list(info.file_keys)
    return info.layout == "diffusers", info.is_schnell, (info.params.depth, info.params.depth_single_blocks), files


def load_flow_model(ckpt_path: PathLike, dtype: torch.dtype | None, device: str | torch.device,
                    disable_mmap: bool = False, info: FluxCheckpointInfo | None = None) -> tuple[bool, Flux]:
    """Load a FLUX.1 transformer (BFL, ComfyUI-prefixed or diffusers layout; fp8 kept as stored when dtype is None).

    Returns (is_schnell, model), like sd-scripts."""
    model = load_transformer(ckpt_path, dtype, device, info=info)
    return model.is_schnell, model


def load_controlnet(ckpt_path: PathLike | None, is_schnell: bool, dtype: torch.dtype | None,
                    device: str | torch.device, disable_mmap: bool = False, base_params=None):
    """An sd-scripts FLUX ControlNet for the dev (or schnell) transformer, or for `base_params` (a FluxParams):
    loaded from `ckpt_path`, or new (random blocks, zero output projections, as sd-scripts) when it is None. See
    `library.models.controlnet.controlnet_from_transformer` for one that starts from the transformer's weights."""
    params = base_params or FLUX_PRESETS["schnell" if is_schnell else "dev"]
    if ckpt_path is None:
        with torch.device(device):
            return ControlNetFlux(params).to(dtype)
    return load(ckpt_path, params, dtype, device)


def load_ae(ckpt_path: PathLike, dtype: torch.dtype | None, device: str | torch.device, disable_mmap: bool = False):
    """Load the FLUX autoencoder (ae.safetensors)."""
    return flux_ae.load_ae(ckpt_path, dtype, device)


def load_clip_l(ckpt_path: PathLike, dtype: torch.dtype | None, device: str | torch.device,
                disable_mmap: bool = False):
    """Load CLIP-L (clip_l.safetensors) as a transformers CLIPTextModel."""
    return text_encoders.load_clip_l(ckpt_path, dtype, device)


def load_t5xxl(ckpt_path: PathLike, dtype: torch.dtype | None, device: str | torch.device,
               disable_mmap: bool = False):
    """Load the T5-XXL encoder (t5xxl_fp16.safetensors, fp8 variants) as a transformers T5EncoderModel."""
    return text_encoders.load_t5xxl(ckpt_path, dtype, device)


def load_tokenizer(tokenizer_cache_dir: PathLike | None = None, is_schnell: bool = False,
                   t5xxl_max_token_length: int | None = None, clip_l_tokenizer: str | None = None,
                   t5xxl_tokenizer: str | None = None) -> FluxTokenizer:
    """CLIP-L and T5 tokenizers from a local folder, `tokenizer_cache_dir` (sd-scripts' layout) or the hub."""
    clip = load_clip_tokenizer(tokenizer_cache_dir, **({"name_or_path": clip_l_tokenizer} if clip_l_tokenizer else {}))
    t5 = load_t5_tokenizer(tokenizer_cache_dir, **({"name_or_path": t5xxl_tokenizer} if t5xxl_tokenizer else {}))
    return FluxTokenizer(clip, t5, t5_max_length_for(is_schnell, t5xxl_max_token_length))


__all__ = [
    "FluxTokenizer", "ModelFileError", "analyze_checkpoint", "analyze_checkpoint_state", "compute_dtype_for",
    "encode_prompts", "load_ae", "load_clip_l", "load_controlnet", "load_flow_model", "load_t5xxl", "load_tokenizer",
    "pack_latents", "prepare_img_ids", "unpack_latents",
]
