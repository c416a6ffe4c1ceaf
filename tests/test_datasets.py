"""Datasets end to end: config -> items -> buckets -> batches, epochs, repeats, regularisation, caches."""

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.data.arguments import add_dataset_arguments
from library.data.config import SubsetConfig, load_dataset_config
from library.data.datasets import (EpochBatchSampler, build_datasets, max_train_steps_for, num_train_epochs,
                                   steps_per_epoch)
from library.data.images import BadImageError
from library.data.items import ImageItem


def make_image(path: Path, size, color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    pixels[..., 0] = color[0]
    Image.fromarray(pixels).save(path)


def parse(argv):
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    return parser.parse_args(argv)


def bucket_of(group, image_key: str) -> tuple[int, int]:
    """(width, height) of the bucket the group put the image in."""
    return next(i.bucket_reso for i in group.items if str(i.absolute_path) == image_key)


def write_config(tmp_path, body: str) -> Path:
    path = tmp_path / "dataset.toml"
    path.write_text(body)
    return path


@pytest.fixture
def dataset_dir(tmp_path):
    train = tmp_path / "train"
    for i, size in enumerate([(96, 64), (64, 96), (80, 80), (128, 64)]):
        make_image(train / f"img{i}.png", size)
        (train / f"img{i}.txt").write_text(f"photo of sks, tag{i}, extra")
    reg = tmp_path / "reg"
    for i in range(2):
        make_image(reg / f"reg{i}.jpg", (64, 64))
    return tmp_path


def build(tmp_path, toml: str, *argv, seed=42):
    args = parse(["--dataset_config", str(write_config(tmp_path, toml)), *argv])
    group_config = load_dataset_config(args)
    return build_datasets(group_config, seed)


BASIC = """
[general]
resolution = 64
enable_bucket = true
min_bucket_reso = 32
max_bucket_reso = 128
bucket_reso_steps = 16
caption_extension = ".txt"
[[datasets]]
batch_size = 2
  [[datasets.subsets]]
  image_dir = "{train}"
  num_repeats = 3
  [[datasets.subsets]]
  image_dir = "{reg}"
  is_reg = true
  class_tokens = "a photo"
"""


def test_buckets_repeats_and_regularisation_balance(dataset_dir):
    train, val = build(dataset_dir, BASIC.format(train=dataset_dir / "train", reg=dataset_dir / "reg"))
    assert val is None
    (ds,) = train.datasets
    items = {i.absolute_path.name: i for i in ds.items}
    # 4 training images x 3 repeats = 12; 2 regularisation images raised round-robin to 6 repeats each
    assert sum(i.num_repeats for i in ds.items if not i.is_reg) == 12
    assert [items[f"reg{k}.jpg"].num_repeats for k in range(2)] == [6, 6]
    assert ds.num_train_images == 24
    # same-aspect images share a bucket; every bucket is a multiple of 16 with area <= 64*64
    assert items["img2.png"].bucket_reso == (64, 64) == items["reg0.jpg"].bucket_reso
    assert items["img0.png"].bucket_reso[0] > items["img0.png"].bucket_reso[1]
    assert items["img1.png"].bucket_reso[0] < items["img1.png"].bucket_reso[1]
    assert all(w % 16 == 0 and h % 16 == 0 and w * h <= 64 * 64 for w, h in ds.bucket_resos)
    assert items["reg0.jpg"].caption == "a photo"  # class_tokens stand in for missing caption files
    assert len(train) == sum(-(-c["count"] // 2) for c in ds.bucket_table())


def test_batches_share_a_bucket_and_carry_everything(dataset_dir):
    train, _ = build(dataset_dir, BASIC.format(train=dataset_dir / "train", reg=dataset_dir / "reg"))
    seen = 0
    for key in EpochBatchSampler(train, epoch=1):
        batch = train[key]
        images = batch.images
        assert images.ndim == 4 and images.shape[1] == 3 and -1 <= images.min() and images.max() <= 1
        buckets = {bucket_of(train, path) for path in batch.image_keys}
        assert len(buckets) == 1
        w, h = buckets.pop()
        assert images.shape[2:] == (h, w)
        weights = batch.loss_weights.tolist()
        assert all(w == 1.0 for w in weights)
        assert len(batch.captions) == images.shape[0] == len(batch.image_keys)
        seen += images.shape[0]
    assert seen == 24  # one epoch visits every image repeat exactly once


def test_epoch_order_is_seeded_and_reproducible(dataset_dir):
    config = BASIC.format(train=dataset_dir / "train", reg=dataset_dir / "reg")
    a, _ = build(dataset_dir, config, seed=1)
    b, _ = build(dataset_dir, config, seed=1)

    def epoch_keys(group, epoch):
        return [group[k].image_keys for k in EpochBatchSampler(group, epoch=epoch)]

    assert epoch_keys(a, 1) == epoch_keys(b, 1)
    assert epoch_keys(a, 1) != epoch_keys(a, 2)
    # resuming mid-epoch yields exactly the remaining batches of the uninterrupted epoch
    full = list(EpochBatchSampler(a, epoch=2))
    assert list(EpochBatchSampler(a, epoch=2, skip=3)) == full[3:]


def test_dataloader_workers_give_the_same_batches(dataset_dir):
    config = BASIC.format(train=dataset_dir / "train", reg=dataset_dir / "reg")
    train, _ = build(dataset_dir, config)
    sampler = EpochBatchSampler(train, epoch=3)
    direct = [train[k].images for k in sampler]
    loader = torch.utils.data.DataLoader(train, batch_size=None, sampler=sampler, num_workers=2)
    via_workers = [b.images for b in loader]
    assert len(direct) == len(via_workers)
    assert all(torch.equal(x, y) for x, y in zip(direct, via_workers))


def test_prior_loss_weight_and_caption_processing(dataset_dir):
    config = BASIC.format(train=dataset_dir / "train", reg=dataset_dir / "reg").replace(
        "num_repeats = 3", "num_repeats = 3\n  shuffle_caption = true\n  keep_tokens = 1\n  caption_prefix = \"pre\"")
    train, _ = build(dataset_dir, config, "--prior_loss_weight", "0.25")
    weights, captions = [], []
    for key in EpochBatchSampler(train):
        batch = train[key]
        weights += batch.loss_weights.tolist()
        captions += [c for c, k in zip(batch.captions, batch.image_keys) if "img" in k]
    assert sorted(set(weights)) == [0.25, 1.0] and weights.count(0.25) == 12
    assert all(c.startswith("pre photo of sks, ") for c in captions)  # keep_tokens keeps the first tag
    assert len(set(captions)) > 4  # the other tags are shuffled per sample


def test_bad_images_stop_the_run_with_a_full_list_or_are_skipped(dataset_dir):
    train = dataset_dir / "train"
    (train / "broken.png").write_bytes((train / "img0.png").read_bytes()[:60])
    (train / "empty.jpg").write_bytes(b"")
    config = BASIC.format(train=train, reg=dataset_dir / "reg")
    with pytest.raises(BadImageError) as err:
        build(dataset_dir, config)
    assert "broken.png" in str(err.value) and "empty.jpg" in str(err.value)
    args = parse(["--dataset_config", str(write_config(dataset_dir, config))])
    group, _ = build_datasets(load_dataset_config(args), 0, skip_bad_images=True)
    names = {i.absolute_path.name for i in group.items}
    assert "broken.png" not in names and "img0.png" in names


def test_validation_split_is_complementary(dataset_dir):
    config = BASIC.format(train=dataset_dir / "train", reg=dataset_dir / "reg").replace(
        "batch_size = 2", "batch_size = 2\nvalidation_split = 0.25")
    train, val = build(dataset_dir, config)
    train_names = {i.absolute_path.name for i in train.items}
    val_names = {i.absolute_path.name for i in val.items}
    assert len(val_names) == 1 and not (train_names & val_names)
    assert {"reg0.jpg", "reg1.jpg"} <= train_names  # regularisation images never validate
    assert all(i.num_repeats == 1 for i in val.items)


def test_controlnet_conditioning_follows_the_target_crop(tmp_path):
    images, cond = tmp_path / "images", tmp_path / "cond"
    make_image(images / "a.png", (128, 64))
    (images / "a.txt").write_text("a caption")
    # conditioning image at half the size, with a marker column at 3/4 of the width
    c = np.zeros((32, 64, 3), np.uint8)
    c[:, 48] = 255
    cond.mkdir()
    Image.fromarray(c).save(cond / "a.png")
    toml = f"""
[[datasets]]
resolution = 64
[[datasets.subsets]]
image_dir = "{images}"
conditioning_data_dir = "{cond}"
caption_extension = ".txt"
"""
    args = parse(["--dataset_config", str(write_config(tmp_path, toml))])
    group_config = load_dataset_config(args, support_controlnet=True)
    train, _ = build_datasets(group_config, 0)
    batch = train[0]
    # target 128x64 -> covers 64x64 at 128x64 -> centre crop x in [32, 96); marker at x=96 of 128 falls outside,
    # so scaled to the target size first and cropped the same way, the marker column is gone
    assert batch.conditioning_images.shape == (1, 3, 64, 64) == batch.images.shape
    assert batch.conditioning_images.max() < 1.0


def test_steps_and_epochs_arithmetic():
    assert steps_per_epoch(10, num_processes=2, gradient_accumulation_steps=2) == 3  # ceil(ceil(10/2)/2)
    assert max_train_steps_for(10, 1600, max_train_epochs=4, num_processes=2, gradient_accumulation_steps=2) == 12
    assert max_train_steps_for(10, 1600, None) == 1600
    assert num_train_epochs(1600, 3) == 534


def test_latent_and_text_encoder_caches_feed_batches(dataset_dir, tmp_path):
    from library import flux_utils
    from library.data.cache_common import model_file_identity
    from library.data.latent_cache import LatentCache
    from library.data.text_encoder_cache import TextEncoderCache, text_encoder_identity
    from tools.make_tiny_models import make_tiny_models

    paths = make_tiny_models(tmp_path / "tiny")
    ae = flux_utils.load_ae(paths["ae"], torch.float32, "cpu")
    config = BASIC.format(train=dataset_dir / "train", reg=dataset_dir / "reg").replace(
        "num_repeats = 3", "num_repeats = 3\n  flip_aug = true")
    train, _ = build(dataset_dir, config, "--cache_latents_to_disk", "--cache_text_encoder_outputs")
    latents = LatentCache(True, model_file_identity(paths["ae"]))
    ds = train.datasets[0]
    assert latents.cache(train.items, ae, ds.load_pixels, "cpu", torch.float32, progress=False) == 6
    assert len(list((dataset_dir / "train").glob("*_flux.npz"))) == 4
    tokenizer = flux_utils.load_tokenizer(paths["tokenizers"], t5xxl_max_token_length=16)
    clip_l = flux_utils.load_clip_l(paths["clip_l"], torch.float32, "cpu")
    t5 = flux_utils.load_t5xxl(paths["t5xxl"], torch.float32, "cpu")
    te = TextEncoderCache(False, text_encoder_identity(paths["clip_l"], paths["t5xxl"], "fp32"), t5_max_length=16)
    from library.models.text_encoding import caption_encoder

    te.cache(train.items, caption_encoder(tokenizer, clip_l, t5), progress=False)
    train.attach(tokenizer=tokenizer, latent_cache=latents, te_cache=te)
    batch = train[next(iter(EpochBatchSampler(train)))]
    w, h = bucket_of(train, batch.image_keys[0])
    assert batch.images is None and batch.latents.shape[1:] == (16, h // 8, w // 8)
    l_pooled, t5_out, txt_ids, mask = batch.text_encoder_outputs
    assert t5_out.shape[:2] == (batch.latents.shape[0], 16) and batch.token_ids is None


def test_sampler_shards_an_epoch_between_processes(dataset_dir):
    train, _ = build(dataset_dir, BASIC.format(train=dataset_dir / "train", reg=dataset_dir / "reg"))
    whole = [k[1] for k in EpochBatchSampler(train, epoch=2)]
    ranks = [[k[1] for k in EpochBatchSampler(train, epoch=2, process_index=r, num_processes=2)] for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == -(-len(whole) // 2)
    assert set(ranks[0]) | set(ranks[1]) == set(whole)
    assert not set(ranks[0][: len(whole) // 2]) & set(ranks[1][: len(whole) // 2])


def test_relative_path_is_relative_to_the_dataset_root(tmp_path):
    """Per-item seeds come from it, so it must not change when the dataset moves (issue 14, defect 9)."""
    image = (tmp_path / "data" / "sub" / "x.png").resolve()
    dreambooth = ImageItem(image, "c", SubsetConfig(image_dir=tmp_path / "data"), (8, 8))
    finetune = ImageItem(image, "c", SubsetConfig(metadata_file=tmp_path / "data" / "meta.json"), (8, 8))
    finetune_dir = ImageItem(image, "c", SubsetConfig(image_dir=tmp_path / "data" / "sub",
                                                      metadata_file=tmp_path / "meta.json"), (8, 8))
    assert (dreambooth.relative_path, finetune.relative_path, finetune_dir.relative_path) == \
        ("sub/x.png", "sub/x.png", "x.png")
