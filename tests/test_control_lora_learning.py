"""Learning test of BFL control LoRAs: a control LoRA trained on dev with flux_train_network.py --network_module
networks.control_lora_flux on image pairs makes generation follow the control map: two red shapes with the SAME
caption and their silhouettes as control maps (tools/make_demo_dataset.py), so only the map says which shape to draw.
After training, each silhouette is sampled through flux_minimal_inference.py --lora_weights (the control LoRA,
strength 1) --control_image, and the final latents must be nearer their own pair's training latents than the other
pair's, and much nearer than plain dev's (no LoRA) for the same caption and seed.

Models and recipe as tests/test_controlnet_learning.py: trained-like tiny models (hidden 128), AdamW, cosine,
--model_prediction_type raw, 32x32 images, guidance 1.0 in training and sampling (the tiny model's guidance embedder
was never trained for 30); rank 16, 300 steps. Measured on 2 CPU cores (model seed 0, training seed 1, 20 sampling
steps): lr 2e-3 gave MSE plain dev 0.70 / 0.89, control LoRA 0.017 / 0.025 (42x, 36x; the other pair's target
0.84 / 0.79); lr 1e-3 gave only 4.5x on the circle.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import flux_minimal_inference as inference_cli
import flux_train_network as train_cli
from test_controlnet_learning import CAPTION, SAMPLE_STEPS, SIZE, model_args, training_latents
from tools.make_demo_dataset import make_controlnet_demo_dataset
from tools.make_tiny_models import make_tiny_models

TRAIN_STEPS = 300
MIN_RATIO = 5.0


def sampled(models, out, *extra) -> torch.Tensor:
    assert inference_cli.main(["--ckpt_path", str(models["flux"]), *model_args(models), "--dtype", "fp32",
                               "--device", "cpu", "--width", str(SIZE), "--height", str(SIZE), "--steps",
                               str(SAMPLE_STEPS), "--seed", "3", "--prompt", CAPTION, "--guidance", "1.0",
                               "--output_dir", str(out), "--output_latents", *extra]) == 0
    (path,) = out.glob("*_latents.safetensors")
    return load_file(str(path))["latents"].float()


@pytest.mark.slow
def test_trained_control_lora_follows_the_control_map(tmp_path):
    models = make_tiny_models(tmp_path / "models", seed=0, init="trained-like", hidden_size=128)
    toml = make_controlnet_demo_dataset(tmp_path / "data", count=2, size=SIZE, caption=CAPTION)
    assert train_cli.main(["--pretrained_model_name_or_path", str(models["flux"]), *model_args(models),
                           "--dataset_config", str(toml), "--cache_latents_to_disk", "--max_data_loader_n_workers",
                           "0", "--output_dir", str(tmp_path / "out"), "--output_name", "ctl", "--seed", "1",
                           "--network_module", "networks.control_lora_flux", "--network_dim", "16",
                           "--learning_rate", "2e-3", "--lr_scheduler", "cosine", "--max_train_steps",
                           str(TRAIN_STEPS), "--model_prediction_type", "raw", "--guidance_scale", "1.0"]) == 0
    lora = tmp_path / "out" / "ctl.safetensors"
    images = sorted((tmp_path / "data" / "images").glob("*.png"))
    targets = {image.stem: training_latents(image) for image in images}
    for image in images:
        control = tmp_path / "data" / "conditioning" / image.name
        plain = sampled(models, tmp_path / "samples" / f"{image.stem}_plain")
        steered = sampled(models, tmp_path / "samples" / f"{image.stem}_ctl", "--lora_weights", f"{lora};1.0",
                          "--control_image", str(control))
        target = targets[image.stem]
        mse_plain, mse_ctl = ((plain - target) ** 2).mean().item(), ((steered - target) ** 2).mean().item()
        mse_other = min(((steered - t) ** 2).mean().item() for stem, t in targets.items() if stem != image.stem)
        print(f"{image.stem}: MSE to the paired target: plain dev {mse_plain:.4f}, control LoRA {mse_ctl:.4f} "
              f"({mse_plain / mse_ctl:.1f}x); to the other target {mse_other:.4f}")
        assert mse_plain / mse_ctl >= MIN_RATIO, (image.stem, mse_plain, mse_ctl)
        assert mse_ctl < mse_other, (image.stem, mse_ctl, mse_other)  # the map, not the caption, picks the shape
