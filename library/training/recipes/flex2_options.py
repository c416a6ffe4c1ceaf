"""Flex.2 training options of flux_train_network.py and flux_train.py (torch-free, for a fast `--help`).

Names and recommended values are ai-toolkit's (`model_kwargs` of config/examples/train_lora_flex2_24gb.yaml); they
only act when the transformer is ostris' Flex.2 (img_in taking 196 features, library/training/recipes/flex2.py).
"""

from __future__ import annotations

import argparse

from library.formats.command_line import fraction

OPTIONS = ("inpaint_dropout", "control_dropout", "invert_inpaint_mask_chance")
DEFAULTS = {"inpaint_dropout": 0.5, "control_dropout": 0.5, "invert_inpaint_mask_chance": 0.5}


def add_flex2_training_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument_group("Flex.2 (ostris Flex.2-preview: inpainting and control channels)").add_argument
    add("--inpaint_dropout", type=fraction, default=None,
        help="share of samples trained without inpainting (zero inpaint latent, all-ones mask: plain generation); "
             "the others get a random mask drawn per step (default: 0.5, ai-toolkit's recommended value)")
    add("--control_dropout", type=fraction, default=None,
        help="share of samples with a control picture (ControlNet-style subsets, 'conditioning_data_dir') trained "
             "without it (zero control latent), so the model keeps working without controls (default: 0.5)")
    add("--invert_inpaint_mask_chance", type=fraction, default=None,
        help="share of random masks inverted (the area to generate becomes the rest: outpainting) (default: 0.5)")
    add("--random_blur_mask", action="store_true",
        help="blur half of the random masks (Gaussian, kernel 3 to 9 latent cells) so soft mask edges are learnt "
             "(ai-toolkit's random_blur_mask; its Flex.2 example turns it on)")
    add("--random_dilate_mask", action="store_true",
        help="grow or shrink each mask channel by up to 5%% of the latent side after the latent is zeroed, so the "
             "two do not match exactly and edges blend (ai-toolkit's random_dialate_mask; on in its example)")


def flex2_settings(args) -> dict:
    """The three chances (the defaults where not given) and the two mask augmentations."""
    chances = {name: (DEFAULTS[name] if getattr(args, name, None) is None else float(getattr(args, name)))
               for name in OPTIONS}
    return {**chances, "blur": bool(getattr(args, "random_blur_mask", False)),
            "dilate": bool(getattr(args, "random_dilate_mask", False))}


def given_flex2_training_options(args) -> list[str]:
    return [f"--{name}" for name in OPTIONS if getattr(args, name, None) is not None]
