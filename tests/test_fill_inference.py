"""FLUX.1 Fill inference: recognition, the mask packing against diffusers' `prepare_mask_latents`, float masks kept,
the sampler against diffusers' FluxFillPipeline on tiny weights, and the command line (inpaint and outpaint sizes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.flow.fill import blank_canvas, bind_fill, encode_fill, load_fill_canvas
from library.flow.generation import FluxModels, GenerationSettings, Placement, generate_latents
from library.flow.sampling import Conditioning, get_noise
from library.flux_utils import analyze_checkpoint
from library.models.autoencoder import load_ae
from library.models.conditioned import ExtraChannelsFlux
from library.models.fill import FILL_EXTRA_CHANNELS, condition_tokens, fill_features, mask_tokens
from library.models.loading import load_flow_model
from library.models.packing import pack_latents
from library.models.variants import VARIANTS, resolve_variant
from tools.make_tiny_models import make_tiny_models

import flux_minimal_inference as cli


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_models(tmp_path_factory.mktemp("fill"), model_type="fill")


def write_image(path: Path, width: int, height: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def write_mask(path: Path, width: int, height: int, box: tuple[int, int, int, int], value: int = 255) -> Path:
    mask = np.zeros((height, width), np.uint8)
    left, top, right, bottom = box
    mask[top:bottom, left:right] = value
    Image.fromarray(mask, mode="L").save(path)
    return path


def fill_pipeline_module():
    import diffusers.pipelines.flux.pipeline_flux_fill as module

    return module


# (1) recognition


def test_fill_file_is_recognised_by_its_img_in_width(tiny, tmp_path):
    info = analyze_checkpoint(tiny["flux"])
    assert info.params.in_channels == 384 == 64 + FILL_EXTRA_CHANNELS
    variant = resolve_variant(None, has_guidance_input=True, in_channels=384)  # keys alone, no metadata
    assert (variant.name, variant.architecture, variant.guidance, variant.steps) == ("fill", "flux-1-fill-dev", 30.0,
                                                                                   50)
    assert variant.licence == "FLUX.1 [dev] Non-Commercial License" and variant.inpaint
    with pytest.raises(ValueError, match="img_in takes 384 features per token, dev takes 64"):
        resolve_variant("dev", has_guidance_input=True, in_channels=384, source="flux1-fill-dev.safetensors")
    with pytest.raises(ValueError, match="img_in takes 64 features per token, fill takes 384"):
        resolve_variant("fill", has_guidance_input=True, in_channels=64)
    # a diffusers folder (config in_channels 384) is Fill too
    from model_helpers import diffusers_reference

    _, flux = load_flow_model(tiny["flux"], torch.float32, "cpu")
    diffusers_reference(flux).save_pretrained(tmp_path / "transformer")
    folder = analyze_checkpoint(tmp_path)
    assert folder.layout == "diffusers" and folder.params.in_channels == 384
    assert resolve_variant(None, has_guidance_input=folder.params.guidance_embed,
                           in_channels=folder.params.in_channels).name == "fill"


# (2) condition features


def test_mask_packing_equals_diffusers_prepare_mask_latents():
    """Our space-to-depth + packing of a (fractional) mask and the masked-image latents' packing equal
    FluxFillPipeline.prepare_mask_latents, which takes the mask as given (no binarisation at this stage)."""
    module = fill_pipeline_module()
    g = torch.Generator().manual_seed(0)
    height, width, b = 48, 64, 2
    mask = torch.rand(b, 1, height, width, generator=g)
    latents = torch.randn(b, 16, height // 8, width // 8, generator=g)

    class Vae:  # prepare_mask_latents reads the AE's scaling only when given 16-channel latents
        class config:
            shift_factor, scaling_factor = 0.1159, 0.3611

    pipe = module.FluxFillPipeline.__new__(module.FluxFillPipeline)
    pipe.vae_scale_factor = 8
    object.__setattr__(pipe, "vae", Vae)  # bypass DiffusionPipeline's module registry
    theirs_mask, theirs_latents = module.FluxFillPipeline.prepare_mask_latents(
        pipe, mask, latents, b, 16, 1, height, width, torch.float32, "cpu", None)
    torch.testing.assert_close(mask_tokens(mask), theirs_mask, rtol=0, atol=0)
    scaled = (latents - 0.1159) * 0.3611
    torch.testing.assert_close(condition_tokens(scaled, mask[:, 0]), torch.cat((theirs_latents, theirs_mask), -1),
                               rtol=0, atol=0)


def test_mask_channel_order_is_row_then_column_in_block():
    """BFL: rearrange(mask, 'b (h ph) (w pw) -> b (ph pw) h w', ph=8, pw=8), then 2x2 packing."""
    mask = torch.zeros(1, 16, 16)
    mask[0, 3, 5] = 1.0  # latent cell (0, 0), row 3, column 5 in its 8x8 block
    mask[0, 9, 2] = 0.5  # latent cell (1, 0) -> packing position ph=1, pw=0; block row 1, column 2
    tokens = mask_tokens(mask)
    assert tokens.shape == (1, 1, 256)
    # packed features are ordered (channel, ph, pw): channel = 8 * row + column
    assert tokens[0, 0, (3 * 8 + 5) * 4 + 0] == 1.0
    assert tokens[0, 0, (1 * 8 + 2) * 4 + 2] == 0.5
    assert tokens.sum() == 1.5


def test_grey_mask_values_survive(tmp_path):
    """A grey mask (128) is kept as 128/255 in the canvas and in the features (BFL), not binarised."""
    image = write_image(tmp_path / "a.png", 32, 32)
    mask = write_mask(tmp_path / "m.png", 32, 32, (0, 0, 16, 32), value=128)
    canvas = load_fill_canvas(str(image), str(mask))
    assert np.unique(canvas.mask.numpy()).tolist() == pytest.approx([0.0, 128 / 255])
    tokens = mask_tokens(canvas.mask)
    assert torch.allclose(tokens[0, 0], torch.full((256,), 128 / 255))  # the left column of tokens
    assert torch.all(tokens[0, 1] == 0)


def test_outpaint_canvas_and_size_flooring(tmp_path):
    image = write_image(tmp_path / "a.png", 40, 35)
    canvas = load_fill_canvas(str(image), None, (8, 0, 20, 13))
    assert canvas.canvas_size == (68, 48) and canvas.size == (64, 48)
    assert canvas.png_text() == {"image": str(image), "mask_image": "", "outpaint": "8,0,20,13",
                                 "canvas_size": "68x48"}
    exact = load_fill_canvas(str(image), None, (8, 0, 16, 13))  # 64x48: no resize
    assert exact.size == (64, 48) and torch.all(exact.mask[:, :, :8] == 1) and torch.all(exact.mask[:, :, 56:] == 1)
    assert torch.all(exact.mask[:, 35:, :] == 1) and torch.all(exact.mask[:, :35, 8:48] == 0)
    assert torch.all(exact.image[:, :, :, :8] == 0)  # the pad is mid-grey
    with pytest.raises(ValueError, match="smaller than 16x16"):
        load_fill_canvas(str(write_image(tmp_path / "small.png", 12, 40)))
    blank = blank_canvas(48, 32)
    assert torch.all(blank.mask == 1) and torch.all(blank.image == 0)


# (5a) the sampler against diffusers' FluxFillPipeline


def diffusers_ae(ae):
    from test_kontext_inference import diffusers_ae as convert

    return convert(ae)


def test_sampler_equals_diffusers_fill_pipeline(tiny, tmp_path, monkeypatch, steps=4):
    """Same tiny transformer (img_in 384) and AE, prompt embeddings and initial latents: our ExtraChannelsFlux-bound
    sampler ends where FluxFillPipeline does with output_type="latent". The pipeline encodes the masked image with
    a posterior *sample*; BFL uses the mean, so the test points its `retrieve_latents` at the mode."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxFillPipeline

    from model_helpers import diffusers_reference

    module = fill_pipeline_module()
    real = module.retrieve_latents
    monkeypatch.setattr(module, "retrieve_latents", lambda out, generator=None, sample_mode="sample":
                        real(out, generator, "argmax"))
    _, flux = load_flow_model(tiny["flux"], torch.float32, "cpu")
    ae = load_ae(tiny["ae"], torch.float32, "cpu")
    flux.eval()
    width, height, seed = 64, 48, 5
    image_path = write_image(tmp_path / "a.png", width, height, seed=7)
    mask_path = write_mask(tmp_path / "m.png", width, height, (16, 8, 48, 40))  # binary: diffusers binarises
    g = torch.Generator().manual_seed(0)
    cond = Conditioning(torch.randn(1, 7, flux.params.context_in_dim, generator=g),
                        torch.randn(1, flux.params.vec_in_dim, generator=g), torch.zeros(1, 7, 3))
    canvas = load_fill_canvas(str(image_path), str(mask_path))
    model = encode_fill(flux, ae, canvas)
    assert isinstance(model, ExtraChannelsFlux)
    models = FluxModels(model, ae, None, None, None, VARIANTS["fill"], torch.float32)
    settings = GenerationSettings(prompt="", width=width, height=height, steps=steps, seed=seed)
    ours = generate_latents(models, settings, cond, None, Placement("cpu", False), progress=False)

    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxFillPipeline(scheduler=scheduler, vae=diffusers_ae(ae), text_encoder=None, tokenizer=None,
                            text_encoder_2=None, tokenizer_2=None, transformer=diffusers_reference(flux))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = pipe(image=Image.open(image_path), mask_image=Image.open(mask_path), prompt_embeds=cond.txt,
                      pooled_prompt_embeds=cond.y, latents=get_noise(1, height, width, seed),
                      height=height, width=width, num_inference_steps=steps, guidance_scale=30.0,
                      output_type="latent").images
    assert theirs.shape == (1, (height // 16) * (width // 16), 64)
    torch.testing.assert_close(pack_latents(ours), theirs, atol=2e-5, rtol=1e-5)

    # the condition matters: another mask gives other latents
    other = load_fill_canvas(str(image_path), str(write_mask(tmp_path / "m2.png", width, height, (0, 0, 16, 16))))
    models.flux = bind_fill(models.flux, fill_features(ae, other.image, other.mask))
    moved = generate_latents(models, settings, cond, None, Placement("cpu", False), progress=False)
    assert (moved - ours).abs().max() > 1e-3


# (5e) the command line


def cli_args(tiny, out, *extra):
    return ["--ckpt_path", str(tiny["flux"]), "--ae", str(tiny["ae"]), "--clip_l", str(tiny["clip_l"]),
            "--t5xxl", str(tiny["t5xxl"]), "--tokenizer_cache_dir", str(tiny["tokenizers"]), "--dtype", "fp32",
            "--output_dir", str(out), "--seed", "3", "--steps", "2", *extra]


def only_png(folder: Path) -> Image.Image:
    files = sorted(folder.glob("*.png"))
    assert len(files) == 1, files
    return Image.open(files[0])


def test_cli_inpaints_at_the_images_size_and_records_the_inputs(tiny, tmp_path, caplog):
    image = write_image(tmp_path / "a.png", 50, 37)
    mask = write_mask(tmp_path / "m.png", 50, 37, (10, 10, 30, 30))
    with caplog.at_level("INFO"):
        assert cli.main(cli_args(tiny, tmp_path / "a", "--image", str(image), "--mask_image", str(mask))) == 0
    assert "model: fill (flux-1-fill-dev)" in caplog.text
    out = only_png(tmp_path / "a")
    assert out.size == (48, 32)  # 50x37 floored to multiples of 16
    assert (out.text["image"], out.text["mask_image"], out.text["guidance"]) == (str(image), str(mask), "30.0")
    assert out.text["width"] == "48" and out.text["height"] == "32" and "outpaint" not in out.text
    # outpainting widens the canvas: 50 + 6 + 40 = 96, 37 + 11 = 48
    assert cli.main(cli_args(tiny, tmp_path / "b", "--image", str(image), "--outpaint", "6,0,40,11")) == 0
    wide = only_png(tmp_path / "b")
    assert wide.size == (96, 48) and wide.text["outpaint"] == "6,0,40,11"


def test_cli_refusals_are_one_line(tiny, tmp_path, capsys):
    image = write_image(tmp_path / "a.png", 32, 32)
    assert cli.main(cli_args(tiny, tmp_path, "--prompt", "x")) == 2
    assert "FLUX.1 Fill) repaints a picture: give --image" in capsys.readouterr().err
    assert cli.main(cli_args(tiny, tmp_path, "--image", str(image), "--width", "64")) == 2
    assert "--width: FLUX.1 Fill renders at --image's size" in capsys.readouterr().err
    assert cli.main(cli_args(tiny, tmp_path, "--image", str(tmp_path / "missing.png"))) == 2
    assert "--image" in capsys.readouterr().err
    dev = make_tiny_models(tmp_path / "dev")
    assert cli.main(cli_args(dev, tmp_path / "out", "--image", str(image))) == 2
    assert "--image: " in capsys.readouterr().err and not list((tmp_path / "out").glob("*.png"))
