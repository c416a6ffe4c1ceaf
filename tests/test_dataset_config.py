"""Dataset config resolution and validation (library/data/config.py): sd-scripts TOML/JSON, CLI fallbacks."""

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import ROOT
from library.data.arguments import add_dataset_arguments
from library.data.config import (DatasetConfigError, DatasetGroupConfig, SubsetConfig,
                                 load_dataset_config, resolve_resolution, validate_against_training_args)


def make_images(folder: Path, names=("a.png", "b.JPG")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", (8, 8), (200, 30, 30)).save(folder / name, format="JPEG" if "jp" in name.lower() else "PNG")
    return folder


def parse(*argv, support_dreambooth=True, support_controlnet=False):
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser, support_dreambooth=support_dreambooth, support_controlnet=support_controlnet)
    return parser.parse_args([str(a) for a in argv])


def write_toml(tmp_path: Path, text: str, name="dataset.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(args, **kw) -> str:
    with pytest.raises(DatasetConfigError) as info:
        load_dataset_config(args, **kw)
    return str(info.value)


@pytest.fixture
def data(tmp_path):
    """Two image folders and a regularisation folder with tiny images."""
    return {name: make_images(tmp_path / name) for name in ("chars", "style", "reg")}


def realistic_toml(data) -> str:
    return f"""
[general]
shuffle_caption = true
caption_extension = "txt"
keep_tokens = 1
flip_aug = true

[[datasets]]
resolution = 512
batch_size = 4
keep_tokens = 2
enable_bucket = true
min_bucket_reso = 256
max_bucket_reso = 1024

  [[datasets.subsets]]
  image_dir = '{data["chars"]}'
  class_tokens = "sks girl"
  num_repeats = 10
  keep_tokens = 3

  [[datasets.subsets]]
  image_dir = '{data["reg"]}'
  class_tokens = "girl"
  is_reg = true

[[datasets]]
resolution = [768, 512]
validation_split = 1
flip_aug = false

  [[datasets.subsets]]
  image_dir = '{data["chars"]}'
  class_tokens = "sks girl"
  face_crop_aug_range = [2, 4]
  custom_attributes = {{ diff_output_preservation = true }}

  [[datasets.subsets]]
  image_dir = '{data["style"]}'
  resize_interpolation = "box"
"""


def test_realistic_toml_precedence(tmp_path, data):
    path = write_toml(tmp_path, realistic_toml(data))
    # explicit CLI values: shuffle/keep_tokens are overridden by the TOML, the rest fall through to the CLI
    args = parse("--dataset_config", path, "--keep_tokens", "7", "--train_batch_size", "2", "--color_aug",
                 "--dataset_repeats", "3", "--resolution", "1024", "--prior_loss_weight", "0.5")
    group = load_dataset_config(args)
    assert isinstance(group, DatasetGroupConfig) and group.source == str(path)
    d1, d2 = group.datasets
    assert (d1.kind, d1.index, d1.resolution, d1.batch_size, d1.enable_bucket) == ("dreambooth", 1, (512, 512), 4, True)
    assert (d2.resolution, d2.batch_size, d2.enable_bucket, d2.validation_split) == ((768, 512), 2, False, 1.0)
    assert d1.prior_loss_weight == d2.prior_loss_weight == 0.5
    s1, s2 = d1.subsets
    assert s1.keep_tokens == 3 and s1.sources["keep_tokens"] == "[[datasets]] #1 > [[datasets.subsets]] #1"
    assert s2.keep_tokens == 2 and s2.sources["keep_tokens"] == "[[datasets]] #1"        # dataset beats general
    assert d2.subsets[0].keep_tokens == 1 and d2.subsets[0].sources["keep_tokens"] == "[general]"  # beats CLI 7
    assert s1.num_repeats == 10 and s2.num_repeats == 3 and s2.sources["num_repeats"] == "--dataset_repeats"
    assert s2.is_reg and not s1.is_reg and s1.class_tokens == "sks girl"
    assert s1.shuffle_caption and s1.caption_extension == ".txt"                          # leading dot added
    assert s1.flip_aug and not d2.subsets[0].flip_aug                                     # dataset false beats general
    assert s1.color_aug and s1.sources["color_aug"] == "--color_aug"                      # CLI beats default
    # argparse defaults count as CLI values (as in sd-scripts); dataclass defaults fill what the namespace lacks
    assert s1.random_crop is False and s1.sources["random_crop"] == "--random_crop"
    assert d2.subsets[1].sources["class_tokens"] == "default" and d1.sources["network_multiplier"] == "default"
    assert s1.caption_separator == "," and s1.keep_tokens_separator == "" and s1.custom_attributes == {}
    assert d2.subsets[0].face_crop_aug_range == (2.0, 4.0)
    assert d2.subsets[0].custom_attributes == {"diff_output_preservation": True}
    assert d2.subsets[1].resize_interpolation == "box" and d2.subsets[1].class_tokens is None
    assert s1.image_dir == data["chars"] and isinstance(s1.image_dir, Path) and s1.kind == "dreambooth"
    assert "[[datasets]] #2 > [[datasets.subsets]] #1" in d2.subsets[0].where and str(path) in d2.subsets[0].where


def test_json_equivalent(tmp_path, data):
    toml_group = load_dataset_config(parse("--dataset_config", write_toml(tmp_path, realistic_toml(data))))
    import tomllib
    raw = tomllib.loads(realistic_toml(data))
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(raw))
    json_group = load_dataset_config(parse("--dataset_config", path))
    assert json_group.datasets == toml_group.datasets


