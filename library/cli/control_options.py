"""The options of FLUX.1 Canny / Depth (full models and BFL control LoRAs on dev). Torch-free: `--help` stays fast.

    add_control_arguments(parser)     # --control_preprocessor, --depth_model (--control_image is the ControlNet's)
    check_control_arguments(args, variant_control="canny", model="flux1-canny-dev.safetensors (canny)")

`--control_image` is the control picture: used as the map itself (default), or the photo a map is computed from
with `--control_preprocessor canny` (OpenCV Canny 50/200, BFL's) or `depth` (a transformers depth-estimation model
from the local folder `--depth_model`, BFL: Depth-Anything large).
"""

from __future__ import annotations

import argparse

PREPROCESSORS = ("none", "canny", "depth")


def add_control_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("FLUX.1 Canny / Depth (full models, or a BFL control LoRA in --lora_weights)")
    group.add_argument("--control_preprocessor", default="none", choices=PREPROCESSORS,
                       help="what --control_image is: none (default) = already the control map; canny = a photo "
                            "whose OpenCV Canny edges (thresholds 50/200) are the map; depth = a photo whose "
                            "estimated depth (--depth_model) is the map")
    group.add_argument("--depth_model", default=None, metavar="FOLDER",
                       help="with --control_preprocessor depth: a local transformers depth-estimation model folder "
                            "(config.json, model.safetensors, preprocessor_config.json; BFL uses "
                            "LiheYoung/depth-anything-large-hf); nothing is downloaded")
    return group


def check_control_arguments(args, variant_control: str | None, model: str) -> None:
    """One-line ValueError for control options that do not fit the model or each other (`--control_image` is a
    list: the ControlNet options append)."""
    images = list(args.control_image or [])
    if variant_control is None:  # a --control_image without --controlnet is refused by the ControlNet rule
        if args.control_preprocessor != "none" or args.depth_model:
            raise ValueError(f"--control_preprocessor/--depth_model: {model} takes no control map; give a FLUX.1 "
                             "Canny/Depth model or a BFL control LoRA in --lora_weights")
        return
    if args.controlnet:
        raise ValueError(f"--controlnet with {model}: its --control_image feeds the model itself; ControlNets on "
                         "Canny/Depth models are not supported")
    if len(images) != 1:
        raise ValueError(f"{model} needs one --control_image (the {variant_control} map, or a photo with "
                         f"--control_preprocessor {variant_control}), got {len(images)}")
    if args.control_preprocessor == "depth" and not args.depth_model:
        raise ValueError("--control_preprocessor depth needs --depth_model FOLDER (a local transformers "
                         "depth-estimation model)")
    if args.depth_model and args.control_preprocessor != "depth":
        raise ValueError("--depth_model is only used with --control_preprocessor depth")
