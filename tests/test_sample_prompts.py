"""Sample prompts (library/flow/prompts.py) and sample images during training (library/training/samples.py)."""

import json
import random
import re
from argparse import Namespace

import numpy as np
import pytest
import torch
from PIL import Image

from library.flow.generation import FluxModels, GenerationSettings, Placement, generate
from library.models.variants import VARIANTS
from library.flow.sampling import get_schedule
from library.flow.prompts import SamplePrompt, SamplePromptError, load_prompts, parse_prompt_line
from library.training.samples import (
                                      settings_for,
                                      SampleSchedule,
                                      precompute_prompt_conditioning,
                                      sample_image_stem,
                                      sample_images,
                                      )
from tools.make_tiny_models import make_tiny_models


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------
# prompt files


def test_txt_prompts_with_comments_and_inline_options(tmp_path, caplog):
    path = write(tmp_path, "p.txt", "# a comment\n\n  a cat in a hat --w 768 --H 512 --s 28 --d 42 --l 2.5 "
                 "--g 4 --n blurry, ugly\n   # indented comment\nplain prompt\nx --ss euler_a --fs 3 --cn c.png\n")
    with caplog.at_level("INFO"):
        cat, plain, x = load_prompts(path)
    assert cat == SamplePrompt(prompt="a cat in a hat", negative_prompt="blurry, ugly", width=768, height=512,
                               sample_steps=28, seed=42, scale=2.5, guidance_scale=4.0, index=0)
    assert cat.where == f"{path}:3"
    assert plain == SamplePrompt(prompt="plain prompt", index=1)  # reference 12.3 defaults
    assert (plain.width, plain.height, plain.sample_steps, plain.seed, plain.scale, plain.guidance_scale) == \
        (512, 512, None, None, 1.0, None)  # steps and guidance: the model's defaults (settings_for)
    assert x.index == x.enum == 2 and x.controlnet_image == "c.png"
    assert x.ignored == {"sample_sampler": "euler_a", "flow_shift": "3"}
    assert "sample_sampler" in caplog.text and "no effect" in caplog.text


@pytest.mark.parametrize("variant, steps, guidance", [("dev", 20, 3.5), ("krea", 20, 4.5), ("schnell", 4, 0.0),
                                                      ("kontext", 20, 2.5)])
def test_sample_prompt_defaults_come_from_the_model(variant, steps, guidance):
    """sd-scripts' 20 steps and 3.5 for dev; schnell 4 steps (its guidance input does not exist); given values win."""
    plain = settings_for(SamplePrompt(prompt="p"), seed=1, variant=VARIANTS[variant])
    assert (plain.steps, plain.guidance) == (steps, guidance)
    given = settings_for(SamplePrompt(prompt="p", sample_steps=7, guidance_scale=1.5), seed=1,
                         variant=VARIANTS[variant])
    assert (given.steps, given.guidance) == (7, 1.5)


def test_txt_unknown_option_warns_with_line_and_steps_are_clamped(tmp_path, caplog):
    path = write(tmp_path, "p.txt", "one\ntwo --width 5 --s 5000\nthree --s 0\n")
    with caplog.at_level("WARNING"):
        prompts = load_prompts(path)
    assert f"{path}:2: unknown option --width 5" in caplog.text
    assert [p.sample_steps for p in prompts] == [None, 1000, 1]
    assert f"{path}:3: sample_steps 0 clamped to 1" in caplog.text
    assert prompts[1].width == 512


@pytest.mark.parametrize("line, message", [
    ("a --w wide", "p.txt:2: width: expected an integer, got 'wide'"),
    ("a --h 0", "p.txt:2: height: expected an integer at least 1, got 0"),
    ("a --d -3", "p.txt:2: seed: expected an integer between 0"),
    ("a --g lots", "p.txt:2: guidance_scale: expected a number, got 'lots'"),
    ("a --l nan", "p.txt:2: scale: expected a finite number"),
    ("a --w", "p.txt:2: option --w needs a value"),
])
def test_txt_bad_values_name_file_and_line(tmp_path, line, message):
    with pytest.raises(SamplePromptError, match=re.escape(message)):
        load_prompts(write(tmp_path, "p.txt", f"# header\n{line}\n"))