def test_cli_fallback_dreambooth_folders(tmp_path, caplog):
    train, reg = tmp_path / "train", tmp_path / "reg"
    make_images(train / "10_sks dog")
    make_images(train / "2_a_b")
    make_images(train / "0_disabled")
    make_images(train / "notes")
    (train / "readme.txt").write_text("not a folder")
    make_images(reg / "1_dog")
    args = parse("--train_data_dir", train, "--reg_data_dir", reg, "--resolution", "512,768", "--caption_extension",
                 "txt", "--caption_extention", ".cap", "--dataset_repeats", "5")
    with caplog.at_level(logging.WARNING):
        group = load_dataset_config(args)
    assert group.source == "command line"
    (dataset,) = group.datasets
    assert dataset.kind == "dreambooth" and dataset.resolution == (512, 768)
    got = [(s.image_dir.name, s.num_repeats, s.class_tokens, s.is_reg) for s in dataset.subsets]
    assert got == [("10_sks dog", 10, "sks dog", False), ("2_a_b", 2, "a_b", False), ("1_dog", 1, "dog", True)]
    assert all(s.caption_extension == ".cap" for s in dataset.subsets)  # the misspelled alias wins, as in sd-scripts
    assert "notes" in caplog.text and "0_disabled" in caplog.text


def test_cli_fallback_no_usable_folders(tmp_path):
    make_images(tmp_path / "train" / "images")
    message = error_of(parse("--train_data_dir", tmp_path / "train", "--resolution", "512"))
    assert "--train_data_dir" in message and "<repeats>_<class tokens>" in message
    assert "no training data" in error_of(parse("--resolution", "512"))


def test_in_json_fine_tuning(tmp_path):
    images = make_images(tmp_path / "images")
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"a": {"caption": "a cat"}}))
    group = load_dataset_config(parse("--in_json", meta, "--train_data_dir", images, "--resolution", "512",
                                      "--dataset_repeats", "4"))
    (subset,) = group.datasets[0].subsets
    assert group.datasets[0].kind == "finetune" and subset.kind == "finetune"
    assert (subset.metadata_file, subset.image_dir, subset.num_repeats) == (meta, images, 4)
    message = error_of(parse("--in_json", tmp_path / "missing.json", "--resolution", "512"))
    assert "'metadata_file'" in message and "missing.json" in message and "does not exist" in message


def test_controlnet_cli_and_toml(tmp_path):
    images, cond = make_images(tmp_path / "img"), make_images(tmp_path / "cond")
    args = parse("--train_data_dir", images, "--conditioning_data_dir", cond, "--resolution", "512",
                 support_dreambooth=False, support_controlnet=True)
    group = load_dataset_config(args, support_dreambooth=False, support_finetuning=False, support_controlnet=True)
    (subset,) = group.datasets[0].subsets
    assert group.datasets[0].kind == "controlnet" and subset.conditioning_data_dir == cond and not subset.alpha_mask
    # the LoRA trainer accepts ControlNet subsets with --masked_loss
    path = write_toml(tmp_path, f"[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = '{images}'\n"
                                f"conditioning_data_dir = '{cond}'\n")
    assert load_dataset_config(parse("--dataset_config", path, "--masked_loss")).datasets[0].kind == "controlnet"
    message = error_of(parse("--dataset_config", path))
    assert str(path) in message and "[[datasets]] #1" in message and "--masked_loss" in message
    assert "flux_train_control_net.py" in message


