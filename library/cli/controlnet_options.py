"""ControlNet options of flux_minimal_inference.py (torch-free: `--help` stays fast) and the rule pairing them.

    --controlnet A --control_image a.png --controlnet B --control_image b.png --controlnet_scale 0.6
    --controlnet union --control_image canny.png --control_mode canny --control_image depth.png --control_mode depth

Each `--control_image` is one ControlNet pass (a unit). `--controlnet` is given once (every unit uses it: one
Union model with several modes, each with its own image) or once per unit, in order. `--controlnet_scale`,
`--controlnet_start`, `--controlnet_end` and `--control_mode` take one value (for every unit) or one per unit.
An inpainting ControlNet (alimama's, 68 condition features) takes `--image` and `--mask_image` (the shared inpaint
options, library/cli/inpaint_options.py); alone, it needs no `--control_image` (the picture is `--image`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from library.formats.control_modes import UNION_MODE_NAMES, control_mode

def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction of the steps between 0 and 1, got {text!r}")
    return value


fraction.__name__ = "fraction"


def add_controlnet_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    g = parser.add_argument_group("ControlNets (sd-scripts layout, or diffusers layout: InstantX Union, alimama "
                                  "inpainting, jasperai)")
    g.add_argument("--controlnet", action="append", default=[], metavar="PATH",
                   help="ControlNet: an sd-scripts file (flux_train_control_net.py, sd-scripts) or a diffusers-layout "
                        "file or folder (config.json + diffusion_pytorch_model.safetensors); once for every "
                        "--control_image, or once per --control_image in order")
    g.add_argument("--control_image", action="append", default=[], metavar="IMG",
                   help="conditioning image, one per ControlNet pass; scaled to cover the output size and "
                        "centre-cropped (diffusers-layout ControlNets take its AE latents). Without --controlnet: "
                        "the control picture of FLUX.1 Canny/Depth (see --control_preprocessor)")
    g.add_argument("--controlnet_scale", action="append", type=float, default=[], metavar="S",
                   help="multiplier of the residuals: one for all or one per --control_image (default 1; jasperai's "
                        "card: 0.6, alimama: 0.9-0.95, Union: 0.3-0.8)")
    g.add_argument("--controlnet_start", action="append", type=fraction, default=[], metavar="F",
                   help="first step fraction where a ControlNet acts (diffusers' rule: step i of N acts iff "
                        "i/N >= start and (i+1)/N <= end); one for all or one per --control_image (default 0)")
    g.add_argument("--controlnet_end", action="append", type=fraction, default=[], metavar="F",
                   help="last step fraction (see --controlnet_start; default 1)")
    g.add_argument("--control_mode", action="append", type=control_mode, default=[], metavar="M",
                   help=f"Union models: the mode of each --control_image ({', '.join(UNION_MODE_NAMES)}, a number, or "
                        "none for a pass of a ControlNet that is not a Union model)")
    return g


@dataclass(frozen=True)
class ControlSpec:
    controlnet: str
    image: str
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: int | None = None


def _per_unit(values: list, name: str, units: int, default):
    if not values:
        return [default] * units
    if len(values) == 1:
        return values * units
    if len(values) != units:
        raise ValueError(f"--{name}: give one value for all or one per --control_image ({units}), got {len(values)}")
    return list(values)


def control_specs(args) -> list[ControlSpec]:
    """The ControlNet passes asked for, in order; ValueError (one line) for options that do not pair up."""
    nets, images = list(args.controlnet), list(args.control_image)
    if not nets:
        extra = [f"--{n}" for n in ("control_image", "controlnet_scale", "controlnet_start", "controlnet_end",
                                    "control_mode") if getattr(args, n)]
        if extra:
            raise ValueError(f"{' '.join(extra)} need --controlnet")
        return []
    if not images and len(nets) == 1 and getattr(args, "image", None):
        images = [args.image]  # an inpainting ControlNet alone: its picture is --image
    if not images:
        raise ValueError("--controlnet needs --control_image (one per ControlNet pass)")
    if len(nets) not in (1, len(images)):
        raise ValueError(f"{len(nets)} --controlnet for {len(images)} --control_image: give one ControlNet for all "
                         "images (a Union model) or one per image")
    n = len(images)
    nets = nets * n if len(nets) == 1 else nets
    scales = _per_unit(args.controlnet_scale, "controlnet_scale", n, 1.0)
    starts = _per_unit(args.controlnet_start, "controlnet_start", n, 0.0)
    ends = _per_unit(args.controlnet_end, "controlnet_end", n, 1.0)
    modes = _per_unit(args.control_mode, "control_mode", n, None)
    specs = [ControlSpec(*fields) for fields in zip(nets, images, scales, starts, ends, modes)]
    for i, s in enumerate(specs):
        if s.start >= s.end:
            raise ValueError(f"ControlNet pass {i + 1} ({s.controlnet}): --controlnet_start {s.start} must be below "
                             f"--controlnet_end {s.end}")
    return specs