def test_toml_subsets_override_prompt_defaults(tmp_path):
    path = write(tmp_path, "p.toml", """
[prompt]
width = 768
height = 640
sample_steps = 12
negative_prompt = "low quality"
scale = 2.0

[[prompt.subset]]
prompt = "first"

[[prompt.subset]]
prompt = "second"
width = 1024
sample_steps = 30
seed = 7
negative_prompt = ""
""")
    first, second = load_prompts(path)
    assert first == SamplePrompt(prompt="first", negative_prompt="low quality", width=768, height=640,
                                 sample_steps=12, scale=2.0, index=0)
    assert second == SamplePrompt(prompt="second", negative_prompt="", width=1024, height=640, sample_steps=30,
                                  seed=7, scale=2.0, index=1)  # sd-scripts raises TypeError here (17 item 21)


@pytest.mark.parametrize("text, message", [
    ('[prompt]\nwidth = 512\n', "needs one or more [[prompt.subset]]"),
    ('[[prompt.subset]]\nprompt = "a"\n[[prompt.subset]]\nprompt = "b"\nwidth = "big"\n',
     "p.toml: subset 2: width: expected an integer, got 'big'"),
    ('[[prompt.subset]]\nprompt = "a"\nwidth = true\n', "subset 1: width: expected an integer, got True"),
    ('[[prompt.subset]]\nprompt = 3\n', "subset 1: prompt: expected text"),
    ('prompt = "a"\n', "needs a [prompt] table"),
    ('[prompt\n', "not valid TOML"),
])
def test_toml_errors(tmp_path, text, message):
    with pytest.raises(SamplePromptError, match=re.escape(message)):
        load_prompts(write(tmp_path, "p.toml", text))


def test_json_dicts_and_strings(tmp_path, caplog):
    path = write(tmp_path, "p.json", json.dumps([
        {"prompt": "a dog", "width": 640, "seed": 3, "guidance_scale": 5, "enum": 99, "colour": "red"},
        "a bird --h 320 --d 9",
        {"prompt": "no seed", "seed": None, "negative_prompt": None},
    ]))
    with caplog.at_level("WARNING"):
        dog, bird, none = load_prompts(path)
    assert dog == SamplePrompt(prompt="a dog", width=640, seed=3, guidance_scale=5.0, index=0)
    assert f"{path}: item 1: unknown key 'colour'" in caplog.text
    assert bird == SamplePrompt(prompt="a bird", height=320, seed=9, index=1)
    assert none == SamplePrompt(prompt="no seed", index=2)


@pytest.mark.parametrize("data, message", [
    ({"prompt": "a"}, "must be a list"),
    (["ok", 5], "item 2: expected a dict or a string, got int"),
    ([{"prompt": "a", "sample_steps": 2.5}], "item 1: sample_steps: expected an integer, got 2.5"),
])
def test_json_errors(tmp_path, data, message):
    with pytest.raises(SamplePromptError, match=re.escape(message)):
        load_prompts(write(tmp_path, "p.json", json.dumps(data)))


def test_unsupported_or_missing_files(tmp_path):
    with pytest.raises(SamplePromptError, match=r"\.txt, \.toml or \.json"):
        load_prompts(write(tmp_path, "p.yaml", "a"))
    with pytest.raises(SamplePromptError, match="not found"):
        load_prompts(tmp_path / "missing.txt")
    assert load_prompts(write(tmp_path, "empty.txt", "# nothing\n\n")) == []