def test_unknown_key_wrong_level_wrong_type_reported_together(tmp_path, data):
    path = write_toml(tmp_path, f"""
[general]
alpha_mask = true
batch_size = "4"

[[datasets]]
resolution = 512
validation_split = 1.5

  [[datasets.subsets]]
  image_dir = '{data["chars"]}'
  interpolation_type = "lanczos"
  shuffle_captions = true
  validation_split = 0.1
  flip_aug = 1
  face_crop_aug_range = [1, 2, 3]
  resize_interpolation = "sinc"
  caption_dropout_rate = 1
""")
    with pytest.raises(DatasetConfigError) as info:
        load_dataset_config(parse("--dataset_config", path))
    lines = info.value.problems
    text = str(info.value)
    sub = "[[datasets]] #1 > [[datasets.subsets]] #1"
    expected = [
        ("[general]", "'alpha_mask' is only allowed in [[datasets.subsets]]"),
        ("[general]", "'batch_size' must be an integer, got \"4\" (a string)"),
        ("[[datasets]] #1", "'validation_split' must be between 0 and 1"),
        (sub, "unknown key 'interpolation_type'; use 'resize_interpolation'"),
        (sub, "unknown key 'shuffle_captions' in [[datasets.subsets]]; did you mean 'shuffle_caption'?"),
        (sub, "'validation_split' is only allowed in [general] or [[datasets]]"),
        (sub, "'flip_aug' must be true or false, got 1 (an integer)"),
        (sub, "'face_crop_aug_range' must be exactly 2 numbers"),
        (sub, "'resize_interpolation' must be one of lanczos"),
    ]
    for table, message in expected:
        assert any(line.startswith(f"{path}: {table}: ") and message in line for line in lines), (message, text)
    assert len(lines) == len(expected)  # caption_dropout_rate = 1 is a valid probability
    assert text.count("\n") == len(lines) and "9 problems" in text


def test_bad_values_do_not_cascade_and_cli_values_are_checked(tmp_path, data):
    path = write_toml(tmp_path, f"[[datasets]]\nresolution = '512,x'\n[[datasets.subsets]]\n"
                                f"image_dir = '{data['chars']}'\n")
    lines = pytest.raises(DatasetConfigError, load_dataset_config,
                          parse("--dataset_config", path, "--face_crop_aug_range", "4,2")).value.problems
    assert len(lines) == 2, lines  # no "resolution is missing" after the bad value
    assert lines[0].startswith(f"{path}: [[datasets]] #1: 'resolution' must be one size or width,height")
    assert lines[1].startswith("command line --face_crop_aug_range: 'face_crop_aug_range' must be [low, high]")
    make_images(tmp_path / "train" / "3_x")
    group = load_dataset_config(parse("--train_data_dir", tmp_path / "train", "--resolution", "512",
                                      "--face_crop_aug_range", "2,4.5"))
    assert group.datasets[0].subsets[0].face_crop_aug_range == (2.0, 4.5)


def test_validation_split_accepts_int_and_unknown_top_level(tmp_path, data):
    ok = write_toml(tmp_path, f"[general]\nvalidation_split = 0\nresolution = 512\n[[datasets]]\n"
                              f"[[datasets.subsets]]\nimage_dir = '{data['chars']}'\n")
    assert load_dataset_config(parse("--dataset_config", ok)).datasets[0].validation_split == 0.0
    bad = write_toml(tmp_path, f"[dataset]\nx = 1\n[[datasets]]\nresolution = 512\n[[datasets.subsets]]\n"
                               f"image_dir = '{data['chars']}'\n", "bad.toml")
    assert "unknown top-level key 'dataset'" in error_of(parse("--dataset_config", bad))


