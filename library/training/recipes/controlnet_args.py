"""flux_train_control_net.py's own options (torch-free: the entry point's parser comes from here).

    --controlnet_format sd-scripts|diffusers   the layout trained and saved (default: sd-scripts for a new
                                               ControlNet, the file's own layout when continuing from one)
    --controlnet_double_blocks N / --controlnet_single_blocks M   blocks of a new diffusers-layout ControlNet
                                               (diffusers' from_transformer: 4 and 10, capped at the base's)
    --controlnet_num_modes K                   a new Union ControlNet (a mode embedder of K rows)
    --control_mode M                           the Union mode of every item (subsets may set `control_mode`)
    --controlnet_inpainting                    a new alimama-style inpainting ControlNet (68 condition features)
"""

from __future__ import annotations

import argparse

from library.formats.control_modes import control_mode
from library.formats.command_line import non_negative_int, positive_int
from library.training.arguments import add_full_train_arguments, add_network_arguments
from library.training.recipes.checks import full_checks, network_checks

CONTROLNET_FORMATS = ("sd-scripts", "diffusers")


def add_controlnet_train_arguments(parser: argparse.ArgumentParser) -> None:
    add_full_train_arguments(parser)
    add = parser.add_argument_group("ControlNet").add_argument
    add("--controlnet_format", default=None, choices=CONTROLNET_FORMATS,
        help="layout of the ControlNet trained and saved: sd-scripts (XLabs design, pixel hint encoder, repeat "
             "mapping) or diffusers (FluxControlNetModel: AE latents of the control image, interval mapping; saved "
             "with diffusers' keys, which ComfyUI reads, plus a <name>/ folder with config.json for diffusers' "
             "from_pretrained). Default: sd-scripts, or the layout of --controlnet_model_name_or_path")
    add("--controlnet_double_blocks", type=positive_int, default=None,
        help="diffusers layout, new ControlNet: double blocks copied from the transformer (default: 4, capped at "
             "the transformer's)")
    add("--controlnet_single_blocks", type=non_negative_int, default=None,
        help="diffusers layout, new ControlNet: single blocks copied from the transformer (default: 10, capped at "
             "the transformer's)")
    add("--controlnet_num_modes", type=positive_int, default=None,
        help="diffusers layout, new ControlNet: a Union model with this many modes (InstantX: 10)")
    add("--control_mode", type=control_mode, default=None,
        help="Union ControlNets: the mode of every training item (canny, tile, depth, blur, pose, gray, lq or a "
             "number); a dataset subset's `control_mode` overrides it")
    add("--controlnet_inpainting", action="store_true",
        help="diffusers layout, new ControlNet: alimama-style inpainting (68 condition features: the AE latent "
             "of the target with a random area blacked out, and the keep-mask); the subsets need no conditioning "
             "images")


def controlnet_checks(args: argparse.Namespace, get) -> list[str]:
    problems = full_checks(args, get)
    new_only = [f"--{n}" for n in ("controlnet_double_blocks", "controlnet_single_blocks", "controlnet_num_modes")
                if get(n) is not None] + (["--controlnet_inpainting"] if get("controlnet_inpainting") else [])
    if new_only and get("controlnet_format") != "diffusers":
        problems.append(f"{' '.join(new_only)} shape a new diffusers-layout ControlNet: add --controlnet_format "
                        "diffusers")
    elif new_only and get("controlnet_model_name_or_path"):
        problems.append(f"{' '.join(new_only)} shape a new ControlNet, but --controlnet_model_name_or_path continues "
                        "from a file that has its own shape")
    if get("controlnet_inpainting") and (get("cache_latents") or get("cache_latents_to_disk")):
        problems.append("--controlnet_inpainting encodes each target with its masked area blacked out, so the "
                        "targets' pixels are needed: remove --cache_latents / --cache_latents_to_disk")
    if get("controlnet_inpainting") and get("controlnet_num_modes"):
        problems.append("--controlnet_inpainting with --controlnet_num_modes: alimama's inpainting models have no "
                        "modes")
    return problems


def add_lora_arguments(parser: argparse.ArgumentParser) -> None:
    """flux_train_network.py: the network options and those of a frozen ControlNet (--controlnet_model_name_or_path,
    shared with the ControlNet trainer, names it)."""
    add_network_arguments(parser)
    add = parser.add_argument_group("frozen ControlNet (with --controlnet_model_name_or_path)").add_argument
    add("--controlnet_scale", type=float, default=1.0,
        help="multiplier of the frozen ControlNet's residuals while the LoRA trains and in sample images "
             "(default: %(default)s)")
    add("--control_mode", type=control_mode, default=None,
        help="Union ControlNets: the mode of every training item (a subset's custom_attributes.control_mode "
             "overrides it)")


def lora_controlnet_checks(args: argparse.Namespace, get) -> list[str]:
    problems = network_checks(args, get)
    if get("controlnet_model_name_or_path"):
        if get("blocks_to_swap") == "auto":
            problems.append("--blocks_to_swap auto with --controlnet_model_name_or_path: the memory planner does not "
                            "count a ControlNet yet; give a number of blocks")
    elif get("control_mode") is not None or get("controlnet_scale", 1.0) != 1.0:
        problems.append("--control_mode / --controlnet_scale need --controlnet_model_name_or_path (a frozen "
                        "ControlNet)")
    return problems