def test_reference_images_repeat_or_split_on_semicolons_in_every_format(tmp_path):
    """Kontext references: `--ri` repeated and/or `;`-separated (order kept); TOML/JSON: a list or one string; a
    subset's list replaces the defaults' (an empty list: none)."""
    txt = write(tmp_path, "p.txt", "edit it --ri a.png --w 64 --RI b dir/c.png;d.png ; --n x\nplain\n")
    edit, plain = load_prompts(txt)
    assert edit.reference_images == ["a.png", "b dir/c.png", "d.png"] and edit.width == 64
    assert edit.negative_prompt == "x" and plain.reference_images == []
    toml = write(tmp_path, "p.toml", '[prompt]\nreference_images = ["r1.png", "r2.png"]\n'
                 '[[prompt.subset]]\nprompt = "a"\n[[prompt.subset]]\nprompt = "b"\nreference_images = "x.png;y.png"\n'
                 '[[prompt.subset]]\nprompt = "c"\nreference_images = []\n')
    assert [p.reference_images for p in load_prompts(toml)] == [["r1.png", "r2.png"], ["x.png", "y.png"], []]
    js = write(tmp_path, "p.json", json.dumps([{"prompt": "a", "reference_images": ["j.png"]}, "b --ri k.png"]))
    assert [p.reference_images for p in load_prompts(js)] == [["j.png"], ["k.png"]]


@pytest.mark.parametrize("name, text, message", [
    ("p.txt", "a --ri\n", "p.txt:1: option --ri needs a value"),
    ("p.txt", "a --ri ;\n", "p.txt:1: reference_images: expected one or more paths"),
    ("p.json", json.dumps([{"prompt": "a", "reference_images": [3]}]),
     "p.json: item 1: reference_images: expected a path or a list of paths, got [3]"),
])
def test_reference_image_errors_name_the_place(tmp_path, name, text, message):
    with pytest.raises(SamplePromptError, match=re.escape(message)):
        load_prompts(write(tmp_path, name, text))


def test_image_size_rounds_down_to_16_with_minimum_64():
    assert parse_prompt_line("a --w 1000 --h 50").image_size() == (992, 64)
    assert SamplePrompt(width=1024, height=768).image_size() == (1024, 768)


# ---------------------------------------------------------------------------------------------------------------
# schedule


def schedule(**kw):
    args = dict(sample_every_n_steps=None, sample_every_n_epochs=None, sample_at_first=False, sample_prompts="p.txt")
    args.update(kw)
    return SampleSchedule.from_args(Namespace(**args))


def test_schedule_by_steps():
    s = schedule(sample_every_n_steps=100)
    assert [s.should_sample(step=n) for n in (0, 1, 99, 100, 150, 200)] == [False, False, False, True, False, True]
    assert not s.should_sample(epoch=1) and not s.should_sample(at_first=True)
    assert s.enabled


def test_schedule_epochs_take_precedence_over_steps():
    s = schedule(sample_every_n_steps=10, sample_every_n_epochs=2)
    assert not s.should_sample(step=10) and not s.should_sample(step=20)
    assert [s.should_sample(epoch=e) for e in (1, 2, 3, 4)] == [False, True, False, True]


def test_schedule_at_first_and_disabled_values():
    s = schedule(sample_at_first=True)
    assert s.should_sample(at_first=True) and s.should_sample(step=0)
    assert not s.should_sample(step=5) and not s.should_sample(epoch=1)
    assert not schedule().should_sample(at_first=True) and not schedule().enabled
    for off in (0, -1):
        s = schedule(sample_every_n_steps=off, sample_every_n_epochs=off)
        assert not s.enabled and not s.should_sample(step=10) and not s.should_sample(epoch=1)
    s = schedule(sample_every_n_steps=1, sample_at_first=True, sample_prompts=None)
    assert not s.enabled and not s.should_sample(step=1) and not s.should_sample(at_first=True)
    assert SampleSchedule.from_args(Namespace()) == SampleSchedule(has_prompts=False)
    with pytest.raises(ValueError):
        s.should_sample()


def test_sample_image_stem_matches_reference_naming():
    assert sample_image_stem("lora", 3, 42, epoch=1, timestamp="20240101120000") == "lora_e000001_03_20240101120000_42"
    assert sample_image_stem(None, 0, None, step=100, timestamp="20240101120000") == "000100_00_20240101120000"


# ---------------------------------------------------------------------------------------------------------------
# rendering on tiny models

NAME = re.compile(r"^(?:(?P<name>.+)_)?(?P<num>e\d{6}|\d{6})_(?P<idx>\d{2})_\d{14}(?:_(?P<seed>\d+))?(?:_\d+)?\.png$")