def test_missing_and_empty_folders_and_required_keys(tmp_path, data):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    make_images(tmp_path / "empty" / "nested")  # not searched
    path = write_toml(tmp_path, f"""
[general]
resolution = 512
[[datasets]]
  [[datasets.subsets]]
  image_dir = '{tmp_path / "nope"}'
  [[datasets.subsets]]
  image_dir = '{tmp_path / "empty"}'
  [[datasets.subsets]]
  class_tokens = "x"
""")
    lines = pytest.raises(DatasetConfigError, load_dataset_config, parse("--dataset_config", path)).value.problems
    assert len(lines) == 3
    assert lines[0].startswith(f"{path}: [[datasets]] #1 > [[datasets.subsets]] #1: 'image_dir' folder")
    assert "nope" in lines[0] and "does not exist" in lines[0]
    assert "[[datasets.subsets]] #2: 'image_dir'" in lines[1] and "is empty" in lines[1]
    assert "[[datasets.subsets]] #3: missing required key 'image_dir'" in lines[2]


def test_mixed_kinds_and_kind_specific_keys(tmp_path, data):
    meta = tmp_path / "meta.json"
    meta.write_text("{}")
    path = write_toml(tmp_path, f"""
[[datasets]]
resolution = 512
  [[datasets.subsets]]
  image_dir = '{data["chars"]}'
  [[datasets.subsets]]
  metadata_file = '{meta}'
  is_reg = true
""")
    message = error_of(parse("--dataset_config", path))
    assert f"{path}: [[datasets]] #1: mixes subset kinds (DreamBooth: subsets #1; fine-tuning: subsets #2)" in message
    assert "[[datasets.subsets]] #2: 'is_reg' is only allowed in DreamBooth subsets" in message
    assert "'metadata_file'" in message


def test_no_subsets_and_missing_resolution(tmp_path, data):
    path = write_toml(tmp_path, f"""
[[datasets]]
resolution = 512
[[datasets]]
  [[datasets.subsets]]
  image_dir = '{data["chars"]}'
""")
    message = error_of(parse("--dataset_config", path))
    assert f"{path}: [[datasets]] #1: dataset 1 has no subsets" in message
    assert f"{path}: [[datasets]] #2: 'resolution' is missing" in message


def test_bad_extension_and_missing_file(tmp_path):
    yaml = tmp_path / "dataset.yaml"
    yaml.write_text("x: 1")
    message = error_of(parse("--dataset_config", yaml))
    assert str(yaml) in message and ".toml or .json" in message
    assert "not found" in error_of(parse("--dataset_config", tmp_path / "missing.toml"))
    broken = write_toml(tmp_path, "[general\n", "broken.toml")
    assert "cannot be read as TOML" in error_of(parse("--dataset_config", broken))


def test_bucket_checks(tmp_path, data, caplog):
    def config(extra):
        return write_toml(tmp_path, f"[general]\nenable_bucket = true\n{extra}\n[[datasets]]\n[[datasets.subsets]]\n"
                                    f"image_dir = '{data['chars']}'\n")
    message = error_of(parse("--dataset_config", config("resolution = [200, 2048]\nbucket_reso_steps = 24")))
    assert "'bucket_reso_steps' must be a multiple of 16" in message
    assert "'min_bucket_reso' 256" in message and "'max_bucket_reso' 1024" in message
    with caplog.at_level(logging.WARNING):
        group = load_dataset_config(parse("--dataset_config", config(
            "resolution = 512\nbucket_reso_steps = 32\nmin_bucket_reso = 250\nmax_bucket_reso = 1000")))
    dataset = group.datasets[0]
    assert (dataset.min_bucket_reso, dataset.max_bucket_reso, dataset.bucket_reso_steps) == (224, 1024, 32)
    assert "rounded down to 224" in caplog.text and "rounded up to 1024" in caplog.text
    # without bucketing the resolution itself must fit FLUX's /16 latent packing
    no_bucket = write_toml(tmp_path, f"[[datasets]]\nresolution = 520\n[[datasets.subsets]]\n"
                                     f"image_dir = '{data['chars']}'\n", "nb.toml")
    assert "multiple of 16" in error_of(parse("--dataset_config", no_bucket))


