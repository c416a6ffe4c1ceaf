"""ostris Flex.2's inference options (flux_minimal_inference.py), torch-free so `--help` stays fast.

    add_flex2_arguments(parser)        # --control_strength, --control_stop, --bypass_guidance_embedding
    check_flex2_arguments(args, variant_name, is_flex2)   # one-line errors

Flex.2 also reads the shared `--control_image` (its control map: depth, line, pose ...) and the inpainting options of
library/cli/inpaint_options.py (`--image`, `--mask_image` with white = generate, `--outpaint L,T,R,B`).
"""

from __future__ import annotations

import argparse

# DiffSynth's FluxImagePipeline defaults (flex_control_strength=0.5, flex_control_stop=0.5); ai-toolkit's Flex2Pipeline
# has no such options (full strength, every step) -- library/models/flex2.py holds the same numbers
DEFAULT_CONTROL_STRENGTH = 0.5
DEFAULT_CONTROL_STOP = 0.5
OPTIONS = ("control_strength", "control_stop", "bypass_guidance_embedding")


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be from 0 to 1 (a fraction of the steps), got {text}")
    return value


fraction.__name__ = "fraction from 0 to 1"


def add_flex2_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("Flex.2 (ostris Flex.2-preview: --control_image, --image/--mask_image)")
    group.add_argument("--control_strength", type=float, default=None, metavar="S",
                       help=f"multiplier of the --control_image latent (default: {DEFAULT_CONTROL_STRENGTH}, "
                            "DiffSynth's; 1 = as trained by ai-toolkit)")
    group.add_argument("--control_stop", type=fraction, default=None, metavar="F",
                       help=f"fraction of the steps that see the control image; the later steps get none (default: "
                            f"{DEFAULT_CONTROL_STOP}; 1 = every step). With N steps, steps 0 .. int(F * (N - 1)) "
                            "see it (DiffSynth's rule)")
    group.add_argument("--bypass_guidance_embedding", action="store_true",
                       help="leave the guidance embedder out of the conditioning vector, as Flex.2 is trained "
                            "(ai-toolkit's option name); --guidance is then unused. Default: the embedder is used "
                            "with --guidance (the model card's 3.5)")
    return group


def given_flex2_options(args) -> list[str]:
    return [f"--{name}" for name in OPTIONS if getattr(args, name, None) not in (None, False)]


def check_flex2_arguments(args, model: str, is_flex2: bool, reads_control_image: bool | None = None) -> None:
    """Raise ValueError (one line) for Flex.2 options given to another model, or a control image without a model
    that reads it (`reads_control_image`: the model takes --control_image itself; default: it is Flex.2)."""
    reads_control_image = is_flex2 if reads_control_image is None else reads_control_image
    given = given_flex2_options(args)
    if given and not is_flex2:
        raise ValueError(f"{' '.join(given)}: {model} is not Flex.2; give ostris' Flex.2-preview (img_in taking 196 "
                         f"features, --model_type flex2)")
    sizes = [f"--{k}" for k in ("width", "height") if getattr(args, k, None) is not None]
    if is_flex2 and getattr(args, "image", None) and sizes:
        raise ValueError(f"{' and '.join(sizes)}: Flex.2 inpaints at --image's size (after --outpaint, floored to "
                         f"multiples of 16); resize the picture instead")
    if is_flex2 and getattr(args, "controlnet", None):
        raise ValueError("--controlnet with Flex.2 is not supported: Flex.2 reads --control_image itself (its "
                         "control latent channels)")
    controls = getattr(args, "control_image", None) or []
    if is_flex2 and not isinstance(controls, str) and len(controls) > 1:
        raise ValueError(f"{len(controls)} --control_image: Flex.2 takes one control picture (its control channels "
                         f"hold one latent)")
    unit_options = [f"--{n}" for n in ("controlnet_scale", "controlnet_start", "controlnet_end", "control_mode")
                    if getattr(args, n, None)]
    if is_flex2 and unit_options:
        raise ValueError(f"{' '.join(unit_options)}: ControlNet options; Flex.2's control takes --control_strength "
                         f"and --control_stop")
    if getattr(args, "control_image", None) and not reads_control_image and not getattr(args, "controlnet", None):
        raise ValueError(f"--control_image needs --controlnet or a model that reads control images itself (Flex.2); "
                         f"{model} does not")
