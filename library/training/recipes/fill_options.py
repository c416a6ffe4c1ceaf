"""FLUX.1 Fill training options (flux_train_network.py and flux_train.py). Torch-free: --help stays fast.

    --fill_masks rectangles|strokes|mixed     masks drawn per sample and step for images without a mask file
    --fill_kept_loss_weight W                 loss weight of the kept area (mask 0); 1 (default): every token alike
"""

from __future__ import annotations

import argparse

from library.formats.command_line import non_negative_float

MASK_GENERATORS = ("rectangles", "strokes", "mixed")  # library/data/fill_masks.py draws them


def add_fill_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("FLUX.1 Fill (inpainting) training")
    group.add_argument("--fill_masks", default=None, choices=MASK_GENERATORS,
                       help="FLUX.1 Fill: draw a mask per image and step (seeded by --seed, the step and the image's "
                            "path: a resumed run draws the same) for images whose subset has no 'fill_mask_dir': "
                            "rectangles, brush strokes, or mixed (either, and 1 in 10 fully masked)")
    group.add_argument("--fill_kept_loss_weight", type=non_negative_float, default=1.0,
                       help="FLUX.1 Fill: loss weight of the area the mask keeps (0 in the mask); the generated area "
                            "weighs 1. Default 1: the loss covers every token alike (DiffSynth); 0: only the "
                            "generated area (averaged over all tokens, as --masked_loss: a smaller loss)")


def fill_options_given(args) -> list[str]:
    """The Fill options set away from their defaults, as `--name`."""
    given = []
    if getattr(args, "fill_masks", None) is not None:
        given.append("--fill_masks")
    if getattr(args, "fill_kept_loss_weight", 1.0) != 1.0:
        given.append("--fill_kept_loss_weight")
    return given
