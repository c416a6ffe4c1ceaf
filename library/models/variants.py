"""The models of the FLUX.1 family this suite runs, and each one's defaults: one table read by inference, sample
images and training, and the rule that names a loaded file's variant.

Keys cannot tell dev, Krea and Kontext apart (same names and shapes), nor Canny from Depth (img_in takes 128
features; canny is taken, with a log line, when nothing names the model), so a file's variant comes from
`--model_type`, else from its ModelSpec metadata (`modelspec.architecture`), else from its keys (guidance
embedder present: dev; absent: schnell). A `--model_type` that the keys contradict is refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)

AUTO = "flux"  # sd-scripts' --model_type default: a FLUX.1 transformer, dev or schnell told by its keys


@dataclass(frozen=True)
class ModelVariant:
    name: str  # the --model_type value
    architecture: str  # ModelSpec architecture written into saved files ("/lora" appended for LoRAs)
    family: str  # "flux": the BFL transformer; "chroma": Chroma's modulation-approximator transformer
    steps: int  # inference steps when none are given
    preview_steps: int  # steps of training sample images whose prompt gives none (sd-scripts: 20)
    guidance: float | None  # embedded guidance at inference; None: the model has no guidance input
    cfg_scale: float  # true classifier-free guidance with a negative prompt (1.0: off)
    shift: bool  # the resolution-dependent time shift of the sampling schedule
    t5_max_length: int  # T5-XXL tokens when --t5xxl_max_token_length is not given
    training_guidance: float | None  # --guidance_scale default in training; None: no guidance input to feed
    reference_images: bool = False  # takes reference images (Kontext)
    control: str | None = None  # structural control map it takes (Canny/Depth: "canny", "depth"; --control_image)
    inpaint: bool = False  # repaints a picture: --image, --mask_image, --outpaint (library/cli/inpaint_options.py)
    t5_attn_mask: bool = False  # T5 padding always masked, as the model was trained (--apply_t5_attn_mask implied)
    in_channels: int = 64  # img_in's input features: 64 noisy features + the condition's (Fill 384, Canny/Depth 128,
    # Flex.2 196)
    licence: str = "FLUX.1 [dev] Non-Commercial License"
    notes: str = ""

    @property
    def has_guidance_input(self) -> bool:
        return self.guidance is not None

    def modelspec_architecture(self, lora: bool) -> str:
        return f"{self.architecture}/lora" if lora else self.architecture


VARIANTS: dict[str, ModelVariant] = {v.name: v for v in (
    ModelVariant("dev", "flux-1-dev", "flux", steps=50, preview_steps=20, guidance=3.5, cfg_scale=1.0, shift=True,
                 t5_max_length=512, training_guidance=3.5,
                 notes="sd-scripts' defaults; its docs recommend --guidance_scale 1.0 for training"),
    ModelVariant("krea", "flux-1-krea-dev", "flux", steps=50, preview_steps=20, guidance=4.5, cfg_scale=1.0,
                 shift=True, t5_max_length=512, training_guidance=3.5,
                 notes="dev's architecture and keys; a drop-in replacement for dev with a higher usual guidance"),
    ModelVariant("schnell", "flux-1-schnell", "flux", steps=4, preview_steps=4, guidance=None, cfg_scale=1.0,
                 shift=False, t5_max_length=256, training_guidance=None, licence="Apache-2.0",
                 notes="timestep-distilled: 1-4 steps, no shift, no guidance input"),
    ModelVariant("kontext", "flux-1-kontext-dev", "flux", steps=30, preview_steps=20, guidance=2.5, cfg_scale=1.0,
                 shift=True, t5_max_length=512, training_guidance=1.0, reference_images=True,
                 notes="instruction editing: reference images appended as tokens with index 1"),
    ModelVariant("canny", "flux-1-canny-dev", "flux", steps=50, preview_steps=20, guidance=30.0, cfg_scale=1.0,
                 shift=True, t5_max_length=512, training_guidance=30.0, control="canny", in_channels=128,
                 notes="structural control: img_in takes 64 noisy + 64 control-latent features (Canny edges)"),
    ModelVariant("depth", "flux-1-depth-dev", "flux", steps=50, preview_steps=20, guidance=10.0, cfg_scale=1.0,
                 shift=True, t5_max_length=512, training_guidance=10.0, control="depth", in_channels=128,
                 notes="structural control: img_in takes 64 noisy + 64 control-latent features (depth map)"),
    ModelVariant("fill", "flux-1-fill-dev", "flux", steps=50, preview_steps=20, guidance=30.0, cfg_scale=1.0,
                 shift=True, t5_max_length=512, training_guidance=30.0, inpaint=True, in_channels=384,
                 notes="inpainting/outpainting: img_in takes 64 noisy + 64 masked-image + 256 mask features"),
    # ostris' Flex.2-preview: 8 double + 38 single blocks (depths are read from the file), img_in taking 196 features
    # (library/models/flex2.py). Inference defaults: the model card's 50 steps and guidance 3.5; training bypasses
    # the guidance embedder (ai-toolkit's bypass_guidance_embedding), so no training guidance is fed.
    ModelVariant("flex2", "flex-2-preview", "flux", steps=50, preview_steps=20, guidance=3.5, cfg_scale=1.0,
                 shift=True, t5_max_length=512, training_guidance=None, inpaint=True, in_channels=196,
                 licence="Apache-2.0",
                 notes="inpainting and control built in: inpaint latent, mask and control latent as input channels"),
    # Chroma: steps 35, true-CFG scale 5.0 and T5 length 512 are the defaults of diffusers' ChromaPipeline.__call__
    # (num_inference_steps, guidance_scale, max_sequence_length); its schedule is shifted by image size (the
    # pipeline's calculate_shift mu; sd-scripts' sampler shifts for Chroma too). Preview steps 20: sd-scripts' sample
    # default, the same for every model. Guidance 0.0: the value the approximator embeds -- diffusers always feeds
    # 0, and sd-scripts' docs recommend --guidance_scale 0.0 for training Chroma.
    ModelVariant("chroma", "chroma", "chroma", steps=35, preview_steps=20, guidance=0.0, cfg_scale=5.0, shift=True,
                 t5_max_length=512, training_guidance=0.0, t5_attn_mask=True, licence="Apache-2.0",
                 notes="lodestones' Chroma: T5 only (no CLIP-L), modulation from the approximator, T5 mask required"),
)}

# keys that fit several rows of different models (not merely tuned copies): the first row is taken, and said so
_KEY_DEFAULT_NOTES = {"canny": "img_in takes 128 features: FLUX.1 Canny or Depth, which keys cannot tell apart; "
                               "taking canny (give --model_type depth, or a file whose modelspec.architecture is "
                               "flux-1-depth-dev, for Depth)"}

# ModelSpec architectures written by other tools for the same variants (lower case, without "/lora")
_ARCHITECTURE_ALIASES = {"flux-1-kontext": "kontext", "flux.1-kontext-dev": "kontext", "flux-1-krea": "krea",
                         "flux-1-dev-krea": "krea", "flux-1-canny": "canny", "flux.1-canny-dev": "canny",
                         "flux-1-depth": "depth", "flux.1-depth-dev": "depth", "flex-2": "flex2",
                         "flex.2-preview": "flex2"}


def variant_from_metadata(metadata: dict[str, str]) -> ModelVariant | None:
    """The variant a file's ModelSpec architecture names, or None when it names none we know."""
    arch = (metadata.get("modelspec.architecture") or "").strip().lower().removesuffix("/lora")
    if not arch:
        return None
    for variant in VARIANTS.values():
        if arch == variant.architecture:
            return variant
    name = _ARCHITECTURE_ALIASES.get(arch)
    return VARIANTS[name] if name else None