def test_caching_contradictions(tmp_path, data):
    path = write_toml(tmp_path, f"""
[general]
resolution = 512
random_crop = true
[[datasets]]
caption_dropout_every_n_epochs = 2
  [[datasets.subsets]]
  image_dir = '{data["chars"]}'
  caption_prefix = "photo of"
  enable_wildcard = true
""")
    message = error_of(parse("--dataset_config", path, "--cache_latents_to_disk", "--cache_text_encoder_outputs",
                             "--shuffle_caption"))
    sub = f"{path}: [[datasets]] #1 > [[datasets.subsets]] #1: "
    assert sub + "'random_crop' (inherited from [general]) cannot be used with --cache_latents_to_disk" in message
    assert sub + "'shuffle_caption' (set by --shuffle_caption on the command line) cannot be used with " \
                 "--cache_text_encoder_outputs" in message
    assert sub + "'caption_dropout_every_n_epochs' (inherited from [[datasets]] #1)" in message
    assert sub + "'enable_wildcard' cannot be used" in message
    assert "caption_prefix" not in message  # applied before caching
    group = load_dataset_config(parse("--dataset_config", path))
    with pytest.raises(DatasetConfigError, match="color_aug"):
        group.datasets[0].subsets[0].random_crop = False
        group.datasets[0].subsets[0].color_aug = True
        validate_against_training_args(group, parse("--cache_latents"))
    validate_against_training_args(group, parse())


def test_controlnet_random_crop_and_unsupported_kinds(tmp_path, data):
    path = write_toml(tmp_path, f"""
[[datasets]]
resolution = 512
  [[datasets.subsets]]
  image_dir = '{data["chars"]}'
  conditioning_data_dir = '{data["style"]}'
  random_crop = true
  alpha_mask = true
[[datasets]]
resolution = 512
  [[datasets.subsets]]
  image_dir = '{data["chars"]}'
""")
    message = error_of(parse("--dataset_config", path), support_dreambooth=False, support_finetuning=False,
                       support_controlnet=True)
    assert "[[datasets.subsets]] #1: 'random_crop' cannot be used in a ControlNet subset" in message
    assert "'alpha_mask' is only allowed in DreamBooth or fine-tuning subsets" in message
    assert f"{path}: [[datasets]] #2: DreamBooth subsets are not supported by ControlNet training" in message


def test_duplicate_subsets_ignored(tmp_path, data, caplog):
    path = write_toml(tmp_path, f"""
[general]
resolution = 512
[[datasets]]
  [[datasets.subsets]]
  image_dir = '{data["chars"]}'
  [[datasets.subsets]]
  image_dir = '{data["chars"]}/../chars'
  num_repeats = 3
  [[datasets.subsets]]
  image_dir = '{data["style"]}'
  num_repeats = 0
""")
    with caplog.at_level(logging.WARNING):
        group = load_dataset_config(parse("--dataset_config", path))
    assert [s.index for s in group.datasets[0].subsets] == [1]
    assert "subset #1" in caplog.text and "num_repeats is 0" in caplog.text


def test_resolve_resolution():
    assert resolve_resolution(512) == (512, 512)
    assert resolve_resolution("512") == (512, 512)
    assert resolve_resolution("512,768") == (512, 768)
    assert resolve_resolution([640, 384]) == (640, 384)
    for bad in ("512x768", [1, 2, 3], 512.0, True, "0", None):
        with pytest.raises(ValueError):
            resolve_resolution(bad)


def test_argument_defaults_and_flags():
    args = parse()
    assert (args.caption_extension, args.caption_separator, args.keep_tokens_separator) == (".caption", ",", "")
    assert (args.min_bucket_reso, args.max_bucket_reso, args.bucket_reso_steps) == (256, 1024, 64)
    assert (args.train_batch_size, args.prior_loss_weight, args.dataset_repeats, args.vae_batch_size) == (1, 1.0, 1, 1)
    assert args.token_warmup_min == 1 and args.token_warmup_step == 0 and args.caption_dropout_rate == 0.0
    assert args.resolution is None and args.text_encoder_batch_size is None and not args.skip_bad_images
    cn = parse(support_dreambooth=False, support_controlnet=True)
    assert not hasattr(cn, "reg_data_dir") and not hasattr(cn, "prior_loss_weight")
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser, support_caption_dropout=False)
    assert not hasattr(parser.parse_args([]), "caption_dropout_rate")
    assert all(action.help for action in parser._actions)


def test_subset_defaults():
    subset = SubsetConfig()
    assert subset.kind == "dreambooth" and subset.caption_separator == "," and subset.keep_tokens_separator == ""
    assert subset.custom_attributes == {} and subset.custom_attributes is not SubsetConfig().custom_attributes


def test_module_import_is_cheap():
    code = "import sys, library.data.config; assert not {'torch', 'numpy', 'PIL'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
