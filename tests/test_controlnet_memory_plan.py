"""The memory planner for ControlNet training (library/planner/controlnet_rig.py): sd-scripts' and diffusers-layout
ControlNets trained beside the frozen transformer, predicted on `meta` and checked against the same step on the CPU;
the ControlNet's shape read from the command line as the recipe builds it; --blocks_to_swap auto for the trainer."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from library.models.transformer import FLUX_PRESETS
from library.planner.controlnet_rig import controlnet_plan
from library.planner.plan import GIB, PlanSettings, choose_blocks_to_swap, plan_memory
from library.planner.report import measure_cpu_step

TINY = FLUX_PRESETS["tiny"]
TINY_DEEP = replace(TINY, depth=4, depth_single_blocks=4)
# FLUX.1's structure at a small width (as tests/test_memory_plan.py): at the tiny width the CPU's convolution
# workspaces of sd-scripts' hint encoder (which meta tensors do not have) are 13% of the whole step; here they vanish
SMALL = replace(FLUX_PRESETS["dev"], vec_in_dim=256, context_in_dim=256, hidden_size=512, num_heads=4, depth=2,
                depth_single_blocks=4)


def cpu_settings(**kw):
    # the AE's weights (kept on the device by inpainting ControlNets) are not part of the CPU step measured
    return PlanSettings(trainer="controlnet", model="test", params=SMALL, width=128, height=128, t5_tokens=64,
                        mixed_precision="no", target="cpu", optimizer_type="AdamW", ae_params=0, **kw)


@pytest.mark.parametrize("kw", [{}, {"controlnet": ("diffusers", 2, 2, 4, 64)},
                                {"controlnet": ("diffusers", 2, 0, 0, 68), "gradient_checkpointing": False}],
                         ids=["sd-scripts", "diffusers-union", "diffusers-inpainting-no-checkpointing"])
def test_prediction_matches_a_real_cpu_step(kw):
    s = cpu_settings(**kw)
    plan = plan_memory(s)
    measured = measure_cpu_step(s)
    assert plan.peak_bytes == pytest.approx(measured["peak_bytes"], rel=0.10)
    static = sum(plan.parts[k] for k in ("resident_base_weights", "swap_buffers", "trainable_weights",
                                         "optimizer_states", "batch_inputs"))
    assert static == pytest.approx(measured["before_step_bytes"], rel=0.01)
    # the ControlNet is what trains: its float32 weights and two AdamW states
    assert plan.parts["optimizer_states"] == pytest.approx(2 * plan.parts["trainable_weights"], rel=0.01)
    assert plan.parts["text_encoders_and_ae"] == 0
    # with cached latents (their control latents too) only inpainting ControlNets keep the AE on the device (their
    # masked targets are encoded every step); without, every ControlNet run keeps it
    ae = plan_memory(replace(s, ae_params=83_819_683)).parts["text_encoders_and_ae"]
    assert ae == (83_819_683 * 4 if s.controlnet[:1] == ("diffusers",) and s.controlnet[4] == 68 else 0)
    live = plan_memory(replace(s, ae_params=83_819_683, cache_latents=False)).parts["text_encoders_and_ae"]
    assert live == 83_819_683 * 4


def test_the_plan_follows_the_command_line(tmp_path):
    from argparse import Namespace

    from library.formats.safetensors_io import save_file_atomic
    from library.models.diffusers_controlnet import (DiffusersControlNetShape, diffusers_controlnet_from_transformer,
                                                     diffusers_state_dict)
    from library.models.transformer import Flux

    args = Namespace(controlnet_model_name_or_path=None, controlnet_format=None)
    assert controlnet_plan(args, TINY) == ("sd-scripts", 2, 0, 0, 0)
    args = Namespace(controlnet_model_name_or_path=None, controlnet_format="diffusers", controlnet_double_blocks=None,
                     controlnet_single_blocks=None, controlnet_num_modes=10, controlnet_inpainting=False)
    assert controlnet_plan(args, FLUX_PRESETS["dev"]) == ("diffusers", 4, 10, 10, 64)
    cn = diffusers_controlnet_from_transformer(Flux(TINY), DiffusersControlNetShape(1, 2, condition_channels=68))
    save_file_atomic(diffusers_state_dict(cn), tmp_path / "cn.safetensors")
    args = Namespace(controlnet_model_name_or_path=str(tmp_path / "cn.safetensors"), controlnet_format=None)
    assert controlnet_plan(args, TINY) == ("diffusers", 1, 2, 0, 68)


def test_blocks_to_swap_auto_for_controlnet_training(tmp_path):
    import flux_train_control_net
    from library.formats.safetensors_io import save_file_atomic
    from library.models.transformer import Flux

    path = tmp_path / "flux.safetensors"
    save_file_atomic({k: v.to(torch.bfloat16) for k, v in Flux(TINY_DEEP).state_dict().items()}, path)
    toml = tmp_path / "dataset.toml"  # read for its sizes only
    toml.write_text('[general]\nresolution = 128\n[[datasets]]\nbatch_size = 1\n  [[datasets.subsets]]\n'
                    '  image_dir = "missing"\n  conditioning_data_dir = "missing_too"\n')
    args = flux_train_control_net.setup_parser().parse_args([
        "--pretrained_model_name_or_path", str(path), "--dataset_config", str(toml), "--mixed_precision", "bf16",
        "--gradient_checkpointing", "--cache_text_encoder_outputs", "--cache_latents", "--optimizer_type", "AdamW",
        "--t5xxl_max_token_length", "64", "--blocks_to_swap", "auto", "--controlnet_format", "diffusers",
        "--controlnet_double_blocks", "1", "--controlnet_single_blocks", "1"])
    base = PlanSettings(trainer="controlnet", model=str(path), params=TINY_DEEP, width=128, height=128, t5_tokens=64,
                        optimizer_type="AdamW", controlnet=("diffusers", 1, 1, 0, 64))
    peaks = [plan_memory(replace(base, blocks_to_swap=n)).peak_bytes for n in range(3)]
    assert peaks[0] > peaks[1] > peaks[2]  # swapping the frozen base's blocks lowers the peak
    args.vram_budget_gb = (peaks[0] + peaks[1]) / 2 / GIB
    assert choose_blocks_to_swap(args, "controlnet") == 1


def test_plan_memory_tool_plans_controlnet_training(capsys):
    from tools.plan_memory import main

    argv = ["--trainer", "controlnet", "--model_preset", "tiny", "--resolution", "128,128", "--mixed_precision",
            "bf16", "--gradient_checkpointing", "--cache_text_encoder_outputs", "--cache_latents",
            "--controlnet_format", "diffusers", "--controlnet_num_modes", "3"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "for tiny diffusers ControlNet (2 double / 2 single blocks)" in text
