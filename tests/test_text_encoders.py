"""CLIP-L / T5-XXL loading, tokenizers and prompt encoding, on CPU with tiny models (real sizes only on meta)."""

import json
import struct
import time

import pytest
import torch

from library.formats.safetensors_io import ModelFileError, read_header, save_file_atomic
from library.models.text_encoders import (CLIP_L_CONFIG, T5_XXL_CONFIG, clip_l_config, clip_l_config_from_file,
                                          load_clip_l, load_t5xxl, save_clip_l, save_t5xxl, t5xxl_config,
                                          t5xxl_config_from_file, tiny_clip_config, tiny_t5_config)
from library.models.text_encoding import FluxTokenizer, encode_prompts, t5_max_length_for
from library.models.tokenizers import (TokenizerNotFoundError, load_clip_tokenizer, load_t5_tokenizer,
                                       write_tiny_tokenizers)

CLIP_DIR, T5_DIR = "openai_clip-vit-large-patch14", "google_t5-v1_1-xxl"


# ----------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokenizers")
    sizes = write_tiny_tokenizers(d)
    assert sizes["clip"] <= tiny_clip_config().vocab_size and sizes["t5"] <= tiny_t5_config().vocab_size
    return d


@pytest.fixture(scope="module")
def tokenizers(tok_dir):
    return load_clip_tokenizer(tok_dir), load_t5_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def tiny_models():
    from transformers import CLIPTextModel, T5EncoderModel

    torch.manual_seed(0)
    return CLIPTextModel(tiny_clip_config()).eval(), T5EncoderModel(tiny_t5_config()).eval()


def _meta(cls, config):
    from accelerate import init_empty_weights

    with init_empty_weights():
        return cls(config)


def _sparse_file(path, shapes: dict[str, tuple], metadata=None):
    """A safetensors file of real size whose data is a hole: enough for anything that reads only the header."""
    header, offset = {}, 0
    for k, shape in shapes.items():
        n = 2
        for s in shape:
            n *= s
        header[k] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return path


def _rewrite(src, dst, rename=lambda k: k, extra=None, drop=(), cast=None):
    from safetensors.torch import load_file

    header = read_header(src)
    tensors = {rename(k): (v.to(cast) if cast is not None else v) for k, v in load_file(str(src)).items()
               if k not in drop}
    tensors.update(extra or {})
    save_file_atomic(tensors, dst, header.metadata)
    return dst


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


# ----------------------------------------------------------------------------------------------------------------
# real-size configs (meta / header only)


