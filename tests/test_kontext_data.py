"""FLUX.1 Kontext datasets: reference images matched by stem, every problem reported at once, preferred-size buckets,
references fitted to their target's bucket, and their cached latents (posterior mean, same staleness rules)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library import flux_utils
from library.data.arguments import add_dataset_arguments
from library.data.buckets import BucketPlanner, scaled_bucket_sizes
from library.data.config import DatasetConfigError, load_dataset_config
from library.data.datasets import EpochBatchSampler, build_datasets
from library.data.images import BadImageError
from library.data.latent_cache import LatentCache, encode_latents
from library.data.tensors import to_tensor
from library.models.kontext import PREFERRED_KONTEXT_RESOLUTIONS, snap_to_preferred
from tools.make_tiny_models import make_tiny_models

KONTEXT = dict(support_reference=True, reference_buckets=PREFERRED_KONTEXT_RESOLUTIONS)


def make_image(path: Path, size, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def load(tmp_path, toml: str, **kinds):
    path = tmp_path / "dataset.toml"
    path.write_text(toml)
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    return load_dataset_config(parser.parse_args(["--dataset_config", str(path)]), **kinds)


@pytest.fixture
def edit_data(tmp_path):
    """Targets a, b, c with references a.jpg (one), b_0/b_1 (two), c (one); and plain text-to-image images."""
    for name, size in (("a", (128, 128)), ("b", (128, 128)), ("c", (160, 96))):
        make_image(tmp_path / "targets" / f"{name}.png", size, seed=ord(name))
        (tmp_path / "targets" / f"{name}.txt").write_text(f"edit {name}")
    make_image(tmp_path / "refs" / "a.jpg", (100, 100), seed=1)
    make_image(tmp_path / "refs" / "b_0.png", (128, 96), seed=2)
    make_image(tmp_path / "refs" / "b_1.png", (96, 128), seed=3)
    make_image(tmp_path / "refs" / "c.png", (160, 96), seed=4)
    for i in range(2):
        make_image(tmp_path / "t2i" / f"p{i}.png", (128, 128), seed=10 + i)
        (tmp_path / "t2i" / f"p{i}.txt").write_text("a picture")
    return tmp_path


def toml(tmp_path, key="reference_image_dir", batch_size=2, extra=""):
    return f"""