def load_models(paths) -> FluxModels:
    from library import flux_utils

    is_schnell, flux = flux_utils.load_flow_model(paths["flux"], torch.float32, "cpu")
    ae = flux_utils.load_ae(paths["ae"], torch.float32, "cpu")
    clip_l = flux_utils.load_clip_l(paths["clip_l"], torch.float32, "cpu")
    t5xxl = flux_utils.load_t5xxl(paths["t5xxl"], torch.float32, "cpu")
    tokenizer = flux_utils.load_tokenizer(tokenizer_cache_dir=paths["tokenizers"], is_schnell=is_schnell)
    return FluxModels(flux, ae, clip_l, t5xxl, tokenizer, VARIANTS["schnell" if is_schnell else "dev"], torch.float32)


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    return load_models(make_tiny_models(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def schnell(tmp_path_factory):
    return load_models(make_tiny_models(tmp_path_factory.mktemp("tiny-schnell"), preset="tiny-schnell"))


CPU = Placement("cpu", offload=False)
PROMPTS = [
    SamplePrompt(prompt="a red cube", width=64, height=80, sample_steps=2, seed=5, index=0),
    SamplePrompt(prompt="a blue ball", negative_prompt="blurry", scale=2.0, width=70, height=64, sample_steps=2,
                 seed=6, index=1),
    SamplePrompt(prompt="random seed", width=64, height=64, sample_steps=1, index=2),
]


def pixels(path):
    return np.asarray(Image.open(path))


def test_sample_images_names_count_and_png_text(dev, tmp_path):
    paths = sample_images(dev, PROMPTS, tmp_path, "mylora", CPU, epoch=3)
    assert len(paths) == 3 and all(p.parent == tmp_path / "sample" for p in paths)
    matches = [NAME.match(p.name) for p in paths]
    assert all(matches), [p.name for p in paths]
    assert [(m["name"], m["num"], m["idx"], m["seed"]) for m in matches] == [
        ("mylora", "e000003", "00", "5"), ("mylora", "e000003", "01", "6"), ("mylora", "e000003", "02", None)]
    with Image.open(paths[1]) as im:
        assert im.size == (64, 64)  # 70 rounds down to 64
        text = im.text
    assert text["prompt"] == "a blue ball" and text["negative_prompt"] == "blurry" and text["seed"] == "6"
    assert text["steps"] == "2" and text["cfg_scale"] == "2.0" and text["epoch"] == "3" and text["sample_index"] == "1"
    assert "Seed: 6" in text["parameters"] and "Model: mylora" in text["parameters"]
    assert Image.open(paths[0]).size == (64, 80)
    step_paths = sample_images(dev, PROMPTS[:1], tmp_path, None, CPU, step=100)
    assert re.match(r"^000100_00_\d{14}_5\.png$", step_paths[0].name)


def test_same_seed_gives_identical_images_and_rng_is_untouched(dev, tmp_path):
    a = sample_images(dev, PROMPTS[:2], tmp_path / "a", None, CPU, step=1)
    b = sample_images(dev, PROMPTS[:2], tmp_path / "b", None, CPU, step=1)
    for x, y in zip(a, b):
        assert np.array_equal(pixels(x), pixels(y))
    assert not np.array_equal(pixels(a[0])[:64, :64], pixels(a[1]))  # different prompts and seeds differ


def _rng_snapshot():
    return torch.get_rng_state().clone(), random.getstate(), np.random.get_state()[1].copy()


def _same(s1, s2):
    return torch.equal(s1[0], s2[0]) and s1[1] == s2[1] and np.array_equal(s1[2], s2[2])


def test_sampling_restores_rng_state_and_train_mode(dev, tmp_path):
    seen_training = []

    def consume_rng(module, args, kwargs):  # a model that draws from every global RNG, as dropout would
        seen_training.append(module.training)
        torch.rand(3), random.random(), np.random.rand()

    dev.flux.train()
    dev.t5xxl.train()
    dev.flux.double_blocks[0].eval()  # a mixed state must come back exactly
    handle = dev.flux.register_forward_pre_hook(consume_rng, with_kwargs=True)
    try:
        before = _rng_snapshot()
        sample_images(dev, PROMPTS, tmp_path, None, CPU, step=1)
        assert _same(before, _rng_snapshot())
        assert seen_training and not any(seen_training)
        assert dev.flux.training and dev.t5xxl.training and not dev.flux.double_blocks[0].training
        assert dev.flux.double_blocks[1].training
        sample_images(dev, PROMPTS[:1], tmp_path, None, CPU, step=2, seed_rng_state_restore=False)
        assert not _same(before, _rng_snapshot())  # the check above is sensitive
    finally:
        handle.remove()
        dev.flux.eval(), dev.t5xxl.eval()


def test_precomputed_conditioning_matches_live_encoding_and_generate(dev, tmp_path):
    live = sample_images(dev, PROMPTS[:2], tmp_path / "live", None, CPU, step=1)
    cache = precompute_prompt_conditioning(dev, PROMPTS, CPU, apply_t5_attn_mask=False)
    assert list(cache) == ["a red cube", "a blue ball", "blurry", "random seed"]
    freed = FluxModels(dev.flux, dev.ae, None, None, None, dev.variant, dev.compute_dtype)  # TEs released
    cached = sample_images(freed, PROMPTS[:2], tmp_path / "cached", None, CPU, step=1, cached_conditioning=cache)
    for x, y in zip(live, cached):
        assert np.array_equal(pixels(x), pixels(y))
    for prompt, path in zip(PROMPTS[:2], live):  # the same image as flux_minimal_inference's generate()
        settings = GenerationSettings(prompt=prompt.prompt, width=prompt.image_size()[0],
                                      height=prompt.image_size()[1], steps=prompt.sample_steps, seed=prompt.seed,
                                      negative_prompt=prompt.negative_prompt, cfg_scale=prompt.scale)
        assert np.array_equal(np.asarray(generate(dev, settings, CPU, progress=False)), pixels(path))
    with pytest.raises(ValueError, match="no cached text-encoder outputs"):
        sample_images(freed, [SamplePrompt(prompt="unknown", seed=1)], tmp_path, None, CPU, step=1,
                      cached_conditioning=cache)


def test_masked_conditioning_is_cached_with_its_mask(dev):
    cache = precompute_prompt_conditioning(dev, PROMPTS[:1], CPU, apply_t5_attn_mask=True)
    assert cache["a red cube"].txt_mask is not None
    assert precompute_prompt_conditioning(dev, PROMPTS[:1], CPU, False)["a red cube"].txt_mask is None


def _timesteps_seen(models, prompts, tmp_path):
    seen = []
    handle = models.flux.register_forward_pre_hook(
        lambda m, a, kw: seen.append(round(float(kw["timesteps"][0]), 6)), with_kwargs=True)
    try:
        sample_images(models, prompts, tmp_path, None, CPU, step=1)
    finally:
        handle.remove()
    return seen


def test_schnell_samples_unshifted_and_dev_shifted(schnell, dev, tmp_path):
    prompt = [SamplePrompt(prompt="a cat", width=64, height=64, sample_steps=4, seed=1)]
    assert _timesteps_seen(schnell, prompt, tmp_path / "s") == [1.0, 0.75, 0.5, 0.25]  # not shifted (17 item 22)
    shifted = _timesteps_seen(dev, prompt, tmp_path / "d")  # dev: shifted toward noise, by image size
    assert shifted == [round(t, 6) for t in get_schedule(4, 16, shift=True)[:-1]]
    assert shifted[0] == 1.0 and all(s > u for s, u in zip(shifted[1:], [0.75, 0.5, 0.25]))


def test_processes_render_round_robin_with_their_prompt_index(dev, tmp_path):
    prompts = [SamplePrompt(prompt=f"p{i}", width=64, height=64, sample_steps=1, seed=i, index=i) for i in range(3)]
    rank1 = sample_images(dev, prompts, tmp_path, "n", CPU, step=7, process_index=1, num_processes=2)
    assert len(rank1) == 1 and NAME.match(rank1[0].name)["idx"] == "01"