def test_real_clip_l_config_and_shapes(tmp_path):
    from transformers import CLIPTextModel

    model = _meta(CLIPTextModel, clip_l_config())
    sd = {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
    assert len(sd) == 196  # 4 embedding/final-LN + 12 layers x 16
    assert sd["embeddings.token_embedding.weight"].shape == (49408, 768)
    assert sd["embeddings.position_embedding.weight"].shape == (77, 768)
    assert sd["encoder.layers.11.mlp.fc1.weight"].shape == (3072, 768)
    assert "encoder.layers.12.mlp.fc1.weight" not in sd
    assert model.config.hidden_act == "quick_gelu"  # the real activation, not sd-scripts' accidental gelu
    assert model.config.num_attention_heads == 12

    # a real-size file (its data a hole) gets exactly the real config, with the usual extras present
    shapes = {"text_model." + k: tuple(v.shape) for k, v in sd.items()}
    shapes["text_projection.weight"] = (768, 768)
    config = clip_l_config_from_file(_sparse_file(tmp_path / "clip_l.safetensors", shapes))
    assert {k: getattr(config, k) for k in CLIP_L_CONFIG} == CLIP_L_CONFIG


def test_real_t5xxl_config_and_shapes(tmp_path):
    from transformers import T5EncoderModel

    model = _meta(T5EncoderModel, t5xxl_config())
    sd = model.state_dict()
    assert len(sd) == 220  # shared + its tied copy + final LN + 24 blocks x 9 + relative bias
    assert sd["shared.weight"].shape == (32128, 4096)
    assert sd["encoder.block.23.layer.1.DenseReluDense.wi_0.weight"].shape == (10240, 4096)
    assert sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape == (32, 64)
    assert "encoder.block.24.layer.0.SelfAttention.q.weight" not in sd
    assert model.config.dense_act_fn == "gelu_new" and model.config.is_gated_act

    shapes = {k: tuple(v.shape) for k, v in sd.items() if k != "encoder.embed_tokens.weight"}
    config = t5xxl_config_from_file(_sparse_file(tmp_path / "t5xxl.safetensors", shapes))
    for k, v in T5_XXL_CONFIG.items():
        if k != "tie_word_embeddings":  # transformers 5's T5Config forces True (decoder-side flag only)
            assert getattr(config, k) == v, k


# ----------------------------------------------------------------------------------------------------------------
# loading tiny files


def test_tiny_round_trip_and_metadata(tmp_path, tiny_models):
    clip, t5 = tiny_models
    save_clip_l(clip, tmp_path / "clip.safetensors")
    save_t5xxl(t5, tmp_path / "t5.safetensors", {"note": "kept"})
    hc, ht = read_header(tmp_path / "clip.safetensors"), read_header(tmp_path / "t5.safetensors")
    assert all(k.startswith("text_model.") for k in hc.keys) and len(hc.keys) == 36
    assert "shared.weight" in ht.keys and "encoder.embed_tokens.weight" not in ht.keys
    assert json.loads(hc.metadata["flux_suite.config"]) == {"num_attention_heads": 2}
    assert json.loads(ht.metadata["flux_suite.config"]) == {"d_kv": 16} and ht.metadata["note"] == "kept"

    clip2, t52 = load_clip_l(tmp_path / "clip.safetensors"), load_t5xxl(tmp_path / "t5.safetensors")
    assert not clip2.training and not t52.training
    assert clip2.config.hidden_act == "quick_gelu"
    assert t52.shared.weight is t52.encoder.embed_tokens.weight
    _same_weights(clip, clip2)
    _same_weights(t5, t52)


@pytest.mark.parametrize("prefix", ["", "text_encoders.clip_l.transformer.", "cond_stage_model.transformer.",
                                    "transformer.", "flat"])
def test_clip_prefixes_and_extras(tmp_path, tiny_models, prefix):
    clip = tiny_models[0]
    save_clip_l(clip, tmp_path / "base.safetensors")
    if prefix == "flat":  # keys without text_model. (as transformers 5 names them)
        rename, extra = (lambda k: k.removeprefix("text_model.")), {}
    else:
        rename = lambda k: prefix + k  # noqa: E731
        extra = {prefix + "text_projection.weight": torch.zeros(32, 32), prefix + "logit_scale": torch.tensor(4.6),
                 prefix + "text_model.embeddings.position_ids": torch.arange(77)[None]}
    path = _rewrite(tmp_path / "base.safetensors", tmp_path / "clip.safetensors", rename, extra)
    _same_weights(clip, load_clip_l(path))


@pytest.mark.parametrize("variant", ["text_encoders.t5xxl.transformer.", "t5xxl.transformer.", "embed_tokens_only",
                                     "both_embeddings"])
def test_t5_prefixes_and_embeddings(tmp_path, tiny_models, variant):
    t5 = tiny_models[1]
    save_t5xxl(t5, tmp_path / "base.safetensors")
    base = tmp_path / "base.safetensors"
    if variant == "embed_tokens_only":
        path = _rewrite(base, tmp_path / "t5.safetensors",
                        lambda k: "encoder.embed_tokens.weight" if k == "shared.weight" else k)
    elif variant == "both_embeddings":
        path = _rewrite(base, tmp_path / "t5.safetensors",
                        extra={"encoder.embed_tokens.weight": t5.shared.weight.detach().clone()})
    else:
        path = _rewrite(base, tmp_path / "t5.safetensors", lambda k: variant + k)
    loaded = load_t5xxl(path)
    _same_weights(t5, loaded)
    assert loaded.shared.weight is loaded.encoder.embed_tokens.weight


def test_dtypes_fp8_kept_and_cast(tmp_path, tiny_models):
    save_t5xxl(tiny_models[1], tmp_path / "t5.safetensors")
    fp8 = _rewrite(tmp_path / "t5.safetensors", tmp_path / "t5_fp8.safetensors", cast=torch.float8_e4m3fn)
    stored = load_t5xxl(fp8)
    assert stored.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float8_e4m3fn
    assert stored.shared.weight.dtype == torch.float8_e4m3fn
    assert load_t5xxl(fp8, dtype="bf16").encoder.final_layer_norm.weight.dtype == torch.bfloat16
    save_clip_l(tiny_models[0], tmp_path / "clip.safetensors")
    clip = load_clip_l(tmp_path / "clip.safetensors", dtype=torch.bfloat16)
    assert clip.embeddings.token_embedding.weight.dtype == torch.bfloat16
    assert clip.embeddings.position_ids.dtype == torch.long  # buffers are not weights


def test_wrong_files_are_clear_errors(tmp_path, tiny_models):
    ae = tmp_path / "ae.safetensors"
    save_file_atomic({"decoder.conv_in.weight": torch.zeros(4, 4, 3, 3),
                      "encoder.down.0.block.0.conv1.weight": torch.zeros(4, 4, 3, 3)}, ae)
    with pytest.raises(ModelFileError, match="CLIP-L") as e:
        load_clip_l(ae)
    assert str(ae) in str(e.value) and "autoencoder" in str(e.value)
    save_t5xxl(tiny_models[1], tmp_path / "t5.safetensors")
    with pytest.raises(ModelFileError, match=r"CLIP-L \(--clip_l\).*T5"):
        load_clip_l(tmp_path / "t5.safetensors")
    save_clip_l(tiny_models[0], tmp_path / "clip.safetensors")
    with pytest.raises(ModelFileError, match=r"T5-XXL \(--t5xxl\)"):
        load_t5xxl(tmp_path / "clip.safetensors")

    # strict apart from the known extras: an unknown tensor or a missing one names the file
    extra = _rewrite(tmp_path / "clip.safetensors", tmp_path / "clip_extra.safetensors",
                     extra={"text_model.encoder.layers.0.mystery.weight": torch.zeros(2)})
    with pytest.raises(ModelFileError, match="unexpected") as e:
        load_clip_l(extra)
    assert str(extra) in str(e.value)
    missing = _rewrite(tmp_path / "t5.safetensors", tmp_path / "t5_missing.safetensors",
                       drop={"encoder.block.1.layer.1.DenseReluDense.wo.weight"})
    with pytest.raises(ModelFileError, match="missing"):
        load_t5xxl(missing)


# ----------------------------------------------------------------------------------------------------------------
# tokenizers


def test_tokenizer_resolution(tmp_path, tok_dir):
    clip, t5 = load_clip_tokenizer(tok_dir), load_t5_tokenizer(tok_dir)  # cache-dir layout
    assert len(clip) > 256 and len(t5) > 50
    clip2 = load_clip_tokenizer(None, name_or_path=str(tok_dir / CLIP_DIR))  # a local folder
    t52 = load_t5_tokenizer(tmp_path / "unused", name_or_path=str(tok_dir / T5_DIR))
    assert clip2("a red fox").input_ids == clip("a red fox").input_ids
    assert t52("a red fox").input_ids == t5("a red fox").input_ids
    # transformers 5 silently builds an empty tokenizer from a folder without vocab files: we refuse it
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerNotFoundError, match="vocab.json"):
        load_clip_tokenizer(name_or_path=str(tmp_path / "empty"))


