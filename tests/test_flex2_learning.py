"""Learning test of Flex.2's control channels: a LoRA trained with flux_train_network.py on a Flex.2-like model learns
to draw what the control picture says, through the control latent features alone.

The pairs (tools/make_demo_dataset.py `make_controlnet_demo_dataset`): a red circle and a red square with the SAME
caption, their white-on-black silhouettes as control pictures (a ControlNet-style subset), so only the control says
which shape to draw. Training keeps the control every step (`--control_dropout 0`) and never inpaints
(`--inpaint_dropout 1`): the inpaint part would show the answer. After training, each silhouette is rendered through
flux_minimal_inference.py with that one caption, a fixed seed, `--control_strength 1 --control_stop 1` (as trained),
with the LoRA and without it, and the final latents are compared with the training latents the trainer cached.

Models: `make_tiny_models(model_type="flex2", init="trained-like", hidden_size=128)` (the condition columns of img_in
random, as a model that was trained to read them would have some). A LoRA cannot change img_in, so it has to learn
to use what the random columns put into the residual stream.

Measured on 2 CPU cores (200 steps, AdamW 2e-3 cosine, rank 16, ~30 s): MSE without the LoRA 0.94 / 0.99, with it
0.136 / 0.160 (6.9x and 6.2x closer); against the other pair's target 0.63 / 0.57 (4.6x and 3.5x farther than its
own): the control picture decides the shape.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import cli_runs
import flux_minimal_inference as inference_cli
from tools.make_demo_dataset import make_controlnet_demo_dataset
from tools.make_tiny_models import make_tiny_models

MIN_RATIO = 4.0  # trained vs base, each against its own target
MIN_SEPARATION = 2.5  # each trained render against the other pair's target vs its own
SIZE = 32  # pixels; latents 16 x 4 x 4
TRAIN_STEPS = 200
SAMPLE_STEPS = 20
CAPTION = "a red shape on a white background"


def model_args(models: dict[str, Path]) -> list[str]:
    return ["--clip_l", str(models["clip_l"]), "--t5xxl", str(models["t5xxl"]), "--ae", str(models["ae"]),
            "--tokenizer_cache_dir", str(models["tokenizers"]), "--t5xxl_max_token_length", "32"]


def sampled_latents(models, control: Path, out: Path, *extra: str) -> torch.Tensor:
    assert inference_cli.main(["--ckpt_path", str(models["flux"]), *model_args(models), "--dtype", "fp32",
                               "--device", "cpu", "--steps", str(SAMPLE_STEPS), "--seed", "3", "--prompt", CAPTION,
                               "--output_dir", str(out), "--output_latents", "--control_image", str(control),
                               "--control_strength", "1", "--control_stop", "1", *extra]) == 0
    (path,) = out.glob("*_latents.safetensors")
    return load_file(str(path))["latents"].float()


def training_latents(image: Path) -> torch.Tensor:
    with np.load(image.parent / f"{image.stem}_{SIZE:04d}x{SIZE:04d}_flux.npz") as cache:
        return torch.from_numpy(cache[f"latents_{SIZE // 8}x{SIZE // 8}"]).float()


@pytest.mark.slow
def test_a_flex2_lora_learns_to_follow_the_control_picture(tmp_path):
    models = make_tiny_models(tmp_path / "models", model_type="flex2", init="trained-like", hidden_size=128)
    toml = make_controlnet_demo_dataset(tmp_path / "data", count=2, size=SIZE, caption=CAPTION)
    out = tmp_path / "out"
    argv = ["--pretrained_model_name_or_path", str(models["flux"]), *model_args(models), "--dataset_config",
            str(toml), "--output_dir", str(out), "--output_name", "flex", "--seed", "1",
            "--max_data_loader_n_workers", "0", "--model_prediction_type", "raw", "--network_module",
            "networks.lora_flux", "--network_dim", "16", "--network_alpha", "16", "--learning_rate", "2e-3",
            "--lr_scheduler", "cosine", "--optimizer_type", "AdamW", "--max_train_steps", str(TRAIN_STEPS),
            "--cache_latents_to_disk", "--cache_text_encoder_outputs", "--inpaint_dropout", "1",
            "--control_dropout", "0", "--network_train_unet_only"]
    trainer, code = cli_runs.run_trainer("network", argv)
    assert code == 0
    lora = out / "flex.safetensors"
    images = sorted((toml.parent / "images").glob("*.png"))
    controls = [toml.parent / "conditioning" / i.name for i in images]
    targets = [training_latents(i) for i in images]
    trained = [sampled_latents(models, c, tmp_path / f"t{i}", "--lora_weights", str(lora))
               for i, c in enumerate(controls)]
    base = [sampled_latents(models, c, tmp_path / f"b{i}") for i, c in enumerate(controls)]
    mse = lambda a, b: float(((a - b) ** 2).mean())  # noqa: E731
    for i in range(2):
        own, other = mse(trained[i], targets[i]), mse(trained[i], targets[1 - i])
        assert mse(base[i], targets[i]) > MIN_RATIO * own, (i, mse(base[i], targets[i]), own)
        assert other > MIN_SEPARATION * own, (i, other, own)  # the control picks the shape: the caption is the same
