"""Caption files and caption processing (reference 2.6, 3.1, 3.7, 4.3; bugs 10 and 14 fixed).

Expected strings are written out by hand. Where randomness is involved the test notes the draws of
``random.Random(seed)`` that produce them (shuffle / choice / random() are stable across CPython versions).
"""

import dataclasses
import random
from types import SimpleNamespace

import pytest

from library.data.captions import (
                                   CaptionOptions,
                                   deterministic_caption_options,
                                   find_caption_file,
                                   finetune_caption,
                                   has_wildcard_choice,
                                   process_caption,
                                   read_caption_file,
                                   tag_frequency,
                                   text_encoder_cache_caption,
                                   )


def run(caption, seed=0, epoch=1, step=0, max_train_steps=0, **options):
    return process_caption(caption, CaptionOptions(**options), random.Random(seed), epoch, step, max_train_steps)


# ----------------------------------------------------------------------------------------------- caption files


def test_find_caption_file_direct_and_extension_dot(tmp_path):
    (tmp_path / "img.png").touch()
    (tmp_path / "img.caption").write_text("x")
    assert find_caption_file(tmp_path / "img.png", ".caption") == tmp_path / "img.caption"
    assert find_caption_file(tmp_path / "img.png", "caption") == tmp_path / "img.caption"
    assert find_caption_file(tmp_path / "img.png", ".txt") is None


def test_find_caption_file_face_crop_fallback(tmp_path):
    (tmp_path / "person.txt").write_text("a person")
    # name_cx_cy_w_h: 5 tokens -> "person"
    assert find_caption_file(tmp_path / "person_120_80_64_64.png", ".txt") == tmp_path / "person.txt"
    # 4 tokens is not face-crop naming
    (tmp_path / "a.txt").write_text("a")
    assert find_caption_file(tmp_path / "a_1_2_3.png", ".txt") is None
    # a stem with underscores keeps all but the last 4 tokens
    (tmp_path / "my_pic.txt").write_text("x")
    assert find_caption_file(tmp_path / "my_pic_1_2_3_4.jpg", ".txt") == tmp_path / "my_pic.txt"
    # the exact name wins over the fallback
    (tmp_path / "person_120_80_64_64.txt").write_text("crop")
    assert find_caption_file(tmp_path / "person_120_80_64_64.png", ".txt") == tmp_path / "person_120_80_64_64.txt"


