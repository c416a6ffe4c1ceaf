"""flux_train_network.py --controlnet_model_name_or_path: a LoRA trained on the base through a frozen ControlNet
(diffusers layout with a Union mode, and sd-scripts layout): the ControlNet's condition reaches the loss, the
ControlNet stays frozen and unsaved, sample prompts with --cn render through it; the option checks."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import cli_runs
from cli_runs import run_args
import flux_train_network as cli
from library.formats.safetensors_io import save_file_atomic
from library.models.controlled import ControlledFlux
from library.models.controlnet import ControlNetFlux, controlnet_state_dict
from library.models.diffusers_controlnet import (DiffusersControlNetShape, diffusers_controlnet_from_transformer,
                                                 diffusers_state_dict)
from tools.make_demo_dataset import make_controlnet_demo_dataset
from tools.make_tiny_models import make_tiny_models


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from library import flux_utils

    base = tmp_path_factory.mktemp("lora-cn")
    models = make_tiny_models(base / "models")
    toml = make_controlnet_demo_dataset(base / "data", count=2, size=32)
    _, flux = flux_utils.load_flow_model(models["flux"], torch.float32, "cpu")
    torch.manual_seed(0)
    union = diffusers_controlnet_from_transformer(flux, DiffusersControlNetShape(1, 1, num_mode=4))
    sd = ControlNetFlux(flux.params)
    with torch.no_grad():
        for t in [*union.controlnet_blocks.parameters(), *union.controlnet_single_blocks.parameters(),
                  *union.controlnet_x_embedder.parameters(), *sd.controlnet_blocks.parameters()]:
            t.normal_(0, 0.2)
    save_file_atomic(diffusers_state_dict(union), base / "union.safetensors")
    save_file_atomic(controlnet_state_dict(sd), base / "sd.safetensors")
    return models, toml, base


def train_args(setup, out, *extra):
    models, toml, _ = setup
    return [*run_args(models, toml, out), "--network_module", "networks.lora_flux", "--network_dim", "4",
            "--learning_rate", "1e-3", "--max_train_steps", "3", "--output_name", "lora", *extra]


run_trainer = partial(cli_runs.run_trainer, "network")


def test_lora_trains_through_a_frozen_union_controlnet(setup, tmp_path):
    _, toml, base = setup
    control = next((toml.parent / "conditioning").glob("*.png"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a shape --w 32 --h 32 --s 2 --d 5 --cn {control}\na shape --w 32 --h 32 --s 2 --d 5\n")
    cn_args = ["--controlnet_model_name_or_path", str(base / "union.safetensors"), "--control_mode", "depth",
               "--controlnet_scale", "0.8", "--sample_prompts", str(prompts), "--sample_every_n_steps", "3"]
    trainer, code = run_trainer(train_args(setup, tmp_path / "cn", *cn_args))
    assert code == 0
    model = trainer.denoiser()
    assert isinstance(model, ControlledFlux) and model.units[0].scale == 0.8
    assert not any(p.requires_grad for p in trainer.frozen_controlnet.parameters())
    inputs = trainer.model_inputs(trainer.train_group.datasets[0][0])
    assert inputs["controlnet_mode"].tolist() == [2] and inputs["controlnet_cond"].shape[-1] == 64
    with_cn, without = (np.asarray(Image.open(p)) for p in sorted((tmp_path / "cn" / "sample").glob("*.png")))
    assert not np.array_equal(with_cn, without)
    lora = load_file(str(tmp_path / "cn" / "lora.safetensors"))
    assert not any("controlnet" in k for k in lora)  # only the LoRA is saved
    # scale 0: the ControlNet's pass is skipped, so this is the LoRA the base alone would train
    _, code = run_trainer(train_args(setup, tmp_path / "plain", *cn_args[:4], "--controlnet_scale", "0"))
    assert code == 0
    plain = load_file(str(tmp_path / "plain" / "lora.safetensors"))
    assert plain.keys() == lora.keys() and any(not torch.equal(plain[k], lora[k]) for k in lora)  # the CN mattered


def test_lora_with_a_frozen_sd_scripts_controlnet_on_an_fp8_base(setup, tmp_path):
    _, _, base = setup
    trainer, code = run_trainer(train_args(setup, tmp_path, "--controlnet_model_name_or_path",
                                           str(base / "sd.safetensors"), "--fp8_base", "--mixed_precision", "bf16"))
    assert code == 0
    cn = trainer.frozen_controlnet  # stored in fp8 as the transformer is
    assert cn.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
    assert trainer.models.flux.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
    inputs = trainer.model_inputs(trainer.train_group.datasets[0][0])
    assert inputs["controlnet_cond"].shape == (1, 3, 32, 32)  # sd-scripts' ControlNets read the pixels


@pytest.mark.parametrize("extra, message", [
    (["--control_mode", "canny"], "need --controlnet_model_name_or_path"),
    (["--controlnet_model_name_or_path", "x.safetensors", "--blocks_to_swap", "auto"], "give a number of blocks"),
])
def test_option_checks(setup, tmp_path, capsys, extra, message):
    assert cli.main([*train_args(setup, tmp_path), *extra]) == 2
    assert message in capsys.readouterr().err
