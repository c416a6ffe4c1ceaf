"""Each recipe's command line as data (`TrainerCommandLine`): its argument group, checks, dataset kinds and the
options it ignores or refuses. Cheap to import (no torch), so the entry points build their parser from it and
`--help` stays fast; the recipe classes refer to the same objects."""

from __future__ import annotations

from library.training.arguments import TrainerCommandLine, add_full_train_arguments
from library.training.recipes.checks import full_checks
from library.training.recipes.controlnet_args import (add_controlnet_train_arguments, add_lora_arguments,
                                                      controlnet_checks, lora_controlnet_checks)
from library.training.recipes.flex2_options import add_flex2_training_arguments

_FLEX2_TYPES = (*TrainerCommandLine.model_types, "flex2")  # LoRA and full fine-tuning also train Flex.2


def _lora_arguments(parser) -> None:
    add_lora_arguments(parser)
    add_flex2_training_arguments(parser)  # Flex.2's inpaint/control chances (LoRA and full fine-tuning)


def _full_train_arguments(parser) -> None:
    add_full_train_arguments(parser)
    add_flex2_training_arguments(parser)


_FULL_MODEL = {  # options that do nothing when the whole model (or a ControlNet) is trained and saved
    "weighted_captions": "FLUX captions are not weighted; the text is used as written",
    "fp8_base": "the trained model is not stored in fp8",
    "save_model_as": "the model is always saved as .safetensors",
    "use_safetensors": "the model is always saved as .safetensors",
    "fused_optimizer_groups": "it has no effect in sd-scripts either; see --blockwise_fused_optimizers",
}
_QUANTIZED = {"base_quantization": "is for a frozen transformer (LoRA training, flux_train_network.py); remove it",
              "assistant_lora": "is for LoRA training (flux_train_network.py): here the trained weights would learn "
                                "around the assistant and need it forever, or bake it in if merged; remove it"}
_CONTROLNET_ONLY = {"controlnet_model_name_or_path": "only flux_train_control_net.py uses it"}

LORA = TrainerCommandLine(
    script="flux_train_network.py", training="LoRA training", add_arguments=_lora_arguments,
    checks=lora_controlnet_checks, fp8_base=True, model_types=_FLEX2_TYPES,
    ineffective={"fused_backward_pass": "only flux_train.py and flux_train_control_net.py use it"},
    refused={"weighted_captions": "is not supported for FLUX: its tokenizers have no (word:weight) syntax; remove "
                                  "the option"})

FULL = TrainerCommandLine(
    script="flux_train.py", training="full fine-tuning", add_arguments=_full_train_arguments,
    checks=full_checks, refused=_QUANTIZED, model_types=_FLEX2_TYPES,
    ineffective={**_FULL_MODEL, **_CONTROLNET_ONLY})

CONTROLNET = TrainerCommandLine(
    script="flux_train_control_net.py", training="ControlNet training", add_arguments=add_controlnet_train_arguments,
    checks=controlnet_checks, refused=_QUANTIZED,
    dataset_kinds=dict(support_dreambooth=False, support_controlnet=True),
    model_types=("flux", "dev", "krea", "schnell"),  # a ControlNet on Kontext is not built yet
    ineffective={**_FULL_MODEL, "fp8_scaled": "a ControlNet is saved in --save_precision (only flux_train.py "
                                              "writes scaled fp8)"})

ALL = (LORA, FULL, CONTROLNET)
