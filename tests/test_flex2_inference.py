"""Flex.2 inference: control picture and inpainting inputs encoded and bound (library/flow/flex2.py), the control
stop inside the real sampler, and the command line (flux_minimal_inference.py) on a tiny Flex.2-like file."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import flux_minimal_inference as cli
from library.cli import flex2_options
from library.flow.flex2 import Flex2Inputs, bind_with_defaults
from library.flow.generation import FluxModels, GenerationSettings, Placement, generate_latents
from library.flow.sampling import Conditioning
from library.models import flex2 as flex2_model
from library.models.autoencoder import load_ae
from library.models.checkpoint import load_transformer
from library.models.variants import VARIANTS
from tools.make_tiny_models import make_tiny_models


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_models(tmp_path_factory.mktemp("flex2"), model_type="flex2")


def write_image(path: Path, width: int, height: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def write_mask(path: Path, width: int, height: int, box) -> Path:
    mask = np.zeros((height, width), np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 255
    Image.fromarray(mask).save(path)
    return path


def test_the_cli_defaults_are_the_library_defaults():
    assert flex2_options.DEFAULT_CONTROL_STRENGTH == flex2_model.DEFAULT_CONTROL_STRENGTH == 0.5
    assert flex2_options.DEFAULT_CONTROL_STOP == flex2_model.DEFAULT_CONTROL_STOP == 0.5


def tiny_models(tiny):
    flux = load_transformer(tiny["flux"], torch.float32, "cpu").eval()
    ae = load_ae(tiny["ae"], torch.float32, "cpu").eval()
    return FluxModels(flux, ae, None, None, None, VARIANTS["flex2"], torch.float32)


def conditioning(flux, n_txt=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = flux.params
    return Conditioning(torch.randn(1, n_txt, p.context_in_dim, generator=g), torch.randn(1, p.vec_in_dim, generator=g),
                        torch.zeros(1, n_txt, 3))


def test_the_real_sampler_sees_the_control_for_the_first_steps_only(tiny, tmp_path, monkeypatch):
    """10 steps with --control_stop 0.5: the control latent is in the features of steps 0-4, zeros in 5-9; the
    inpaint part (the picture's latent, zeroed under the mask, and the mask) is there at every step."""
    models = tiny_models(tiny)
    image = write_image(tmp_path / "a.png", 32, 32)
    mask = write_mask(tmp_path / "m.png", 32, 32, (0, 0, 16, 32))  # left half: generate
    inputs = Flex2Inputs.load(str(write_image(tmp_path / "c.png", 48, 40, seed=1)), str(image), str(mask))
    settings = GenerationSettings(prompt="p", width=None, height=None, steps=10, seed=1)
    calls = []
    original = flex2_model.Flex2Condition.__call__

    def spy(self, timesteps, img_ids=None):
        features = original(self, timesteps, img_ids)
        calls.append(features)
        return features

    monkeypatch.setattr(flex2_model.Flex2Condition, "__call__", spy)
    settings, text = bind_with_defaults(models, settings, inputs, Placement("cpu", False), strength=0.5, stop=0.5)
    assert (settings.width, settings.height) == (32, 32)  # the picture's size
    generate_latents(models, settings, conditioning(models.flux.flux), None, Placement("cpu", False), progress=False)
    assert len(calls) == 10
    control_on = [bool(f[..., 68:].abs().sum() > 0) for f in calls]
    assert control_on == [True] * 5 + [False] * 5
    for f in calls:  # tokens of the left column of the 2x2 grid are masked: their mask features are 1
        mask_features = f[0, :, 64:68]
        assert torch.equal(mask_features[0], torch.ones(4)) and torch.equal(mask_features[1], torch.zeros(4))
        assert f[0, 0, :64].abs().sum() == 0 and f[0, 1, :64].abs().sum() > 0  # inpaint latent zeroed where masked
    assert text == {"image": str(image), "mask_image": str(mask), "control_image": str(tmp_path / "c.png"),
                    "control_strength": "0.5", "control_stop": "0.5"}


def test_strength_scales_the_control_latent_and_bypass_drops_guidance(tiny, tmp_path):
    models = tiny_models(tiny)
    inputs = Flex2Inputs.load(str(write_image(tmp_path / "c.png", 32, 32)))
    settings = GenerationSettings(prompt="p", width=None, height=None, steps=2, seed=1)
    bind_with_defaults(models, settings, inputs, strength=1.0, stop=1.0)
    full = models.flux._bound._with[..., 68:].clone()
    settings, text = bind_with_defaults(models, settings, inputs, strength=0.25, stop=1.0, bypass_guidance=True)
    assert torch.allclose(models.flux._bound._with[..., 68:], full * 0.25)
    assert (settings.width, settings.height) == (32, 32) and text["bypass_guidance_embedding"] == "true"
    cond = conditioning(models.flux.flux)
    a = generate_latents(models, GenerationSettings("p", 32, 32, 2, guidance=3.5, seed=1), cond, None,
                         Placement("cpu", False), progress=False)
    b = generate_latents(models, GenerationSettings("p", 32, 32, 2, guidance=9.0, seed=1), cond, None,
                         Placement("cpu", False), progress=False)
    assert torch.equal(a, b)  # bypassed: the guidance value changes nothing
    models.flux.bypass_guidance = False
    c = generate_latents(models, GenerationSettings("p", 32, 32, 2, guidance=9.0, seed=1), cond, None,
                         Placement("cpu", False), progress=False)
    assert not torch.equal(a, c)


def cli_args(tiny, out, *extra):
    return ["--ckpt_path", str(tiny["flux"]), "--ae", str(tiny["ae"]), "--clip_l", str(tiny["clip_l"]),
            "--t5xxl", str(tiny["t5xxl"]), "--tokenizer_cache_dir", str(tiny["tokenizers"]), "--dtype", "fp32",
            "--t5xxl_max_token_length", "16", "--output_dir", str(out), "--seed", "3", "--steps", "2", *extra]


def only_png(folder: Path) -> Image.Image:
    files = sorted(folder.glob("*.png"))
    assert len(files) == 1, files
    return Image.open(files[0])


def test_cli_renders_with_control_and_inpaint_inputs_and_records_them(tiny, tmp_path, caplog):
    image = write_image(tmp_path / "a.png", 50, 37)
    mask = write_mask(tmp_path / "m.png", 50, 37, (10, 10, 30, 30))
    control = write_image(tmp_path / "depth.png", 64, 64, seed=2)
    with caplog.at_level("INFO"):
        assert cli.main(cli_args(tiny, tmp_path / "a", "--control_image", str(control), "--image", str(image),
                                 "--mask_image", str(mask), "--control_strength", "0.8",
                                 "--control_stop", "0.33")) == 0
    assert "model: flex2 (flex-2-preview)" in caplog.text
    out = only_png(tmp_path / "a")
    assert out.size == (48, 32)
    assert (out.text["control_image"], out.text["control_strength"], out.text["control_stop"]) == (
        str(control), "0.8", "0.33")
    assert (out.text["image"], out.text["mask_image"], out.text["guidance"]) == (str(image), str(mask), "3.5")
    # control only: the control picture's size; defaults recorded
    assert cli.main(cli_args(tiny, tmp_path / "b", "--control_image", str(control))) == 0
    b = only_png(tmp_path / "b")
    assert b.size == (64, 64) and (b.text["control_strength"], b.text["control_stop"]) == ("0.5", "0.5")
    # neither: text-to-image at the given size
    assert cli.main(cli_args(tiny, tmp_path / "c", "--width", "32", "--height", "48")) == 0
    assert only_png(tmp_path / "c").size == (32, 48)


def test_cli_refusals_are_one_line(tiny, tmp_path, capsys):
    control = write_image(tmp_path / "c.png", 32, 32)
    dev = make_tiny_models(tmp_path / "dev")
    assert cli.main(cli_args(dev, tmp_path / "o", "--control_strength", "0.3")) == 2
    assert "--control_strength: " in capsys.readouterr().err
    assert cli.main(cli_args(dev, tmp_path / "o", "--control_image", str(control))) == 2
    assert "--control_image need --controlnet" in capsys.readouterr().err
    assert cli.main(cli_args(tiny, tmp_path / "o", "--control_image", str(control), "--control_image",
                             str(control))) == 2
    assert "2 --control_image: Flex.2 takes one control picture" in capsys.readouterr().err
    assert cli.main(cli_args(tiny, tmp_path / "o", "--control_image", str(control), "--controlnet_scale", "0.5")) == 2
    assert "--controlnet_scale: ControlNet options; Flex.2's control takes --control_strength" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit):  # a parse error
        cli.main(cli_args(tiny, tmp_path / "o", "--control_stop", "1.5"))
    assert "--control_stop: must be from 0 to 1" in capsys.readouterr().err
    assert cli.main(cli_args(tiny, tmp_path / "o", "--control_image", str(tmp_path / "missing.png"))) == 2
    assert "--control_image" in capsys.readouterr().err
    image = write_image(tmp_path / "a.png", 32, 32)
    assert cli.main(cli_args(tiny, tmp_path / "o", "--image", str(image), "--width", "64")) == 2
    assert "--width: Flex.2 inpaints at --image's size" in capsys.readouterr().err
    assert cli.main(cli_args(tiny, tmp_path / "o", "--mask_image", str(image))) == 2
    assert "--mask_image and --outpaint need --image" in capsys.readouterr().err
    assert not list((tmp_path / "o").glob("*.png"))
