"""Learning test of the ControlNet half of issue 8: a ControlNet trained with flux_train_control_net.py on image pairs
steers generation toward the paired target, measured as MSE in latent space against a zero (untrained) ControlNet.

The pairs (tools/make_demo_dataset.py `make_controlnet_demo_dataset`): a red circle and a red square with the SAME
caption, their white-on-black silhouettes as conditioning images, so only the control image says which shape to
draw. After training, each silhouette is sampled through flux_minimal_inference.py --controlnet --control_image with
that one caption and a fixed seed, once with the trained ControlNet and once with a new one (zero output projections,
i.e. the base model), and the final latents are compared with the training latents the trainer cached.

Models: `make_tiny_models(init="trained-like", hidden_size=128)`, as in tests/test_lora_learning.py (random tiny
models can barely learn; see there). Recipe: AdamW 1e-3, cosine schedule, 300 steps over the two pairs,
`--model_prediction_type raw` (what the sampler integrates), 32x32 images (latents 16 x 4 x 4). Measured on 2 CPU
cores (model seed 0, training seed 1, 20 sampling steps): MSE zero ControlNet 0.70 / 0.89 (about the latents'
variance), trained 0.028 / 0.042: 25x and 21x closer, each trained sample ~20x nearer its own target than the other
pair's; the diffusers layout (`--controlnet_format diffusers`: 2 double + 2 single blocks from the transformer, AE
latents of the silhouettes) 0.70 / 0.89 -> 0.026 / 0.041: 27x and 22x. sd-scripts layout: 200 steps gave 8x; at
64x64 pixels 300 steps gave 15x, 200 steps at 2e-3 5-6x, 100 steps at 3e-3 1.7x: the zero-initialised output
projections and hint convolution make the start slow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import flux_minimal_inference as inference_cli
import flux_train_control_net as train_cli
from tools.make_demo_dataset import make_controlnet_demo_dataset
from tools.make_tiny_models import make_tiny_models

MIN_RATIO = 5.0
SIZE = 32  # pixels; latents 16 x 4 x 4
TRAIN_STEPS = 300
SAMPLE_STEPS = 20
CAPTION = "a red shape on a white background"


def model_args(models: dict[str, Path]) -> list[str]:
    return ["--clip_l", str(models["clip_l"]), "--t5xxl", str(models["t5xxl"]), "--ae", str(models["ae"]),
            "--tokenizer_cache_dir", str(models["tokenizers"]), "--t5xxl_max_token_length", "32"]


def sampled_latents(models, controlnet: Path, control: Path, out: Path) -> torch.Tensor:
    assert inference_cli.main(["--ckpt_path", str(models["flux"]), *model_args(models), "--dtype", "fp32",
                               "--device", "cpu", "--width", str(SIZE), "--height", str(SIZE), "--steps",
                               str(SAMPLE_STEPS), "--seed", "3", "--prompt", CAPTION, "--output_dir", str(out),
                               "--output_latents", "--controlnet", str(controlnet), "--control_image",
                               str(control)]) == 0
    (path,) = out.glob("*_latents.safetensors")
    return load_file(str(path))["latents"].float()


def training_latents(image: Path) -> torch.Tensor:
    with np.load(image.parent / f"{image.stem}_{SIZE:04d}x{SIZE:04d}_flux.npz") as cache:
        return torch.from_numpy(cache[f"latents_{SIZE // 8}x{SIZE // 8}"]).float()


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["sd-scripts", "diffusers"])
def test_trained_controlnet_steers_samples_to_the_paired_targets(tmp_path, layout):
    from library import flux_utils
    from library.models.controlnet import controlnet_from_transformer, controlnet_state_dict
    from library.models.diffusers_controlnet import (DiffusersControlNetShape, diffusers_controlnet_from_transformer,
                                                     diffusers_state_dict)
    from library.formats.safetensors_io import save_file_atomic

    models = make_tiny_models(tmp_path / "models", seed=0, init="trained-like", hidden_size=128)
    toml = make_controlnet_demo_dataset(tmp_path / "data", count=2, size=SIZE, caption=CAPTION)
    assert train_cli.main(["--pretrained_model_name_or_path", str(models["flux"]), *model_args(models),
                           "--dataset_config", str(toml), "--cache_latents_to_disk", "--max_data_loader_n_workers",
                           "0", "--output_dir", str(tmp_path / "out"), "--output_name", "cn", "--seed", "1",
                           "--learning_rate", "1e-3", "--lr_scheduler", "cosine", "--max_train_steps",
                           str(TRAIN_STEPS), "--model_prediction_type", "raw", "--controlnet_format", layout]) == 0
    _, flux = flux_utils.load_flow_model(models["flux"], torch.float32, "cpu")
    zero = tmp_path / "zero.safetensors"
    if layout == "diffusers":  # the same shape as trained (2 double / 2 single blocks), zero outputs
        new = diffusers_controlnet_from_transformer(flux, DiffusersControlNetShape(2, 2))
        save_file_atomic(diffusers_state_dict(new), zero)
    else:
        save_file_atomic(controlnet_state_dict(controlnet_from_transformer(flux)), zero)

    images = sorted((tmp_path / "data" / "images").glob("*.png"))
    targets = {image.stem: training_latents(image) for image in images}
    for image in images:
        control = tmp_path / "data" / "conditioning" / image.name
        base = sampled_latents(models, zero, control, tmp_path / "samples" / f"{image.stem}_zero")
        steered = sampled_latents(models, tmp_path / "out" / "cn.safetensors", control,
                                  tmp_path / "samples" / f"{image.stem}_cn")
        target = targets[image.stem]
        mse_zero, mse_cn = ((base - target) ** 2).mean().item(), ((steered - target) ** 2).mean().item()
        mse_other = min(((steered - t) ** 2).mean().item() for stem, t in targets.items() if stem != image.stem)
        print(f"{image.stem}: MSE to the paired target: zero ControlNet {mse_zero:.4f}, trained {mse_cn:.4f} "
              f"({mse_zero / mse_cn:.1f}x); trained to the other target {mse_other:.4f}")
        assert mse_zero / mse_cn >= MIN_RATIO, (image.stem, mse_zero, mse_cn)
        # the control image, not the caption (shared), picks the shape
        assert mse_cn < mse_other, (image.stem, mse_cn, mse_other)
