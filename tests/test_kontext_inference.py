"""FLUX.1 Kontext inference: BFL's size rules against diffusers' pipeline code, reference ids against BFL's
`prepare_kontext` formulas, the sampler against diffusers' FluxKontextPipeline on tiny weights, and the command line
(library/flow/references.py, library/models/kontext.py, flux_minimal_inference.py)."""

from __future__ import annotations

import argparse

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from library.flow.generation import FluxModels, GenerationSettings, Placement, generate_latents
from library.flow.references import (DEFAULT_SIZE, bind_references, encode_references, load_reference,
                                     multi_reference_warning, reference_size, target_size)
from library.flow.sampling import Conditioning, get_noise
from library.models.autoencoder import load_ae
from library.models.kontext import PREFERRED_KONTEXT_RESOLUTIONS, KontextFlux, snap_to_preferred
from library.models.loading import load_flow_model
from library.models.packing import pack_latents
from library.models.variants import VARIANTS
from tools.make_tiny_models import make_tiny_models

import flux_minimal_inference as cli


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_models(tmp_path_factory.mktemp("kontext"), model_type="kontext")


def write_image(path: Path, width: int, height: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# (b) size rules


def diffusers_kontext_module():
    import diffusers.pipelines.flux.pipeline_flux_kontext as module

    return module


def test_preferred_sizes_are_the_pipelines_and_snapping_follows_its_rule():
    """Our list equals the installed pipeline's constant; the rule is recomputed as the pipeline's `__call__` and
    BFL's `prepare_kontext` write it: min over (|aspect - w/h|, w, h) tuples (ties: the smaller width), floored to 16
    (BFL: 16 * int(w / 16))."""
    theirs = diffusers_kontext_module().PREFERRED_KONTEXT_RESOLUTIONS
    assert list(PREFERRED_KONTEXT_RESOLUTIONS) == [tuple(r) for r in theirs]
    rng = random.Random(0)
    sizes = [(rng.randint(16, 5000), rng.randint(16, 5000)) for _ in range(3000)]
    sizes += [(k * w, k * h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS for k in (1, 2)]
    sizes += [(1, 1), (1, 1000), (1000, 1), (4000, 3000), (1920, 1080), (1080, 1920), (512, 512)]
    for (w1, h1), (w2, h2) in zip(PREFERRED_KONTEXT_RESOLUTIONS, PREFERRED_KONTEXT_RESOLUTIONS[1:]):
        sizes.append((w1 * h2 + w2 * h1, 2 * h1 * h2))  # aspect midway between neighbours: a tie in exact arithmetic
    for width, height in sizes:
        aspect = width / height
        _, w, h = min((abs(aspect - pw / ph), pw, ph) for pw, ph in PREFERRED_KONTEXT_RESOLUTIONS)
        assert snap_to_preferred(width, height) == (w // 16 * 16, h // 16 * 16) == (16 * int(w / 16), 16 * int(h / 16))
        assert reference_size(width, height) == snap_to_preferred(width, height)


def test_reference_resize_none_floors_to_16_and_tiny_ones_are_refused():
    assert reference_size(50, 37, "none") == (48, 32)
    assert reference_size(1024, 768, "none") == (1024, 768)
    with pytest.raises(ValueError, match="a 15x40 reference is smaller than 16x16"):
        reference_size(15, 40, "none")
    with pytest.raises(ValueError, match="reference resize 'crop'"):
        reference_size(64, 64, "crop")


def test_target_size_rules():
    """BFL: no size given -> the first reference's encoded size; one side given -> the other keeps its aspect."""
    class Refs:
        size = (1248, 832)

    assert target_size(None, None, Refs) == (1248, 832)
    assert target_size(512, 384, Refs) == (512, 384)
    assert target_size(624, None, Refs) == (624, 416)
    assert target_size(None, 416, Refs) == (624, 416)
    assert target_size(None, None) == DEFAULT_SIZE == (1360, 768)
    assert target_size(640, None) == (640, 768)
    # BFL's aspect_ratio option: w = round(sqrt(A * r)), h = round(sqrt(A / r)) at A = 1024^2, floored to 16
    assert target_size(None, None, Refs, aspect_ratio=16 / 9) == (1365 // 16 * 16, 768) == (1360, 768)
    assert target_size(None, None, Refs, aspect_ratio=1.0) == (1024, 1024)
    assert target_size(512, 384, Refs, aspect_ratio=1.0) == (512, 384)  # a given size wins


def test_aspect_ratio_option_parses_ratios():
    assert cli.aspect_ratio("16:9") == 16 / 9 and cli.aspect_ratio("1.5") == 1.5
    for bad in ("0:1", "a:b", "100"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected W:H"):
            cli.aspect_ratio(bad)


def test_snapped_reference_pixels_equal_the_pipelines_preprocessing(tmp_path):
    """Our resize (PIL Lanczos) and [-1, 1] scaling of a snapped reference equal diffusers' image processor on the
    size its pipeline picks."""
    from diffusers.image_processor import VaeImageProcessor

    path = write_image(tmp_path / "r.png", 300, 410, seed=3)
    pixels, source, size = load_reference(str(path))
    assert source == (300, 410) and size == (880, 1184) and pixels.shape == (1, 3, 1184, 880)
    processor = VaeImageProcessor(vae_scale_factor=16)  # FluxKontextPipeline's: AE factor 8 x the 2x2 patches
    image = processor.resize(Image.open(path), 1184, 880)
    expected = processor.preprocess(image, 1184, 880)
    torch.testing.assert_close(pixels, expected, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# (c) tokens and ids


def bfl_kontext_ids(packed_height: int, packed_width: int) -> torch.Tensor:
    """BFL's prepare_kontext: ids (1, row, col) over the reference's own grid, rows major."""
    ids = np.zeros((packed_height, packed_width, 3), np.float32)
    for row in range(packed_height):
        for col in range(packed_width):
            ids[row, col] = (1, row, col)
    return torch.from_numpy(ids.reshape(1, -1, 3))


def bfl_pack(latents: torch.Tensor) -> torch.Tensor:
    """`b c (h ph) (w pw) -> b (h w) (c ph pw)` with 2x2 patches, written out with loops."""
    b, c, height, width = latents.shape
    out = torch.empty(b, (height // 2) * (width // 2), c * 4)
    for i in range(height // 2):
        for j in range(width // 2):
            patch = latents[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2]  # (b, c, ph, pw)
            out[:, i * (width // 2) + j] = patch.reshape(b, -1)
    return out


def test_reference_tokens_and_ids_follow_bfl(tiny, tmp_path):
    """One reference: tokens = pack(AE mean of the resized image), ids = BFL's (1, row, col). Two: 'overlap' repeats
    each grid from (1, 0, 0); 'columns' starts the second one's columns after the first one's width."""
    ae = load_ae(tiny["ae"], torch.float32, "cpu")
    a = write_image(tmp_path / "a.png", 50, 37, seed=1)  # -> 48 x 32: latent 6 x 4, grid 3 x 2
    b = write_image(tmp_path / "b.png", 33, 64, seed=2)  # -> 32 x 64: latent 4 x 8, grid 4 x 2
    one = encode_references([str(a)], ae, resize="none")
    pixels, _, _ = load_reference(str(a), "none")
    with torch.no_grad():
        latents = ae.encode(pixels)  # scaled posterior mean
        moments = ae.encoder(pixels)
    mean = (moments[:, :16] - ae.params.shift_factor) * ae.params.scale_factor
    torch.testing.assert_close(latents, mean)
    assert one.sizes == ((48, 32),) and one.source_sizes == ((50, 37),)
    torch.testing.assert_close(one.tokens, bfl_pack(latents))
    assert torch.equal(one.ids, bfl_kontext_ids(2, 3))
    assert multi_reference_warning(one) is None

    overlap = encode_references([str(a), str(b)], ae, resize="none", layout="overlap")
    assert torch.equal(overlap.ids, torch.cat([bfl_kontext_ids(2, 3), bfl_kontext_ids(4, 2)], dim=1))
    columns = encode_references([str(a), str(b)], ae, resize="none", layout="columns")
    shifted = bfl_kontext_ids(4, 2)
    shifted[..., 2] += 3
    assert torch.equal(columns.ids, torch.cat([bfl_kontext_ids(2, 3), shifted], dim=1))
    assert torch.equal(columns.tokens, overlap.tokens) and columns.tokens.shape == (1, 6 + 8, 64)
    assert "2 reference images" in multi_reference_warning(columns) and "columns" in multi_reference_warning(columns)
    assert overlap.png_text() == {"reference_images": f"{a};{b}", "reference_sizes": "48x32;32x64",
                                  "reference_resize": "none", "reference_layout": "overlap"}
    with pytest.raises(ValueError, match="reference image .*missing.png: file not found"):
        encode_references([str(tmp_path / "missing.png")], ae)


def test_reference_encoder_encodes_each_new_set_once(tiny, tmp_path, monkeypatch):
    import library.flow.references as references

    calls = []
    real = references.encode_references
    monkeypatch.setattr(references, "encode_references",
                        lambda paths, *a, **k: calls.append(paths) or real(paths, *a, **k))
    a, b = str(write_image(tmp_path / "a.png", 40, 40)), str(write_image(tmp_path / "b.png", 32, 32))
    encoder = references.ReferenceEncoder(load_ae(tiny["ae"], torch.float32, "cpu"), resize="none")
    first = encoder([a])
    assert encoder((a,)) is first and encoder([]) is None and encoder([a]) is first
    assert encoder([a, b]).sizes == ((32, 32), (32, 32)) and encoder([a]) is not first
    assert calls == [(a,), (a, b), (a,)]


# ---------------------------------------------------------------------------------------------------------------
# (a) the sampler against diffusers' FluxKontextPipeline


def diffusers_ae(ae):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    p = ae.params
    n = len(p.ch_mult)
    ref = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(p.ch * m for m in p.ch_mult),
                        layers_per_block=p.num_res_blocks, latent_channels=p.z_channels, norm_num_groups=32,
                        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=p.scale_factor,
                        shift_factor=p.shift_factor).eval()
    ref.load_state_dict(convert_ldm_vae_checkpoint(dict(ae.state_dict()), ref.config), strict=True)
    return ref


SMALL_PREFERRED = ((32, 80), (48, 64), (64, 48), (80, 32))  # stand-ins for the ~1 MP list, for both sides


@pytest.mark.parametrize("resize", ["none", "preferred"])
def test_sampler_equals_diffusers_kontext_pipeline(tiny, tmp_path, monkeypatch, resize, steps=4):
    """Same tiny weights, prompt embeddings, initial latents and reference: our KontextFlux-bound sampler (the
    target's shift, the AE mean, ids (1, r, c), target-only prediction) ends where FluxKontextPipeline does.
    `none` is the pipeline's `_auto_resize=False`; `preferred` its `_auto_resize=True`, with both sides' preferred
    lists replaced by small sizes (the real ~1 MP list is compared on its own above)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline

    from model_helpers import diffusers_reference

    if resize == "preferred":
        monkeypatch.setattr("library.models.kontext.PREFERRED_KONTEXT_RESOLUTIONS", SMALL_PREFERRED)
        monkeypatch.setattr(diffusers_kontext_module(), "PREFERRED_KONTEXT_RESOLUTIONS", list(SMALL_PREFERRED))

    _, flux = load_flow_model(tiny["flux"], torch.float32, "cpu")
    ae = load_ae(tiny["ae"], torch.float32, "cpu")
    flux.eval()
    width, height, seed = 64, 48, 5
    ref_path = write_image(tmp_path / "ref.png", 50, 37, seed=7)
    g = torch.Generator().manual_seed(0)
    cond = Conditioning(torch.randn(1, 7, flux.params.context_in_dim, generator=g),
                        torch.randn(1, flux.params.vec_in_dim, generator=g), torch.zeros(1, 7, 3))
    refs = encode_references([str(ref_path)], ae, resize=resize)
    assert refs.size == {"none": (48, 32), "preferred": (64, 48)}[resize]
    models = FluxModels(bind_references(flux, refs), ae, None, None, None, VARIANTS["kontext"], torch.float32)
    settings = GenerationSettings(prompt="", width=width, height=height, steps=steps, seed=seed)
    import library.flow.generation as generation

    counted = []
    real_schedule = generation.get_schedule
    monkeypatch.setattr(generation, "get_schedule", lambda n, length, **k: counted.append(length) or
                        real_schedule(n, length, **k))
    ours = generate_latents(models, settings, cond, None, Placement("cpu", False), progress=False)
    assert counted == [(height // 16) * (width // 16)] and refs.tokens.shape[1] > 0  # the target's tokens only
    assert settings.resolved_guidance(VARIANTS["kontext"]) == 2.5

    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxKontextPipeline(scheduler=scheduler, vae=diffusers_ae(ae), text_encoder=None, tokenizer=None,
                               text_encoder_2=None, tokenizer_2=None, transformer=diffusers_reference(flux))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = pipe(image=Image.open(ref_path), prompt_embeds=cond.txt, pooled_prompt_embeds=cond.y,
                      latents=get_noise(1, height, width, seed), height=height, width=width,
                      max_area=width * height, _auto_resize=resize == "preferred", num_inference_steps=steps,
                      guidance_scale=2.5, output_type="latent").images
    assert theirs.shape == (1, (height // 16) * (width // 16), 64)
    torch.testing.assert_close(pack_latents(ours), theirs, atol=2e-5, rtol=1e-5)

    # the references matter, and unbinding gives plain text-to-image again
    plain = generate_latents(FluxModels(bind_references(models.flux, None), ae, None, None, None, VARIANTS["kontext"],
                                        torch.float32), settings, cond, None, Placement("cpu", False), progress=False)
    assert isinstance(models.flux, KontextFlux) and (plain - ours).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# (d) the command line


def cli_args(tiny, out, *extra):
    return ["--ckpt_path", str(tiny["flux"]), "--ae", str(tiny["ae"]), "--clip_l", str(tiny["clip_l"]),
            "--t5xxl", str(tiny["t5xxl"]), "--tokenizer_cache_dir", str(tiny["tokenizers"]), "--dtype", "fp32",
            "--output_dir", str(out), "--seed", "3", *extra]


def run_cli(args, **kwargs):
    return subprocess.run([sys.executable, str(ROOT / "flux_minimal_inference.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300, **kwargs)


def only_png(folder: Path) -> Image.Image:
    files = sorted(folder.glob("*.png"))
    assert len(files) == 1, files
    return Image.open(files[0])


def test_cli_kontext_target_takes_the_references_size_with_kontext_defaults(tiny, tmp_path, caplog):
    """--model_type kontext --reference_image: 30 steps and guidance 2.5 by default, the target at the reference's
    encoded size (here unsnapped: 50x37 -> 48x32), the references in the PNG text; the file's metadata alone gives
    the same image."""
    ref = write_image(tmp_path / "ref.png", 50, 37)
    with caplog.at_level("INFO"):
        assert cli.main(cli_args(tiny, tmp_path / "a", "--model_type", "kontext", "--reference_image", str(ref),
                                 "--reference_resize", "none")) == 0
    image = only_png(tmp_path / "a")
    assert image.size == (48, 32)
    assert (image.text["steps"], image.text["guidance"]) == ("30", "2.5")
    assert image.text["reference_images"] == str(ref) and image.text["reference_sizes"] == "48x32"
    assert image.text["reference_resize"] == "none" and "reference_layout" not in image.text
    assert f"Reference images: {ref}" in image.text["parameters"]
    assert f"{ref} 50x37 -> 48x32" in caplog.text
    # --model_type left at flux: the file's modelspec.architecture says Kontext
    caplog.clear()
    with caplog.at_level("INFO"):
        assert cli.main(cli_args(tiny, tmp_path / "b", "--reference_image", str(ref), "--reference_resize",
                                 "none")) == 0
    assert "model: kontext (flux-1-kontext-dev)" in caplog.text
    assert np.array_equal(np.asarray(only_png(tmp_path / "b")), np.asarray(image))
    # another reference gives another image; given sizes win over the reference's
    other = write_image(tmp_path / "other.png", 50, 37, seed=9)
    assert cli.main(cli_args(tiny, tmp_path / "c", "--reference_image", str(other), "--reference_resize", "none",
                             "--width", "64", "--height", "48")) == 0
    assert only_png(tmp_path / "c").size == (64, 48)


def test_cli_snaps_references_to_the_preferred_size(tiny, tmp_path):
    """BFL's default: a 300x200 reference is encoded at 1248x832 (here with a small given target and one step to
    stay fast; the target's own default is that size, test_target_size_rules)."""
    ref = write_image(tmp_path / "ref.png", 300, 200)
    assert cli.main(cli_args(tiny, tmp_path / "a", "--reference_image", str(ref), "--width", "32", "--height", "32",
                             "--steps", "1")) == 0
    image = only_png(tmp_path / "a")
    assert image.size == (32, 32) and image.text["reference_sizes"] == "1248x832"
    assert image.text["reference_resize"] == "preferred"


def test_cli_several_references_warn_and_record_their_layout(tiny, tmp_path, caplog):
    a, b = write_image(tmp_path / "a.png", 50, 37), write_image(tmp_path / "b.png", 32, 64, seed=1)
    with caplog.at_level("INFO"):
        assert cli.main(cli_args(tiny, tmp_path / "o", "--reference_image", str(a), str(b), "--reference_layout",
                                 "columns", "--reference_resize", "none", "--steps", "2",
                                 "--apply_t5_attn_mask")) == 0  # the mask is extended over the reference tokens
    image = only_png(tmp_path / "o")
    assert image.size == (48, 32)  # the first reference's
    assert (image.text["reference_images"], image.text["reference_sizes"]) == (f"{a};{b}", "48x32;32x64")
    assert image.text["reference_layout"] == "columns"
    assert "2 reference images: FLUX.1 Kontext was trained with one" in caplog.text


def test_cli_kontext_without_reference_is_text_to_image(tiny, tmp_path, caplog):
    with caplog.at_level("INFO"):
        assert cli.main(cli_args(tiny, tmp_path, "--width", "32", "--height", "48", "--steps", "2")) == 0
    assert "Kontext without --reference_image: plain text-to-image" in caplog.text
    image = only_png(tmp_path)
    assert image.size == (32, 48) and "reference_images" not in image.text


def test_cli_mismatches_are_one_line_errors(tiny, tmp_path):
    ref = write_image(tmp_path / "ref.png", 40, 40)
    dev = make_tiny_models(tmp_path / "dev")
    cases = [
        (cli_args(dev, tmp_path / "o", "--reference_image", str(ref)),
         f"--reference_image needs a Kontext model, but {dev['flux']} is dev"),
        (cli_args(tiny, tmp_path / "o", "--model_type", "schnell"),
         f"--model_type schnell does not fit {tiny['flux']}: it has a guidance embedder"),
        (cli_args(tiny, tmp_path / "o", "--reference_image", str(tmp_path / "nope.png")),
         f"--reference_image {tmp_path / 'nope.png'}: file not found"),
    ]
    for args, message in cases:
        r = run_cli(args)
        assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(f"error: {message}"), r.stderr
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.png"))


def test_interactive_reference_option_persists_and_clears(tiny, tmp_path):
    ref = write_image(tmp_path / "ref.png", 50, 37)
    lines = f"edit it --ri {ref} --d 1 --s 2\nagain --d 2\nplain --ri - --w 32 --h 32 --d 3\n\n"
    r = run_cli(cli_args(tiny, tmp_path / "out", "--interactive", "--reference_resize", "none"), input=lines)
    assert r.returncode == 0, r.stderr
    images = {im.text["prompt"]: im for im in map(Image.open, sorted((tmp_path / "out").glob("*.png")))}
    assert set(images) == {"edit it", "again", "plain"}
    assert images["edit it"].size == images["again"].size == (48, 32)  # the reference's size, kept
    assert images["again"].text["reference_images"] == str(ref) and images["again"].text["steps"] == "2"
    assert images["plain"].size == (32, 32) and "reference_images" not in images["plain"].text


def test_parse_interactive_reference_option():
    s = GenerationSettings(prompt="x", width=None, height=None)
    s = cli.parse_interactive_line("a --ri one.png; two dir/b.png", s)
    assert s.reference_images == ("one.png", "two dir/b.png") and s.width is None
    assert cli.parse_interactive_line("b", s).reference_images == ("one.png", "two dir/b.png")
    assert cli.parse_interactive_line("c --ri -", s).reference_images == ()
    with pytest.raises(ValueError, match="--ri needs a path or ;-separated paths"):
        cli.parse_interactive_line("d --ri ;", s)