[general]
resolution = 128
batch_size = {batch_size}
caption_extension = ".txt"
[[datasets]]
[[datasets.subsets]]
image_dir = "{tmp_path / 'targets'}"
{key} = "{tmp_path / 'refs'}"
{extra}
[[datasets.subsets]]
image_dir = "{tmp_path / 't2i'}"
"""


def test_references_match_by_stem_and_alias(edit_data):
    for key in ("reference_image_dir", "control_directory"):
        config = load(edit_data, toml(edit_data, key), **KONTEXT)
        group, _ = build_datasets(config, seed=1)
        refs = {i.absolute_path.name: [p.name for p in i.reference_paths] for i in group.items}
        assert refs == {"a.png": ["a.jpg"], "b.png": ["b_0.png", "b_1.png"], "c.png": ["c.png"], "p0.png": [],
                        "p1.png": []}
        sizes = {i.absolute_path.name: i.reference_sizes for i in group.items}
        assert sizes["b.png"] == ((128, 96), (96, 128))


def test_batches_never_mix_and_references_fit_the_target_bucket(edit_data):
    group, _ = build_datasets(load(edit_data, toml(edit_data, batch_size=4), **KONTEXT), seed=1)
    seen = set()
    for key in EpochBatchSampler(group):
        batch = group[key]
        names = {Path(k).name for k in batch.image_keys}
        seen |= names
        if names <= {"p0.png", "p1.png"}:
            assert batch.reference_images is None and batch.reference_latents is None
            continue
        n_refs = {"a.png": 1, "b.png": 2, "c.png": 1}
        assert len({n_refs[n] for n in names}) == 1  # one number of references per batch
        b, r, c, h, w = batch.reference_images.shape
        assert (b, c, h, w) == (len(names), 3, *batch.images.shape[-2:]) and r == n_refs[next(iter(names))]
    assert seen == {"a.png", "b.png", "c.png", "p0.png", "p1.png"}


def test_reference_is_resized_to_cover_and_centre_cropped(edit_data):
    group, _ = build_datasets(load(edit_data, toml(edit_data, batch_size=1), **KONTEXT), seed=1)
    ds = group.datasets[0]
    item = next(i for i in group.items if i.absolute_path.name == "a.png")
    assert item.bucket_reso == (128, 128)
    index = next(k for k in EpochBatchSampler(group) if Path(group[k].image_keys[0]).name == "a.png")
    batch = group[index]
    ref = np.asarray(Image.open(edit_data / "refs" / "a.jpg").convert("RGB").resize((128, 128), Image.LANCZOS))
    assert torch.allclose(batch.reference_images[0, 0], to_tensor(ref), atol=2 / 127.5)
    assert ds.planner.predefined_resos == scaled_bucket_sizes(PREFERRED_KONTEXT_RESOLUTIONS, (128, 128))


def test_kontext_buckets_are_the_preferred_sizes_scaled():
    assert scaled_bucket_sizes(PREFERRED_KONTEXT_RESOLUTIONS, (1024, 1024)) == list(PREFERRED_KONTEXT_RESOLUTIONS)
    half = scaled_bucket_sizes(PREFERRED_KONTEXT_RESOLUTIONS, (512, 512))
    assert half[0] == (336, 784) and half[8] == (512, 512) and len(half) == 17
    assert all(w % 16 == 0 and h % 16 == 0 and w * h <= 1.01 * 512 * 512 for w, h in half)
    planner = BucketPlanner.fixed(list(PREFERRED_KONTEXT_RESOLUTIONS))
    for size in ((1000, 1000), (1920, 1080), (1080, 1920), (3000, 1000), (700, 1600)):
        assert planner.select(size).bucket_reso == snap_to_preferred(*size)  # BFL's rule at 1 MP


def test_every_missing_or_unreadable_reference_is_listed(edit_data):
    os.remove(edit_data / "refs" / "a.jpg")
    (edit_data / "refs" / "c.png").write_bytes((edit_data / "refs" / "c.png").read_bytes()[:60])  # truncated
    make_image(edit_data / "targets" / "d.png", (128, 128))
    make_image(edit_data / "refs" / "d.png", (64, 64))
    make_image(edit_data / "refs" / "d_0.png", (64, 64))  # ambiguous: one reference or numbered ones
    with pytest.raises(BadImageError) as e:
        build_datasets(load(edit_data, toml(edit_data), **KONTEXT), seed=1)
    text = str(e.value)
    assert "3 images cannot be used" in text
    assert "a.png: no reference image a.<ext> or a_0.<ext>" in text
    assert "c.png" in text and "(reference image of c.png)" in text
    assert "both d.png and d_0.png" in text


def test_reference_keys_are_checked(edit_data):
    with pytest.raises(DatasetConfigError, match="--model_type kontext"):
        load(edit_data, toml(edit_data))
    both = toml(edit_data, extra=f'control_directory = "{edit_data / "refs"}"')
    with pytest.raises(DatasetConfigError, match="'control_directory' and 'reference_image_dir'"):
        load(edit_data, both, **KONTEXT)
    with pytest.raises(DatasetConfigError, match="'random_crop' cannot be used with 'reference_image_dir'"):
        load(edit_data, toml(edit_data, extra="random_crop = true"), **KONTEXT)
    with pytest.raises(DatasetConfigError, match="'color_aug' cannot be used with 'reference_image_dir'"):
        load(edit_data, toml(edit_data, extra="color_aug = true"), **KONTEXT)
    missing = toml(edit_data).replace(str(edit_data / "refs"), str(edit_data / "nowhere"))
    with pytest.raises(DatasetConfigError, match="'reference_image_dir' folder .*nowhere' does not exist"):
        load(edit_data, missing, **KONTEXT)


@pytest.fixture(scope="module")
def tiny_ae(tmp_path_factory):
    paths = make_tiny_models(tmp_path_factory.mktemp("tiny"))
    return flux_utils.load_ae(paths["ae"], torch.float32, "cpu").eval()


def test_reference_latents_are_cached_as_the_mean_with_staleness(edit_data, tiny_ae):
    group, _ = build_datasets(load(edit_data, toml(edit_data, batch_size=1), **KONTEXT), seed=1)
    ds = group.datasets[0]
    seen = []
    hook = tiny_ae.encoder.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
    try:
        cache = LatentCache(True, "ae-1", batch_size=4)
        assert cache.cache(ds.latent_items, tiny_ae, ds.load_pixels, "cpu", torch.float32) == 5 + 4
        assert cache.cache(ds.latent_items, tiny_ae, ds.load_pixels, "cpu", torch.float32) == 0
        # an edited reference (same size) is re-encoded, nothing else
        make_image(edit_data / "refs" / "b_1.png", (96, 128), seed=99)
        assert cache.cache(ds.latent_items, tiny_ae, ds.load_pixels, "cpu", torch.float32) == 1
        # another autoencoder: every entry, references included
        assert LatentCache(True, "ae-2").cache(ds.latent_items, tiny_ae, ds.load_pixels, "cpu", torch.float32) == 9
    finally:
        hook.remove()
    group.attach(latent_cache=LatentCache(True, "ae-2"))
    item = next(i for i in ds.items if i.absolute_path.name == "b.png")
    ref = item.reference_items()[1]
    assert Path(LatentCache(True, "ae-2").npz_path(ref)).parent == edit_data / "refs"
    pixels = to_tensor(ds.load_pixels(ref)[0])[None]
    mean = encode_latents(tiny_ae, pixels)
    key = next(k for k in EpochBatchSampler(group) if Path(group[k].image_keys[0]).name == "b.png")
    batch = group[key]
    assert batch.images is None and batch.reference_latents.shape == (1, 2, 16, 16, 16)
    torch.testing.assert_close(batch.reference_latents[0, 1], mean[0], rtol=1e-4, atol=1e-4)
    sampled = encode_latents(tiny_ae, to_tensor(ds.load_pixels(item)[0])[None])
    assert not torch.allclose(batch.latents[0], sampled[0], atol=1e-3)  # targets keep sd-scripts' sampling


def test_inspect_dataset_shows_kontext_buckets_and_missing_references(edit_data, capsys):
    from tools.inspect_dataset import main

    config = edit_data / "dataset.toml"
    config.write_text(toml(edit_data))
    assert main(["--dataset_config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "buckets: FLUX.1 Kontext's preferred sizes" in out and f"references from {edit_data / 'refs'}" in out
    assert "  2 reference(s) each" in out and "  1 reference(s) each" in out
    os.remove(edit_data / "refs" / "c.png")
    assert main(["--dataset_config", str(config)]) == 1
    assert "c.png: no reference image c.<ext> or c_0.<ext>" in capsys.readouterr().err


def test_example_kontext_configs_stay_valid(tmp_path, monkeypatch):
    import shutil

    from conftest import ROOT
    from library.training.arguments import training_parser, verify_training_args
    from library.training.config_file import read_config_from_file
    from library.training.recipes.command_lines import LORA

    for folder in ("edits/targets", "edits/sources", "plain"):
        make_image(tmp_path / folder / "a.png", (64, 64))
    monkeypatch.chdir(tmp_path)  # paths in the examples are relative to the launch folder
    parser = training_parser(LORA)
    argv = ["--dataset_config", str(ROOT / "configs" / "dataset_kontext.toml")]
    group = load_dataset_config(parser.parse_args(argv), **KONTEXT)
    kontext, plain = group.datasets
    assert kontext.bucket_sizes == PREFERRED_KONTEXT_RESOLUTIONS and plain.bucket_sizes is None
    assert kontext.subsets[0].reference_image_dir == Path("edits/sources")
    config = tmp_path / "kontext_lora.toml"
    shutil.copy(ROOT / "configs" / "kontext_lora.toml", config)
    argv = ["--config_file", str(config)]
    args = read_config_from_file(parser.parse_args(argv), parser, argv)
    assert args.model_type == "kontext" and args.guidance_scale is None and args.network_dim == 16
    verify_training_args(args, LORA)