def test_tokenizer_offline_error_is_fast_and_lists_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(TokenizerNotFoundError) as e:
        load_t5_tokenizer(tmp_path, name_or_path="no-such-org/no-such-tokenizer")
    assert time.perf_counter() - start < 5
    msg = str(e.value)
    assert isinstance(e.value, ValueError)
    for part in ("no-such-org/no-such-tokenizer", str(tmp_path / "no-such-org_no-such-tokenizer"),
                 "Hugging Face cache", "HF_HUB_OFFLINE", "--tokenizer_cache_dir"):
        assert part in msg, part


def test_hub_tokenizer_is_saved_into_cache_dir(tmp_path, tok_dir, monkeypatch):
    import library.models.tokenizers as tl

    monkeypatch.setattr(tl, "_hub_snapshot", lambda repo_id, tried: tok_dir / CLIP_DIR)  # stands in for the hub
    load_clip_tokenizer(tmp_path / "cache")
    saved = tmp_path / "cache" / CLIP_DIR
    assert saved.is_dir()
    monkeypatch.setattr(tl, "_hub_snapshot", lambda repo_id, tried: None)
    assert load_clip_tokenizer(tmp_path / "cache")("a cat").input_ids  # found there without the hub


def test_tiny_tokenizers_are_deterministic(tmp_path, tok_dir):
    write_tiny_tokenizers(tmp_path)
    for sub, name in [(CLIP_DIR, "vocab.json"), (CLIP_DIR, "merges.txt"), (T5_DIR, "spiece.model"),
                      (T5_DIR, "tokenizer.json")]:
        assert (tmp_path / sub / name).read_bytes() == (tok_dir / sub / name).read_bytes(), name


