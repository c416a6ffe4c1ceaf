"""Learning test of Kontext training: a LoRA trained with `flux_train_network.py --model_type kontext` on
(reference, target) pairs of one fixed edit (red and blue swapped) moves the edit of a held-out reference towards
its expected target, compared with the base model, and it does so by reading the reference.

The pictures are single colours (32 pairs, one caption): the tiny model learns to read a reference's colour through
attention within 1500 steps, while the position-by-position copy that textured pictures need does not generalise to
a held-out picture at this size and length (measured: 4 blocky 4x4-cell pairs, 600 steps: the held-out edit got
worse than the base model's, the training pairs barely better). Measured on 2 CPU cores (~60 s): base 1.09, LoRA
0.62 (1.8x); the LoRA given the inverted reference 1.35 (2.2x its own).

Both sides go through the command lines (`main(argv)`, in process): the trainer, then `flux_minimal_inference.py
--model_type kontext --reference_image ... --reference_resize none --output_latents` with and without
`--lora_weights`; the renders' latents are compared with the AE mean of the expected target (the held-out reference
with red and blue swapped). Models: the trained-like tiny models of tests/test_lora_learning.py (see there why).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from safetensors.torch import load_file

import flux_minimal_inference as inference_cli
import flux_train_network as train_cli
from library import flux_utils
from library.flow.references import load_reference
from tools.make_tiny_models import make_tiny_models

SIZE = 64
PAIRS = 32
TRAIN_STEPS = 1500
SAMPLE_STEPS = 20
CAPTION = "swap red and blue"
MIN_RATIO = 1.4  # measured 1.8x (base 1.09, LoRA 0.62)
REFERENCE_RATIO = 1.5  # measured 2.2x

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_picture(rng) -> np.ndarray:
    """A SIZE x SIZE picture of one random colour (each channel 0..255)."""
    return np.broadcast_to(rng.integers(0, 256, 3).astype(np.uint8), (SIZE, SIZE, 3)).copy()


def swapped(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rgb[..., ::-1])


def write_pairs(base: Path, seed: int = 0) -> tuple[Path, Path]:
    """PAIRS training pairs and one held-out reference; returns (dataset TOML, held-out reference)."""
    rng = np.random.default_rng(seed)
    for folder in ("targets", "refs", "held_out"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    for i in range(PAIRS):
        picture = random_picture(rng)
        Image.fromarray(picture).save(base / "refs" / f"pair{i}.png")
        Image.fromarray(swapped(picture)).save(base / "targets" / f"pair{i}.png")
        (base / "targets" / f"pair{i}.txt").write_text(CAPTION)
    held_out = base / "held_out" / "new.png"
    Image.fromarray(random_picture(rng)).save(held_out)
    toml = base / "dataset.toml"
    toml.write_text(f'[general]\nresolution = {SIZE}\nbatch_size = 1\ncaption_extension = ".txt"\n[[datasets]]\n'
                    f'[[datasets.subsets]]\nimage_dir = "{base / "targets"}"\n'
                    f'reference_image_dir = "{base / "refs"}"\n')
    return toml, held_out


def render(models: dict, reference: Path, lora: Path | None, out: Path, seed: int = 3) -> torch.Tensor:
    """Latents (16, SIZE/8, SIZE/8) of the caption rendered by `flux_minimal_inference.py --model_type kontext` with
    `reference` (kept at its size), with or without the LoRA."""
    extra = ["--lora_weights", str(lora)] if lora is not None else []
    assert inference_cli.main([
        "--ckpt_path", str(models["flux"]), "--ae", str(models["ae"]), "--clip_l", str(models["clip_l"]),
        "--t5xxl", str(models["t5xxl"]), "--tokenizer_cache_dir", str(models["tokenizers"]),
        "--t5xxl_max_token_length", "32", "--dtype", "fp32", "--device", "cpu", "--model_type", "kontext",
        "--reference_image", str(reference), "--reference_resize", "none", "--width", str(SIZE), "--height",
        str(SIZE), "--steps", str(SAMPLE_STEPS), "--guidance", "1.0", "--seed", str(seed), "--prompt", CAPTION,
        "--output_dir", str(out), "--output_latents", *extra]) == 0
    (path,) = out.glob("*_latents.safetensors")
    return load_file(str(path))["latents"].float()


def expected_latents(models: dict, reference: Path) -> torch.Tensor:
    """The AE mean of the held-out reference with red and blue swapped: what the edit should produce."""
    ae = flux_utils.load_ae(models["ae"], torch.float32, "cpu").eval()
    target = reference.parent / f"{reference.stem}_expected.png"
    Image.fromarray(swapped(np.asarray(Image.open(reference).convert("RGB")))).save(target)
    with torch.no_grad():
        return ae.encode(load_reference(str(target), "none")[0], sample=False)[0]


@pytest.mark.slow
def test_kontext_lora_moves_a_held_out_edit_towards_its_target(tmp_path):
    models = make_tiny_models(tmp_path / "models", seed=0, init="trained-like", hidden_size=128)
    toml, held_out = write_pairs(tmp_path / "data")
    out = tmp_path / "out"
    assert train_cli.main([
        "--pretrained_model_name_or_path", str(models["flux"]), "--clip_l", str(models["clip_l"]),
        "--t5xxl", str(models["t5xxl"]), "--ae", str(models["ae"]), "--tokenizer_cache_dir", str(models["tokenizers"]),
        "--t5xxl_max_token_length", "32", "--model_type", "kontext", "--dataset_config", str(toml),
        "--cache_latents_to_disk", "--cache_text_encoder_outputs", "--max_data_loader_n_workers", "0",
        "--output_dir", str(out), "--output_name", "edit", "--seed", "1", "--network_module", "networks.lora_flux",
        "--network_dim", "16", "--network_alpha", "16", "--network_train_unet_only", "--learning_rate", "1e-2",
        "--lr_scheduler", "cosine", "--max_train_steps", str(TRAIN_STEPS), "--model_prediction_type", "raw"]) == 0
    expected = expected_latents(models, held_out)
    base = render(models, held_out, None, tmp_path / "base")
    learned = render(models, held_out, out / "edit.safetensors", tmp_path / "lora")
    mse_base = ((base - expected) ** 2).mean().item()
    mse_lora = ((learned - expected) ** 2).mean().item()
    # the edit reads the reference: the same LoRA given the inverted picture lands far from the expected target
    inverted = tmp_path / "inverted.png"
    Image.fromarray(255 - np.asarray(Image.open(held_out).convert("RGB"))).save(inverted)
    mse_wrong = ((render(models, inverted, out / "edit.safetensors", tmp_path / "inverted") - expected) ** 2
                 ).mean().item()
    print(f"held-out edit: MSE to the expected target: base {mse_base:.4f}, LoRA {mse_lora:.4f} "
          f"(ratio {mse_base / mse_lora:.1f}x); LoRA with the inverted reference {mse_wrong:.4f}")
    assert mse_base / mse_lora >= MIN_RATIO
    assert mse_wrong / mse_lora >= REFERENCE_RATIO
