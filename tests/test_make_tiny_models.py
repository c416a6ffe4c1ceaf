"""tools/make_tiny_models.py: the default files are unchanged by the learning-test options, and `--init trained-like`
gives the structure its docstring promises (pass-through transformer, narrow unit-variance AE posterior)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from library.models.autoencoder import load_ae
from tools.make_tiny_models import POSTERIOR_STD, main, make_tiny_models


def test_default_files_are_deterministic_and_independent_of_new_options(tmp_path):
    a = make_tiny_models(tmp_path / "a", seed=3)
    b = make_tiny_models(tmp_path / "b", seed=3, init="random", hidden_size=None)
    for role in ("flux", "ae"):
        ta, tb = load_file(str(a[role])), load_file(str(b[role]))
        assert ta.keys() == tb.keys()
        assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_trained_like_transformer_passes_the_latent_through(tmp_path):
    paths = make_tiny_models(tmp_path, init="trained-like", hidden_size=128)
    sd = load_file(str(paths["flux"]))
    img_in, final = sd["img_in.weight"], sd["final_layer.linear.weight"]
    assert img_in.shape == (128, 64) and final.shape == (64, 128)
    torch.testing.assert_close(final @ img_in, torch.eye(64), atol=1e-5, rtol=0)
    assert not sd["final_layer.adaLN_modulation.1.weight"].any()
    assert sd["double_blocks.0.img_attn.qkv.weight"].shape == (3 * 128, 128)


def test_trained_like_ae_has_a_narrow_posterior_and_unit_variance_latents(tmp_path):
    paths = make_tiny_models(tmp_path, init="trained-like")
    ae = load_ae(paths["ae"], dtype=torch.float32)
    g = torch.Generator().manual_seed(11)
    images = torch.nn.functional.interpolate(torch.rand(4, 3, 4, 4, generator=g) * 2 - 1, size=(64, 64))
    with torch.no_grad():
        mean = ae.encode(images, sample=False)
        samples = ae.encode(images, sample=True, generator=torch.Generator().manual_seed(0))
    assert 0.3 < mean.std().item() < 3.0  # calibrated on other images: unit variance up to the sample
    noise = (samples - mean).std().item()
    assert noise == pytest.approx(POSTERIOR_STD, rel=0.2)


def test_bad_hidden_size_and_init_are_refused(tmp_path):
    with pytest.raises(ValueError, match="multiple of the head size"):
        make_tiny_models(tmp_path, hidden_size=100)
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--init", "nonsense"])


def test_fitted_ae_keeps_decoding_through_the_calibration():
    """fit_ae trains the AE; the trained-like calibration then rescales the latents and `keep_decoding` folds the
    inverse into the decoder's conv_in, whose output is then unchanged (exactly away from its zero-padded border)."""
    from library.models.autoencoder import AE_PRESETS, AutoEncoder
    from tools.make_tiny_models import fit_ae, init_trained_like_ae, synthetic_shapes

    torch.manual_seed(0)
    ae = AutoEncoder(AE_PRESETS["tiny"])
    losses = fit_ae(ae, steps=3, size=16, batch=2)
    assert len(losses) == 3 and all(map(torch.isfinite, torch.tensor(losses)))
    images = synthetic_shapes(2, 64, torch.Generator().manual_seed(5))
    assert images.shape == (2, 3, 64, 64) and images.min() >= -1 and images.max() <= 1
    with torch.no_grad():
        before = ae.decoder.conv_in(ae.encoder(images)[:, :16])
    init_trained_like_ae(ae, keep_decoding=True)
    with torch.no_grad():
        latents = ae.encode(images)
        after = ae.decoder.conv_in(latents / ae.params.scale_factor + ae.params.shift_factor)
    assert latents.std().item() == pytest.approx(1.0, rel=0.7)  # rescaled: unit variance on other images
    torch.testing.assert_close(after[..., 1:-1, 1:-1], before[..., 1:-1, 1:-1], atol=1e-4, rtol=1e-4)


def test_fit_ae_steps_needs_trained_like(tmp_path):
    with pytest.raises(ValueError, match="trained-like"):
        make_tiny_models(tmp_path, fit_ae_steps=1)


def test_kontext_file_has_dev_weights_and_names_kontext_in_its_metadata(tmp_path):
    """`model_type="kontext"`: the dev file's tensors with `modelspec.architecture: flux-1-kontext-dev`, so a
    loader that reads the metadata calls it Kontext (keys alone would say dev)."""
    from library.models.checkpoint import analyze_checkpoint
    from library.models.variants import resolve_variant

    dev = make_tiny_models(tmp_path / "dev", seed=2)
    assert main(["--out", str(tmp_path / "kontext"), "--seed", "2", "--model_type", "kontext"]) == 0
    kontext = tmp_path / "kontext" / "flux.safetensors"
    a, b = load_file(str(dev["flux"])), load_file(str(kontext))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    info = analyze_checkpoint(kontext)
    assert info.metadata["modelspec.architecture"] == "flux-1-kontext-dev"
    assert resolve_variant("flux", has_guidance_input=info.params.guidance_embed, metadata=info.metadata).name \
        == "kontext"
    dev_info = analyze_checkpoint(dev["flux"])
    assert resolve_variant(None, has_guidance_input=True, metadata=dev_info.metadata).name == "dev"
    with pytest.raises(ValueError, match="model_type 'kontext': expected dev, krea or kontext with the tiny"):
        make_tiny_models(tmp_path / "s", preset="tiny-schnell", model_type="kontext")
