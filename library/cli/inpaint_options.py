"""The inpainting/outpainting options shared by the models that repaint part of a picture (FLUX.1 Fill; the alimama
inpainting ControlNet and Flex.2 reuse the same names). Torch-free: `--help` stays fast.

    add_inpaint_arguments(parser)          # --image, --mask_image, --outpaint L,T,R,B
    check_inpaint_arguments(args, "FLUX.1-dev", uses_them=False)   # one-line error when the model ignores them

Conventions (BFL's FLUX.1 Fill): in the mask, white (1) is the area to generate and black (0) the area to keep;
grey values are kept as floats (not binarised). `--outpaint L,T,R,B` adds that many pixels of canvas on the left,
top, right and bottom of `--image`; the added canvas is masked 1 (generated).
"""

from __future__ import annotations

import argparse

OPTIONS = ("image", "mask_image", "outpaint")


def outpaint_margins(text: str) -> tuple[int, int, int, int]:
    """`L,T,R,B` -> four non-negative pixel counts (left, top, right, bottom)."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be four integers L,T,R,B (pixels added on each side), got {text!r}") \
            from None
    if len(values) != 4 or min(values) < 0:
        raise argparse.ArgumentTypeError(f"must be four integers L,T,R,B of 0 or more (pixels added on the left, "
                                         f"top, right and bottom), got {text!r}")
    return values


outpaint_margins.__name__ = "L,T,R,B"


def add_inpaint_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add --image, --mask_image and --outpaint (an argument group "inpainting / outpainting")."""
    group = parser.add_argument_group("inpainting / outpainting (FLUX.1 Fill)")
    group.add_argument("--image", default=None, metavar="IMG",
                       help="the picture to inpaint or outpaint; the output has its size (after --outpaint), floored "
                            "to multiples of 16")
    group.add_argument("--mask_image", default=None, metavar="MASK",
                       help="mask of --image's size (resized to it otherwise): white/1 = area to generate, black/0 = "
                            "keep; grey values are kept as fractions (as BFL); default with --image: nothing masked "
                            "except the --outpaint canvas")
    group.add_argument("--outpaint", type=outpaint_margins, default=None, metavar="L,T,R,B",
                       help="pixels of canvas added on the left, top, right and bottom of --image, masked 1 "
                            "(generated), e.g. 0,0,256,0 widens the picture to the right")
    return group


def given_inpaint_options(args) -> list[str]:
    """The inpaint options given on the command line, as `--name`."""
    return [f"--{name}" for name in OPTIONS if getattr(args, name, None) is not None]


def check_inpaint_arguments(args, model: str, uses_them: bool) -> None:
    """Raise ValueError (one line) when inpaint options are given to a model that does not use them, or when
    --mask_image/--outpaint come without --image."""
    given = given_inpaint_options(args)
    if given and not uses_them:
        raise ValueError(f"{' '.join(given)}: {model} does not inpaint; give a FLUX.1 Fill model (--model_type fill, "
                         f"img_in taking 384 features)")
    if uses_them and getattr(args, "image", None) is None and (args.mask_image is not None or
                                                               args.outpaint is not None):
        raise ValueError("--mask_image and --outpaint need --image (the picture to inpaint or outpaint)")