def _fits(variant: ModelVariant, family: str, has_guidance_input: bool, in_channels: int) -> bool:
    return (variant.family, variant.has_guidance_input, variant.in_channels) == (family, has_guidance_input,
                                                                                 in_channels)


def resolve_variant(model_type: str | None, *, has_guidance_input: bool, family: str = "flux", in_channels: int = 64,
                    metadata: dict[str, str] | None = None, source: str = "the transformer") -> ModelVariant:
    """The variant of a loaded transformer: `model_type` (--model_type; None or "flux" = recognise it), checked
    against what the keys show (`has_guidance_input`, `family`, `in_channels`); raises ValueError naming both on a
    mismatch. Recognised: the ModelSpec metadata's variant when the keys fit it, else the first variant of the table
    that the keys fit (dev before Krea and Kontext, which have dev's keys)."""
    if model_type in (None, AUTO):
        named = variant_from_metadata(metadata or {})
        if named is not None and _fits(named, family, has_guidance_input, in_channels):
            return named
        for variant in VARIANTS.values():
            if _fits(variant, family, has_guidance_input, in_channels):
                if variant.name in _KEY_DEFAULT_NOTES:
                    logger.info(f"{source}: {_KEY_DEFAULT_NOTES[variant.name]}")
                return variant
        raise ValueError(f"{source}: no known model has these keys ({family} family, "
                         f"{'with' if has_guidance_input else 'without'} a guidance embedder, img_in taking "
                         f"{in_channels} features)")
    if model_type not in VARIANTS:
        raise ValueError(f"--model_type {model_type}: unknown; choose one of {', '.join([AUTO, *VARIANTS])}")
    variant = VARIANTS[model_type]
    if variant.family != family:
        raise ValueError(f"--model_type {model_type} expects a {variant.family} transformer, but {source} has "
                         f"{family} keys; use --model_type {family if family in VARIANTS else AUTO}")
    if variant.has_guidance_input != has_guidance_input:
        keys_say = "a guidance embedder (guidance_in.*)" if has_guidance_input else "no guidance embedder (schnell)"
        raise ValueError(f"--model_type {model_type} does not fit {source}: it has {keys_say}; "
                         f"use --model_type {'dev' if has_guidance_input else 'schnell'} or the right file")
    if variant.in_channels != in_channels:
        raise ValueError(f"--model_type {model_type} does not fit {source}: its img_in takes {in_channels} features "
                         f"per token, {model_type} takes {variant.in_channels}")
    return variant


def model_type_choices() -> list[str]:
    return [AUTO, *VARIANTS]
