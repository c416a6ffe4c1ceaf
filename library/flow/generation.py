"""Text-to-image generation with loaded FLUX.1 components: prompt -> conditioning -> Euler loop -> decoded image.

Used by flux_minimal_inference.py and meant for sample images during training. Loading lives elsewhere
(library/models/loading.py); this module only moves models between devices when offloading is asked for.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from library.formats.atomic_io import atomic_write
from library.flow.sampling import (
                                   Conditioning,
                                   denoise,
                                   get_noise,
                                   get_schedule,
                                   packed_grid,
                                   prepare_img_ids,
                                   unpack_latents,
                                   )
from library.models.text_encoding import FluxTokenizer, encode_prompts
from library.models.variants import ModelVariant


@dataclass
class FluxModels:
    flux: torch.nn.Module
    ae: torch.nn.Module
    clip_l: torch.nn.Module
    t5xxl: torch.nn.Module
    tokenizer: FluxTokenizer
    variant: ModelVariant  # which FLUX.1 model this is, and its defaults (library/models/variants.py)
    compute_dtype: torch.dtype  # dtype of the transformer's activations (bf16 for fp8 weights)

    @property
    def is_schnell(self) -> bool:
        return not self.variant.shift and not self.variant.has_guidance_input


@dataclass
class GenerationSettings:
    prompt: str
    width: int = 1360
    height: int = 768
    steps: int | None = None  # None: the model's default (library/models/variants.py: 4 schnell, 50 dev, ...)
    guidance: float | None = None  # embedded guidance; None: the model's default (3.5 dev, 2.5 Kontext, ...)
    seed: int = 0
    negative_prompt: str | None = None
    cfg_scale: float = 1.0
    lora_multipliers: tuple[float, ...] | None = None  # interactive --m; None keeps the current ones
    reference_images: tuple[str, ...] = ()  # Kontext references (library/flow/references.py binds them)

    def resolved_steps(self, variant: ModelVariant) -> int:
        return self.steps if self.steps is not None else variant.steps

    def resolved_guidance(self, variant: ModelVariant) -> float:
        """The embedded guidance fed to the model (a model without a guidance input ignores it)."""
        if self.guidance is not None:
            return self.guidance
        return variant.guidance if variant.guidance is not None else 0.0

    def output_size(self) -> tuple[int, int]:
        """(width, height) of the image actually produced: sizes round up to multiples of 16."""
        h, w = packed_grid(self.height, self.width)
        return w * 16, h * 16


class Placement:
    """Where models compute. With offload, a model visits `device` only while it runs and then goes back to where
    it was (the CPU for inference with --offload; during training, a model already on the device stays there)."""

    def __init__(self, device: torch.device, offload: bool):
        self.device, self.offload = torch.device(device), offload

    @contextmanager
    def use(self, *models: torch.nn.Module):
        # a sharded model (FSDP2; its shards maybe offloaded to CPU memory) is placed by its engine: it stays
        homes = [self.device if _sharded(m) else next(m.parameters()).device for m in models] if self.offload else []
        for m, home in zip(models, homes):
            if home != self.device:  # one already there stays (and a block-swapped transformer must not move)
                m.to(self.device)
        try:
            yield
        finally:
            for m, home in zip(models, homes):
                if home != self.device:
                    m.to(home)
            if homes and self.device.type == "cuda":
                torch.cuda.empty_cache()


def _sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(next(model.parameters()), DTensor)


def encode_prompt(models: FluxModels, prompt: str, placement: Placement, apply_t5_attn_mask: bool) -> Conditioning:
    clip_ids, t5_ids, t5_mask = models.tokenizer([prompt])
    with placement.use(models.clip_l, models.t5xxl), torch.no_grad():
        l_pooled, t5_out, txt_ids, t5_mask = encode_prompts(models.clip_l, models.t5xxl, clip_ids, t5_ids, t5_mask,
                                                           apply_t5_attn_mask=apply_t5_attn_mask)
    for name, t in (("CLIP-L pooled output", l_pooled), ("T5-XXL output", t5_out)):
        if torch.isnan(t).any():
            raise ValueError(f"the {name} contains NaN (an fp16 T5-XXL overflows; use bf16 or fp32)")
    to = dict(device=placement.device, dtype=models.compute_dtype)
    return Conditioning(t5_out.to(**to), l_pooled.to(**to), txt_ids.to(**to),
                        t5_mask.to(placement.device) if apply_t5_attn_mask else None)


def generate(models: FluxModels, settings: GenerationSettings, placement: Placement,
             apply_t5_attn_mask: bool = False, tiled_ae: bool = False, progress: bool = True,
             return_latents: bool = False):
    """Render one image; returns a PIL image of settings.output_size() (and, with `return_latents`, the
    unpacked latents (1, 16, H/8, W/8) it was decoded from)."""
    cond = encode_prompt(models, settings.prompt, placement, apply_t5_attn_mask)
    negative = None
    # a model whose default is true CFG (Chroma) takes an empty negative prompt when none is given, as its pipeline
    negative_prompt = settings.negative_prompt or ("" if models.variant.cfg_scale != 1.0 else None)
    if negative_prompt is not None and settings.cfg_scale != 1.0:
        negative = encode_prompt(models, negative_prompt, placement, apply_t5_attn_mask)
    latents = generate_latents(models, settings, cond, negative, placement, progress)
    image = latents_to_image(models.ae, latents, placement, tiled_ae)
    return (image, latents) if return_latents else image


def generate_from_conditioning(models: FluxModels, settings: GenerationSettings, cond: Conditioning,
                               negative: Conditioning | None, placement: Placement, tiled_ae: bool = False,
                               progress: bool = True):
    """Render from encoded prompts (e.g. precomputed before the text encoders were freed); a PIL image."""
    latents = generate_latents(models, settings, cond, negative, placement, progress)
    return latents_to_image(models.ae, latents, placement, tiled_ae)


def generate_latents(models: FluxModels, settings: GenerationSettings, cond: Conditioning,
                     negative: Conditioning | None, placement: Placement, progress: bool = True) -> torch.Tensor:
    """Seeded noise, the schedule (shifted by the target's token count unless the model says not: schnell), the
    Euler loop: latents (1, 16, H/8, W/8). A Kontext model is a `KontextFlux` bound to its references: they are
    appended inside its call, so neither the noise nor the shift counts them (BFL and diffusers shift by the target's
    tokens only)."""
    h, w = packed_grid(settings.height, settings.width)
    noise = get_noise(1, settings.height, settings.width, settings.seed, models.compute_dtype, placement.device)
    img_ids = prepare_img_ids(1, h, w).to(placement.device, models.compute_dtype)
    timesteps = get_schedule(settings.resolved_steps(models.variant), h * w, shift=models.variant.shift)
    if hasattr(models.flux, "bind_schedule"):  # ControlNets' start/end ranges count steps of this schedule
        models.flux.bind_schedule(timesteps)
    with placement.use(models.flux):
        latents = denoise(models.flux, noise, img_ids, cond, timesteps, settings.resolved_guidance(models.variant),
                          negative, settings.cfg_scale, progress=progress)
    return unpack_latents(latents.float(), h, w)


def latents_to_image(ae: torch.nn.Module, latents: torch.Tensor, placement: Placement, tiled_ae: bool = False):
    """Decode latents (1, 16, H/8, W/8) to a PIL image."""
    from PIL import Image

    with placement.use(ae), torch.no_grad():
        pixels = ae.decode(latents, tiled=tiled_ae)
    array = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array))


def png_text(settings: GenerationSettings, model_name: str) -> dict[str, str]:
    """Generation parameters stored in the PNG: one key per setting plus an A1111-style `parameters` line."""
    fields = {k: "" if v is None else str(v) for k, v in asdict(settings).items()}
    fields.pop("reference_images")
    if settings.reference_images:
        fields["reference_images"] = ";".join(settings.reference_images)  # as `--ri` takes them
    fields["model"] = model_name
    width, height = settings.output_size()  # the size rendered (rounded up to 16), which re-renders the same image
    fields.update(width=str(width), height=str(height))
    if (width, height) != (settings.width, settings.height):
        fields["requested_size"] = f"{settings.width}x{settings.height}"
    summary = (f"Steps: {fields['steps']}, Seed: {settings.seed}, Size: {width}x{height}, "
               f"Guidance: {settings.guidance}, CFG scale: {settings.cfg_scale}, Model: {model_name}")
    if settings.reference_images:
        summary += f", Reference images: {fields['reference_images']}"
    negative = f"\nNegative prompt: {settings.negative_prompt}" if settings.negative_prompt else ""
    fields["parameters"] = f"{settings.prompt}{negative}\n{summary}"
    return fields


def save_png(image, path: str | os.PathLike, text: dict[str, str]) -> Path:
    """Write a PNG with text chunks atomically (temporary file, then rename)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in text.items():
        info.add_itxt(k, v)
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info), suffix=".png")


def unique_path(folder: str | os.PathLike, stem: str, suffix: str = ".png") -> Path:
    folder = Path(folder)
    path, n = folder / f"{stem}{suffix}", 1
    while path.exists():
        path, n = folder / f"{stem}_{n}{suffix}", n + 1
    return path