def test_flux_tokenizer_pad_truncate(tokenizers):
    clip_tok, t5_tok = tokenizers
    tok = FluxTokenizer(clip_tok, t5_tok, t5_max_length=24)
    long = "a very detailed photo of a cat " * 20
    prompts = ["a cat", "Ωmega ünïcode 😀 zebra, an UNUSUAL word: xylophone!", long]
    clip_ids, t5_ids, t5_mask = tok(prompts)
    assert clip_ids.shape == (3, 77) and t5_ids.shape == t5_mask.shape == (3, 24)
    assert clip_ids.dtype == t5_ids.dtype == t5_mask.dtype == torch.long
    assert torch.equal(tok(prompts)[1], t5_ids) and torch.equal(tok("a cat")[0], clip_ids[:1])

    bos, eos = clip_tok.bos_token_id, clip_tok.eos_token_id
    assert eos == len(clip_tok) - 1  # highest id: CLIP pools at the argmax of the ids
    assert (clip_ids[:, 0] == bos).all() and clip_ids[2, -1] == eos
    first_eos = clip_ids[0].tolist().index(eos)
    assert 1 < first_eos < 10 and (clip_ids[0, first_eos:] == eos).all()  # CLIP pads with EOS

    n = t5_mask.sum(1)
    for row, count in zip(t5_ids, n.tolist()):
        assert row[count - 1] == 1 and (row[count:] == 0).all()  # ... EOS 1, then padding 0
    assert n[2] == 24 and t5_ids[2, -1] == 1  # truncated, still ending with EOS
    assert t5_max_length_for(True) == 256 and t5_max_length_for(False) == 512
    assert t5_max_length_for(True, 128) == 128


# ----------------------------------------------------------------------------------------------------------------
# encoding


