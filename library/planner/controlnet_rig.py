"""The memory planner's ControlNet training step (flux_train_control_net.py): the ControlNet the trainer would
build, trained beside the frozen transformer through `ControlledFlux`, with its condition as an input of the batch.

The shape comes from the command line as the recipe decides it (`--controlnet_model_name_or_path`'s header, else
`--controlnet_format` and the block options). diffusers-layout ControlNets read AE latents of the conditioning
images, cached with the target latents under --cache_latents (the AE then leaves the device); alimama-style
inpainting ones (68 condition features) read the masked targets, encoded each step, so the AE stays on the device:
its weights are counted (plan.py `_encoder_bytes`); the encode itself runs without gradients before the forward and
is not counted.
"""

from __future__ import annotations

import torch

from library.models.controlled import ControlledFlux
from library.models.controlnet import CONTROLNET_DEPTH, ControlNetFlux, controlnet_params
from library.models.controlnet_files import controlnet_layout
from library.models.diffusers_controlnet import (DiffusersControlNet, DiffusersControlNetShape,
                                                 diffusers_controlnet_shape)
from library.models.transformer import FluxParams

# (layout, double blocks, single blocks, Union modes, condition features)
ControlNetPlan = tuple
DEFAULT_PLAN = ("sd-scripts", CONTROLNET_DEPTH, 0, 0, 0)


def controlnet_plan(args, params: FluxParams) -> ControlNetPlan:
    """The ControlNet a ControlNet-training command line trains, as the recipe builds it."""
    path = getattr(args, "controlnet_model_name_or_path", None)
    if path:
        if controlnet_layout(path) == "diffusers":
            s = diffusers_controlnet_shape(path, params)
            return "diffusers", s.depth, s.single_depth, s.num_mode or 0, s.condition_channels
        _, depth, single = controlnet_params(path, params)
        return "sd-scripts", depth, single, 0, 0
    if getattr(args, "controlnet_format", None) == "diffusers":
        single = getattr(args, "controlnet_single_blocks", None)
        return ("diffusers", getattr(args, "controlnet_double_blocks", None) or min(4, params.depth),
                min(10, params.depth_single_blocks) if single is None else single,
                getattr(args, "controlnet_num_modes", None) or 0,
                68 if getattr(args, "controlnet_inpainting", False) else 64)
    return DEFAULT_PLAN


def build_controlnet(plan: ControlNetPlan, params: FluxParams, dtype: torch.dtype, device: str) -> torch.nn.Module:
    layout, depth, single, modes, channels = plan
    with torch.device(device):
        if layout == "diffusers":
            shape = DiffusersControlNetShape(depth, single, num_mode=modes or None, condition_channels=channels,
                                             guidance_embed=params.guidance_embed)
            cn = DiffusersControlNet(params, shape)
        else:
            cn = ControlNetFlux(params, depth, single)
    return cn.to(dtype)


def controlled(flux, controlnet, plan: ControlNetPlan, batch_size: int, width: int, height: int, device: str):
    """(the denoiser, its model_inputs(batch) function, the condition tensors the batch carries)."""
    layout, _, _, modes, channels = plan
    gen = dict(device=device, dtype=torch.float32)
    if layout == "diffusers":
        cond = torch.randn(batch_size, (height // 16) * (width // 16), channels, **gen)
    else:
        cond = torch.rand(batch_size, 3, height, width, **gen) * 2 - 1
    inputs = {"controlnet_cond": cond}
    if modes:
        inputs["controlnet_mode"] = torch.zeros(batch_size, dtype=torch.long, device=device)
    return ControlledFlux(flux, controlnet), (lambda batch: inputs), list(inputs.values())
