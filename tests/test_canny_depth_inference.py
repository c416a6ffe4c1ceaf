"""FLUX.1 Canny / Depth inference: the sampler with a control picture against diffusers' FluxControlPipeline on
tiny weights, Canny maps against OpenCV at BFL's thresholds, the depth map path on a tiny local depth model, the
variant rule for 128-feature files, and the command line (library/flow/canny_depth.py, flux_minimal_inference.py)."""

from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from library.data.control_maps import canny_map
from library.flow.canny_depth import ControlEncoder, bind_control, control_map, encode_control
from library.flow.generation import FluxModels, GenerationSettings, Placement, generate_latents
from library.flow.sampling import Conditioning, get_noise
from library.models.autoencoder import load_ae
from library.models.conditioned import ExtraChannelsFlux
from library.models.loading import load_flow_model
from library.models.packing import pack_latents
from library.models.variants import VARIANTS, resolve_variant
from tools.make_tiny_models import make_tiny_models

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_models(tmp_path_factory.mktemp("canny"), model_type="canny")


def write_image(path, width, height, seed=0):
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), np.uint8)
    image[height // 4: 3 * height // 4, width // 3: 2 * width // 3] = rng.integers(100, 256, 3)  # edges to find
    image = np.clip(image + rng.integers(0, 40, image.shape), 0, 255).astype(np.uint8)
    Image.fromarray(image).save(path)
    return path


def test_variants_rows_and_the_128_feature_default(caplog):
    canny, depth = VARIANTS["canny"], VARIANTS["depth"]
    assert (canny.in_channels, canny.guidance, canny.steps, canny.control) == (128, 30.0, 50, "canny")
    assert (depth.in_channels, depth.guidance, depth.steps, depth.control) == (128, 10.0, 50, "depth")
    assert (canny.architecture, depth.architecture) == ("flux-1-canny-dev", "flux-1-depth-dev")
    with caplog.at_level(logging.INFO):
        assert resolve_variant(None, has_guidance_input=True, in_channels=128, source="f").name == "canny"
    assert "keys cannot tell apart; taking canny" in caplog.text
    depth_file = {"modelspec.architecture": "flux-1-depth-dev"}
    assert resolve_variant("flux", has_guidance_input=True, in_channels=128, metadata=depth_file).name == "depth"
    assert resolve_variant("depth", has_guidance_input=True, in_channels=128).name == "depth"
    with pytest.raises(ValueError, match="img_in takes 64 features per token, depth takes 128"):
        resolve_variant("depth", has_guidance_input=True, in_channels=64, source="f")


def test_canny_map_is_opencv_at_bfl_thresholds(tmp_path):
    rgb = np.asarray(Image.open(write_image(tmp_path / "a.png", 64, 48)))
    edges = cv2.Canny(rgb, 50, 200)
    ours = canny_map(rgb)
    assert ours.shape == (48, 64, 3) and all(np.array_equal(ours[..., c], edges) for c in range(3))
    assert 0 < (edges > 0).mean() < 0.5
    assert not np.array_equal(edges, cv2.Canny(rgb, 100, 200))  # the thresholds matter
    tensor = control_map(rgb, 64, 48, "canny")
    assert torch.equal(tensor[0, 0], torch.from_numpy(edges).float() / 127.5 - 1)  # BFL: canny / 127.5 - 1
    with pytest.raises(ValueError, match="needs a depth-estimation model: give --depth_model"):
        control_map(rgb, 64, 48, "depth")


def tiny_depth_model(folder):
    """A tiny random DPT depth model with its image processor, saved as save_pretrained writes them."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    config = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37,
                       image_size=32, patch_size=8, neck_hidden_sizes=[8, 8, 8, 8], fusion_hidden_size=8,
                       backbone_out_indices=[0, 1, 2, 3], head_in_index=-1)
    torch.manual_seed(0)
    DPTForDepthEstimation(config).eval().save_pretrained(folder, safe_serialization=True)
    DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False).save_pretrained(folder)
    return folder


def test_depth_map_runs_a_local_model_as_bfl_does(tmp_path):
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    from library.models.depth import DepthEstimator

    folder = tiny_depth_model(tmp_path / "depth")
    rgb = np.asarray(Image.open(write_image(tmp_path / "a.png", 40, 24)))
    depth = DepthEstimator(folder)(rgb)
    # BFL's DepthImageEncoder, spelled out: processor -> predicted_depth -> bicubic antialias -> d / 127.5 - 1
    model = AutoModelForDepthEstimation.from_pretrained(folder).eval()
    with torch.no_grad():
        d = model(**AutoImageProcessor.from_pretrained(folder)(images=rgb, return_tensors="pt")).predicted_depth
    expected = torch.nn.functional.interpolate(d[:, None].repeat(1, 3, 1, 1), (24, 40), mode="bicubic",
                                               antialias=True) / 127.5 - 1
    assert depth.shape == (1, 3, 24, 40)
    torch.testing.assert_close(depth, expected)
    (folder / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    with pytest.raises(ValueError, match="no model.safetensors"):
        DepthEstimator(folder)
    with pytest.raises(ValueError, match="expected a folder with config.json"):
        DepthEstimator(tmp_path / "missing")


def test_sampler_equals_diffusers_flux_control_pipeline(tiny, tmp_path, monkeypatch, steps=3):
    """Same tiny weights (in_channels 128), prompt embeddings, initial latents and control picture (50x37, resized
    by both to 64x48 with Lanczos): our ExtraChannelsFlux-bound sampler ends where FluxControlPipeline does. The
    pipeline samples the AE posterior; BFL and we take its mean, so the pipeline's sampling is set to the mean."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxControlPipeline
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from model_helpers import diffusers_reference
    from test_kontext_inference import diffusers_ae

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    _, flux = load_flow_model(tiny["flux"], torch.float32, "cpu")
    ae = load_ae(tiny["ae"], torch.float32, "cpu")
    flux.eval()
    assert flux.params.in_channels == 128
    width, height, seed = 64, 48, 5
    picture = write_image(tmp_path / "control.png", 50, 37, seed=7)
    g = torch.Generator().manual_seed(0)
    cond = Conditioning(torch.randn(1, 7, flux.params.context_in_dim, generator=g),
                        torch.randn(1, flux.params.vec_in_dim, generator=g), torch.zeros(1, 7, 3))
    tokens = ControlEncoder(ae)(picture, width, height)
    models = FluxModels(bind_control(flux, tokens), ae, None, None, None, VARIANTS["canny"], torch.float32)
    settings = GenerationSettings(prompt="", width=width, height=height, steps=steps, seed=seed)
    ours = generate_latents(models, settings, cond, None, Placement("cpu", False), progress=False)
    assert settings.resolved_guidance(VARIANTS["canny"]) == 30.0

    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxControlPipeline(scheduler=scheduler, vae=diffusers_ae(ae), text_encoder=None, tokenizer=None,
                               text_encoder_2=None, tokenizer_2=None, transformer=diffusers_reference(flux))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = pipe(control_image=Image.open(picture), prompt_embeds=cond.txt, pooled_prompt_embeds=cond.y,
                      latents=get_noise(1, height, width, seed), height=height, width=width,
                      num_inference_steps=steps, guidance_scale=30.0, output_type="latent").images
    torch.testing.assert_close(pack_latents(ours), theirs, atol=2e-5, rtol=1e-5)
    # the control matters
    other = encode_control(control_map(np.zeros((48, 64, 3), np.uint8), 64, 48), ae)
    changed = generate_latents(FluxModels(bind_control(models.flux, other), ae, None, None, None, VARIANTS["canny"],
                                          torch.float32), settings, cond, None, Placement("cpu", False),
                               progress=False)
    assert isinstance(models.flux, ExtraChannelsFlux) and (changed - ours).abs().max() > 1e-3


def test_diffusers_folder_with_128_features_loads_as_canny(tiny, tmp_path, caplog):
    """A diffusers folder (config in_channels 128, out_channels 64) is a Canny/Depth model with the same weights."""
    from library.models.checkpoint import analyze_checkpoint
    from model_helpers import diffusers_reference

    _, flux = load_flow_model(tiny["flux"], torch.float32, "cpu")
    folder = tmp_path / "canny-diffusers"
    diffusers_reference(flux).save_pretrained(folder, safe_serialization=True)
    info = analyze_checkpoint(folder)
    assert info.params.in_channels == 128 and info.layout == "diffusers"
    with caplog.at_level(logging.INFO):
        assert resolve_variant(None, has_guidance_input=info.params.guidance_embed,
                               in_channels=info.params.in_channels, metadata=info.metadata).name == "canny"
    _, loaded = load_flow_model(folder, torch.float32, "cpu")
    assert all(torch.equal(v, flux.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_missing_opencv_is_one_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 raises ImportError
    with pytest.raises(ValueError, match="needs OpenCV: pip install opencv-python-headless"):
        canny_map(np.zeros((8, 8, 3), np.uint8))