def test_encode_prompts(tokenizers, tiny_models):
    clip, t5 = tiny_models
    clip_ids, t5_ids, t5_mask = FluxTokenizer(*tokenizers, t5_max_length=16)(["a cat", "a dog on the beach at night"])
    with torch.no_grad():
        l_pooled, t5_out, txt_ids, mask = encode_prompts(clip, t5, clip_ids, t5_ids, t5_mask)
        _, masked, _, _ = encode_prompts(None, t5, None, t5_ids, t5_mask, apply_t5_attn_mask=True)
        hidden = clip(input_ids=clip_ids).last_hidden_state
    assert l_pooled.shape == (2, 32) and t5_out.shape == (2, 16, 32)
    assert txt_ids.shape == (2, 16, 3) and txt_ids.dtype == torch.float32 and not txt_ids.any()
    assert mask is t5_mask
    eos_pos = (clip_ids == tokenizers[0].eos_token_id).int().argmax(1)
    assert torch.allclose(l_pooled, hidden[torch.arange(2), eos_pos])  # pooled = hidden state at the first EOS

    pad = t5_mask == 0
    first_pad = pad & (torch.arange(16)[None] == t5_mask.sum(1, keepdim=True))  # kept: Chroma attends it
    later_pad = pad & ~first_pad
    assert later_pad[0].any() and not masked[later_pad].any() and t5_out[pad].abs().sum() > 0
    assert masked[first_pad].abs().min() > 0
    assert not torch.allclose(masked[~pad], t5_out[~pad])  # padding no longer attended
    only_clip = encode_prompts(clip, None, clip_ids, None, None)
    assert only_clip[1] is None and only_clip[2] is None and torch.equal(only_clip[0], l_pooled)


def test_fp16_t5_keeps_its_ff_output_projections_in_fp32(tmp_path, tiny_models):
    """As transformers does for T5: `wo` stays fp32 in an fp16 T5 (its activations overflow fp16 in T5-XXL), also
    under fp16 autocast; an fp16 T5 whose `wo` outputs exceed fp16's range then still gives finite embeddings."""
    save_t5xxl(tiny_models[1], tmp_path / "t5.safetensors")
    fp16_file = _rewrite(tmp_path / "t5.safetensors", tmp_path / "t5_fp16.safetensors", cast=torch.float16)
    for t5 in (load_t5xxl(tmp_path / "t5.safetensors", dtype="fp16"), load_t5xxl(fp16_file)):
        ff = t5.encoder.block[0].layer[-1].DenseReluDense
        assert ff.wo.weight.dtype == torch.float32 and ff.wi_0.weight.dtype == torch.float16
        assert t5.keeps_ff_output_in_fp32
    assert not getattr(load_t5xxl(tmp_path / "t5.safetensors", dtype="bf16"), "keeps_ff_output_in_fp32", False)

    reference = load_t5xxl(tmp_path / "t5.safetensors", dtype="fp32")
    ids = torch.randint(0, reference.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(input_ids=ids).last_hidden_state
        with torch.autocast("cpu", dtype=torch.float16):
            _, got, _, _ = encode_prompts(None, t5, None, ids, None)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=2e-2)

    # activations beyond fp16's range inside `wo`: ours still follows the fp32 model, an all-fp16 T5 (whose overflow
    # transformers clamps to a finite but wrong value) does not
    for model in (t5, reference):
        with torch.no_grad():
            for block in model.encoder.block:
                block.layer[-1].DenseReluDense.wo.weight.mul_(1e5)
    with torch.no_grad():
        all_fp16 = load_t5xxl(fp16_file)
        for block, src in zip(all_fp16.encoder.block, t5.encoder.block):
            block.layer[-1].DenseReluDense.wo.weight.data = src.layer[-1].DenseReluDense.wo.weight.data.half()
        all_fp16.keeps_ff_output_in_fp32 = False
        expected = reference(input_ids=ids).last_hidden_state
        with torch.autocast("cpu", dtype=torch.float16):
            _, ours, _, _ = encode_prompts(None, t5, None, ids, None)
            _, naive, _, _ = encode_prompts(None, all_fp16, None, ids, None)
    ours_err, naive_err = ((ours.float() - expected).abs().max().item(), (naive.float() - expected).abs().max().item())
    print(f"max error vs fp32 with wo outputs past fp16 range: ours {ours_err:.3g}, all-fp16 {naive_err:.3g}")
    assert ours_err < 5e-2 and naive_err > 10 * ours_err, (ours_err, naive_err)