def test_read_caption_file(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("\n  first line  \n\nsecond\n", encoding="utf-8")
    assert read_caption_file(f, enable_wildcard=False) == "first line"
    assert read_caption_file(f, enable_wildcard=True) == "first line\nsecond"
    f.write_bytes("\ufeffbom caption\r\n".encode())
    assert read_caption_file(f, False) == "bom caption"
    f.write_bytes(b"")
    assert read_caption_file(f, False) == ""
    assert read_caption_file(f, True) == ""
    f.write_text("  \n\n", encoding="utf-8")
    assert read_caption_file(f, False) == ""


def test_read_caption_file_not_utf8(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="must be UTF-8") as info:
        read_caption_file(f, False)
    assert "latin1.txt" in str(info.value)


# ----------------------------------------------------------------------------------------------- fine-tuning


def test_finetune_caption_without_wildcard():
    assert finetune_caption({"caption": "a cat", "tags": "t1, t2"}, ",", False) == "a cat,t1, t2"
    assert finetune_caption({"caption": "a cat", "tags": "t1"}, ";", False) == "a cat;t1"
    assert finetune_caption({"caption": "a cat", "tags": ""}, ",", False) == "a cat"
    assert finetune_caption({"caption": "a cat"}, ",", False) == "a cat"
    assert finetune_caption({"tags": "t1, t2"}, ",", False) == "t1, t2"
    assert finetune_caption({}, ",", False) == ""


def test_finetune_caption_with_wildcard():
    entry = {"caption": "a cat\n\na dog\n", "tags": "t1\nt2"}
    assert finetune_caption(entry, ",", True) == "a cat,t1,t2\na dog,t1,t2"
    assert finetune_caption({"caption": "a\nb"}, ",", True) == "a\nb"
    assert finetune_caption({"tags": "t1\nt2"}, ",", True) == "t1,t2"


# ----------------------------------------------------------------------------------------------- options


def test_caption_options_defaults_and_from_subset():
    o = CaptionOptions()
    assert (o.shuffle_caption, o.caption_separator, o.keep_tokens, o.keep_tokens_separator) == (False, ",", 0, "")
    assert (o.secondary_separator, o.enable_wildcard, o.caption_prefix, o.caption_suffix) == (None, False, None, None)
    assert (o.caption_dropout_rate, o.caption_dropout_every_n_epochs, o.caption_tag_dropout_rate) == (0.0, 0, 0.0)
    assert (o.token_warmup_min, o.token_warmup_step) == (1, 0)

    subset = SimpleNamespace(shuffle_caption=True, keep_tokens=2, keep_tokens_separator=None, caption_prefix="p",
                             image_dir="ignored", token_warmup_step=0.5)
    o = CaptionOptions.from_subset(subset)
    assert o == CaptionOptions(shuffle_caption=True, keep_tokens=2, caption_prefix="p", token_warmup_step=0.5)
    assert CaptionOptions.from_subset({"caption_separator": ";"}).caption_separator == ";"


def test_deterministic_caption_options():
    assert deterministic_caption_options(CaptionOptions(caption_prefix="p", keep_tokens=3)) == []
    everything = CaptionOptions(shuffle_caption=True, caption_dropout_rate=0.1, caption_dropout_every_n_epochs=2,
                                caption_tag_dropout_rate=0.1, token_warmup_step=0.5, enable_wildcard=True)
    assert deterministic_caption_options(everything) == [
        "shuffle_caption", "caption_dropout_rate", "caption_dropout_every_n_epochs",
        "caption_tag_dropout_rate", "token_warmup_step", "enable_wildcard",
    ]
    wild = CaptionOptions(enable_wildcard=True)
    assert deterministic_caption_options(wild, ["plain {{braces}}", "{single}"]) == []
    assert deterministic_caption_options(wild, ["plain", "{a|b}"]) == ["enable_wildcard"]
    assert deterministic_caption_options(wild, ["line1\nline2"]) == ["enable_wildcard"]
    assert has_wildcard_choice("{{a|b}}") is False


# ----------------------------------------------------------------------------------------------- process_caption


def test_plain_caption_untouched_and_first_line_only():
    assert run("a, b,c ,d") == "a, b,c ,d"  # no option active: no re-join
    assert run("first, line\nsecond line") == "first, line"


def test_prefix_suffix_spacing():
    assert run("cat", caption_prefix="pre", caption_suffix="suf") == "pre cat suf"
    assert run("cat", caption_prefix="sks,") == "sks, cat"
    assert run("cat", caption_suffix=", masterpiece") == "cat , masterpiece"
    # prefix/suffix come before shuffling: they become tokens ("sks" kept fixed by keep_tokens=1)
    # Random(1).shuffle(["a", "b"]) -> b a
    assert run("a, b", caption_prefix="sks,", shuffle_caption=True, keep_tokens=1, seed=1) == "sks, b, a"


def test_suffix_on_multi_line_caption_without_wildcard_follows_sd_scripts():
    # the suffix lands on the last line, then only the first line is kept (sd-scripts order, reference 3.7)
    assert run("one\ntwo", caption_prefix="P", caption_suffix="S") == "P one"


def test_dropout_every_n_epochs():
    results = {epoch: run("a, b", caption_dropout_every_n_epochs=2, epoch=epoch) for epoch in (1, 2, 3, 4)}
    assert results == {1: "a, b", 2: "", 3: "a, b", 4: ""}


def test_dropout_rate():
    assert run("a, b", caption_dropout_rate=1.0, caption_prefix="p") == ""
    assert run("a, b", caption_dropout_rate=0.0) == "a, b"
    # Random(0).random() = 0.844 >= 0.5 -> kept; Random(1).random() = 0.134 < 0.5 -> dropped
    assert run("a, b", caption_dropout_rate=0.5, seed=0) == "a, b"
    assert run("a, b", caption_dropout_rate=0.5, seed=1) == ""


def test_wildcard_choice_reproducible_and_escaped_braces():
    caption = "a photo of {cat|dog|bird}, {{literal}}"
    # Random(s).choice(["cat", "dog", "bird"]): s=1 -> cat, s=0 -> dog, s=5 -> bird
    assert run(caption, seed=1, enable_wildcard=True) == "a photo of cat, {literal}"
    assert run(caption, seed=0, enable_wildcard=True) == "a photo of dog, {literal}"
    assert run(caption, seed=5, enable_wildcard=True) == "a photo of bird, {literal}"
    assert run(caption, seed=5, enable_wildcard=True) == run(caption, seed=5, enable_wildcard=True)
    # without enable_wildcard nothing is expanded
    assert run(caption) == caption


def test_wildcard_multi_line():
    caption = "{red|blue} {cat|dog|bird}\n{{x}} plain"
    # seed 0: line choice -> index 1
    assert run(caption, seed=0, enable_wildcard=True) == "{x} plain"
    # seed 1: line 0, then "red", then "dog"
    assert run(caption, seed=1, enable_wildcard=True) == "red dog"
    # Random(0).choice over 3 lines -> index 1
    assert run("line one\nline two\nline three", seed=0, enable_wildcard=True) == "line two"


def test_prefix_suffix_with_multi_line_wildcard_follows_sd_scripts():
    # prefix/suffix are added to the raw (multi-line) caption before a line is picked, as in sd-scripts
    options = dict(enable_wildcard=True, caption_prefix="P", caption_suffix="S")
    assert run("one\ntwo", seed=0, **options) == "two S"
    assert run("one\ntwo", seed=1, **options) == "P one"


def test_shuffle_and_keep_tokens():
    # Random(0).shuffle(list("abcde")) -> c b a e d
    assert run("a, b, c, d, e", shuffle_caption=True, seed=0) == "c, b, a, e, d"
    # keep_tokens=1: "a" fixed; Random(0).shuffle(list("bcde")) -> d b c e
    assert run("a, b, c, d, e", shuffle_caption=True, keep_tokens=1, seed=0) == "a, d, b, c, e"
    for seed in range(20):
        out = run("a, b, c, d, e", shuffle_caption=True, keep_tokens=2, seed=seed).split(", ")
        assert out[:2] == ["a", "b"] and sorted(out) == list("abcde")


def test_keep_tokens_path_keeps_empty_items():
    assert run("a,,b ,  c", shuffle_caption=True, keep_tokens=4) == "a, , b, c"


def test_keep_tokens_separator_parts():
    caption = "fixed1, fixed2 ||| f1, f2, f3, f4 ||| s1, s2"
    # Random(0).shuffle(["f1", "f2", "f3", "f4"]) -> f3 f1 f2 f4
    out = run(caption, shuffle_caption=True, keep_tokens_separator="|||", seed=0)
    assert out == "fixed1, fixed2, f3, f1, f2, f4, s1, s2"
    # empty items are removed in this path; keep_tokens is ignored
    assert run("a,, ||| ,b,c,", shuffle_caption=True, keep_tokens=5, keep_tokens_separator="|||", seed=0) == "a, b, c"


def test_keep_tokens_separator_never_left_verbatim():
    # bug 14: sd-scripts would return the caption unchanged here
    assert run("girl ||| red hair, smile", keep_tokens_separator="|||") == "girl, red hair, smile"
    assert run("girl ||| red hair ||| smile", keep_tokens_separator="|||") == "girl, red hair, smile"
    # a third occurrence (left inside the suffix by sd-scripts) is removed as well
    assert run("a ||| b ||| c ||| d", keep_tokens_separator="|||") == "a, b, c, d"
    assert run("a, b, c", keep_tokens_separator="|||") == "a, b, c"  # absent: untouched
    for seed in range(5):
        out = run("x ||| a, b ||| z ||| y", keep_tokens_separator="|||", shuffle_caption=True, seed=seed)
        assert "|||" not in out


def test_secondary_separator_replaced_after_shuffle():
    # Random(0).shuffle(["a", "b;;;c", "d", "e"]) -> d a b;;;c e; "b;;;c" moved as one tag
    assert run("a, b;;;c, d, e", shuffle_caption=True, secondary_separator=";;;", seed=0) == "d, a, b,c, e"
    assert run("a, b;;;c", secondary_separator=";;;") == "a, b,c"
    assert run("a; b;;;c", secondary_separator=";;;", caption_separator=";") == "a; b;c"


def test_tag_dropout():
    # rate 1.0: every flex tag dropped, fixed ones kept
    assert run("a, b, c", caption_tag_dropout_rate=1.0, keep_tokens=1) == "a"
    assert run("x ||| a, b ||| z", caption_tag_dropout_rate=1.0, keep_tokens_separator="|||") == "x, z"
    # rate 0.5, Random(0).random() draws 0.844 0.758 0.421 0.259 -> keep keep drop drop
    assert run("a, b, c, d", caption_tag_dropout_rate=0.5, seed=0) == "a, b"


def test_token_warmup_counts():
    caption = "k, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10"  # keep_tokens=1 -> 10 flex tokens
    options = dict(keep_tokens=1, token_warmup_min=1, token_warmup_step=10)
    # step 0: floor(0) + 1 = 1 flex token
    assert run(caption, step=0, **options) == "k, t1"
    # step 5: floor(5 * (10 - 1) / 10) + 1 = 4 + 1 = 5
    assert run(caption, step=5, **options) == "k, t1, t2, t3, t4, t5"
    # step 10: warm-up over, everything
    assert run(caption, step=10, **options) == caption
    # token_warmup_min=3 at step 0
    assert run(caption, step=0, keep_tokens=1, token_warmup_min=3, token_warmup_step=10) == "k, t1, t2, t3"


def test_token_warmup_fraction_of_max_train_steps():
    caption = "k, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10"
    options = CaptionOptions(keep_tokens=1, token_warmup_step=0.5)
    rng = random.Random(0)
    # 0.5 * 20 = 10 warm-up steps: same counts as above
    assert process_caption(caption, options, rng, step=0, max_train_steps=20) == "k, t1"
    assert process_caption(caption, options, rng, step=5, max_train_steps=20) == "k, t1, t2, t3, t4, t5"
    assert process_caption(caption, options, rng, step=10, max_train_steps=20) == caption
    assert options.token_warmup_step == 0.5  # not mutated
    # floor(0.5 * 0) = 0: no warm-up, but the caption is still re-joined
    assert run("a,b", token_warmup_step=0.5, max_train_steps=0) == "a, b"


def test_custom_caption_separator_rejoined_with_comma_space():
    assert run("a;b; c", caption_separator=";", shuffle_caption=True, keep_tokens=3) == "a, b, c"
    assert run("a; b ||| c;d", caption_separator=";", keep_tokens_separator="|||") == "a, b, c, d"


def test_uses_only_the_given_rng():
    random.seed(123)
    state = random.getstate()
    run("a, b, {c|d}, e", shuffle_caption=True, caption_tag_dropout_rate=0.3, caption_dropout_rate=0.2,
        enable_wildcard=True, seed=7)
    assert random.getstate() == state


# ----------------------------------------------------------------------------------------------- TE cache caption


def test_text_encoder_cache_caption():
    options = CaptionOptions(caption_prefix="sks,", caption_suffix="end", secondary_separator=";;;",
                             keep_tokens_separator="|||")
    assert text_encoder_cache_caption("a ||| b;;;c", options) == "sks, a, b,c end"
    # first line only; as in process_caption the suffix went onto the dropped last line
    assert text_encoder_cache_caption("a ||| b;;;c\nsecond line", options) == "sks, a, b,c"
    assert text_encoder_cache_caption("plain", CaptionOptions()) == "plain"
    # with random options set the deterministic parts are still applied (validation rejects such a combination)
    assert text_encoder_cache_caption("a, b", CaptionOptions(shuffle_caption=True, caption_prefix="p")) == "p a, b"


def test_text_encoder_cache_caption_wildcard():
    wild = CaptionOptions(enable_wildcard=True)
    assert text_encoder_cache_caption("{{x}} {single} y", wild) == "{x} single y"
    with pytest.raises(ValueError, match="wildcard"):
        text_encoder_cache_caption("{a|b}", wild)
    with pytest.raises(ValueError, match="wildcard"):
        text_encoder_cache_caption("one\ntwo", wild)


def test_cache_caption_matches_processing_when_deterministic():
    options = CaptionOptions(caption_prefix="p", secondary_separator="::", keep_tokens_separator="|", keep_tokens=2)
    for caption in ("a | b::c, d", "x, y\nz", "no separators"):
        expected = process_caption(caption, options, random.Random(0), epoch=3)
        assert text_encoder_cache_caption(caption, options) == expected
    options = dataclasses.replace(options, caption_dropout_every_n_epochs=2)
    assert deterministic_caption_options(options) == ["caption_dropout_every_n_epochs"]


# ----------------------------------------------------------------------------------------------- tag frequency


def test_tag_frequency():
    assert tag_frequency(["Cat, dog", "cat,  ,DOG , bird", ""]) == {"cat": 2, "dog": 2, "bird": 1}
