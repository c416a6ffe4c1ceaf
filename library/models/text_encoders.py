"""CLIP-L and T5-XXL text encoders (reference 5.5) through transformers, each loaded from one safetensors file.

The architecture is read from the file: shapes give sizes and layer counts, and the safetensors metadata key
"flux_suite.config" (a JSON dict our writers store for non-real configs, e.g. head counts of tiny models) overrides
the rest. A real-size file without that key therefore gets exactly the real config, and the project's tiny files load
through the same code.

Differences from sd-scripts, on purpose: CLIP-L uses its real activation "quick_gelu" (sd-scripts' config literal
ends up with exact "gelu" by accident), and loading is strict (every tensor present and of the right shape) apart
from a few known harmless extras.
"""

from __future__ import annotations

import json
import os
import re

import torch

from library.formats import fp8_scaled
from library.formats.dtypes import str_to_dtype
from library.formats.safetensors_io import (ModelFileError, assign_weights, expect_kind, load_tensors, read_header,
                                            save_file_atomic, strip_prefix)

CONFIG_METADATA_KEY = "flux_suite.config"

# openai/clip-vit-large-patch14, text part. The token ids are those of its config.json (bos 0, eos 2, pad 1, not the
# tokenizer's 49406/49407): with eos_token_id == 2 transformers pools at the argmax of the ids, which is the first
# EOS because EOS has the highest id in CLIP's vocab -- the pooling sd-scripts and diffusers get. Our tiny CLIP
# tokenizer keeps EOS last for the same reason.
CLIP_L_CONFIG = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    attention_dropout=0.0, initializer_range=0.02, initializer_factor=1.0, bos_token_id=0, eos_token_id=2,
    pad_token_id=1,
)

# google/t5-v1_1-xxl, encoder only. "gated-gelu" is gelu_new (tanh approximation) on wi_0, times wi_1.
T5_XXL_CONFIG = dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.1,
    layer_norm_epsilon=1e-6, initializer_factor=1.0, feed_forward_proj="gated-gelu", is_encoder_decoder=True,
    tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
)

# Prefixes of files in the wild (ComfyUI / SD checkpoints); keys are stored without them.
CLIP_PREFIXES = ("text_encoders.clip_l.transformer.", "cond_stage_model.transformer.", "clip_l.transformer.",
                 "transformer.")
T5_PREFIXES = ("text_encoders.t5xxl.transformer.", "t5xxl.transformer.", "transformer.")
# Keys some CLIP files carry that CLIPTextModel has no use for (CLIPModel's projection, a non-persistent buffer).
_CLIP_IGNORED = {"text_projection.weight", "logit_scale", "embeddings.position_ids"}

_CLIP_LAYER = re.compile(r"encoder\.layers\.(\d+)\.")
_T5_BLOCK = re.compile(r"encoder\.block\.(\d+)\.")


# ----------------------------------------------------------------------------------------------------------------
# Configs


def clip_l_config(**overrides):
    """A `CLIPTextConfig`: the real CLIP-L text config with `overrides` applied."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**{**CLIP_L_CONFIG, **overrides})


def t5xxl_config(**overrides):
    """A `T5Config`: the real T5-XXL v1.1 config with `overrides` applied."""
    from transformers import T5Config

    return T5Config(**{**T5_XXL_CONFIG, **overrides})


def tiny_clip_config(vocab_size: int = 1024, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 2,
                     intermediate_size: int = 64):
    """A tiny CLIP text config for tests and the quickstart (77 positions, like the real one, for the tokenizer)."""
    return clip_l_config(vocab_size=vocab_size, hidden_size=hidden_size, projection_dim=hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         intermediate_size=intermediate_size)


def tiny_t5_config(vocab_size: int = 512, d_model: int = 32, num_layers: int = 2, num_heads: int = 2, d_kv: int = 16,
                   d_ff: int = 64):
    """A tiny T5 encoder config for tests and the quickstart."""
    return t5xxl_config(vocab_size=vocab_size, d_model=d_model, num_layers=num_layers, num_heads=num_heads,
                        d_kv=d_kv, d_ff=d_ff)


def _shape(shapes: dict[str, tuple], key: str, path, what: str) -> tuple:
    if key not in shapes:
        raise ModelFileError(f"{path}: {what} file lacks {key!r}, cannot tell its architecture")
    return shapes[key]


def _count(shapes: dict[str, tuple], pattern: re.Pattern) -> int:
    return 1 + max((int(m.group(1)) for k in shapes if (m := pattern.match(k))), default=-1)


def _clip_shape_fields(shapes: dict[str, tuple], path) -> dict:
    """CLIP config fields implied by tensor shapes (keys without prefixes: `embeddings.token_embedding.weight`...)."""
    vocab, hidden = _shape(shapes, "embeddings.token_embedding.weight", path, "CLIP-L")
    return dict(
        vocab_size=vocab, hidden_size=hidden, num_attention_heads=max(hidden // 64, 1),
        projection_dim=shapes.get("text_projection.weight", (hidden,))[0],
        max_position_embeddings=_shape(shapes, "embeddings.position_embedding.weight", path, "CLIP-L")[0],
        num_hidden_layers=_count(shapes, _CLIP_LAYER),
        intermediate_size=_shape(shapes, "encoder.layers.0.mlp.fc1.weight", path, "CLIP-L")[0],
    )


def _t5_shape_fields(shapes: dict[str, tuple], path, d_kv: int) -> dict:
    """T5 config fields implied by tensor shapes (keys like `shared.weight`, `encoder.block.0...`)."""
    vocab, d_model = _shape(shapes, "shared.weight", path, "T5-XXL")
    attn = "encoder.block.0.layer.0.SelfAttention."
    ff = "encoder.block.0.layer.1.DenseReluDense."
    gated = ff + "wi_0.weight" in shapes  # T5 v1.1 (gated-gelu); v1.0 has a single `wi` with relu
    return dict(
        vocab_size=vocab, d_model=d_model, d_kv=d_kv,
        num_heads=max(_shape(shapes, attn + "q.weight", path, "T5-XXL")[0] // d_kv, 1),
        num_layers=_count(shapes, _T5_BLOCK),
        relative_attention_num_buckets=_shape(shapes, attn + "relative_attention_bias.weight", path, "T5-XXL")[0],
        d_ff=_shape(shapes, ff + ("wi_0.weight" if gated else "wi.weight"), path, "T5-XXL")[0],
        feed_forward_proj="gated-gelu" if gated else "relu",
    )


def _metadata_overrides(header) -> dict:
    raw = header.metadata.get(CONFIG_METADATA_KEY)
    if raw is None:
        return {}
    try:
        overrides = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{header.path}: metadata {CONFIG_METADATA_KEY!r} is not JSON ({e})") from None
    if not isinstance(overrides, dict):
        raise ModelFileError(f"{header.path}: metadata {CONFIG_METADATA_KEY!r} is not a JSON object")
    return overrides


# Flags T5EncoderModel rewrites on its own config (it is an encoder only): not architecture, never stored.
_NOT_STORED = {"is_encoder_decoder", "tie_word_embeddings"}


def _config_diff(config, inferred: dict, real: dict) -> dict:
    """The fields of `config` that loading would not reproduce from shapes + the real config alone."""
    expected = {**real, **inferred}
    return {k: getattr(config, k) for k in real if k not in _NOT_STORED and getattr(config, k) != expected[k]}


# ----------------------------------------------------------------------------------------------------------------
# Loading


def _empty_model(cls, config):
    # Parameters on `meta` (assigned from the file next), buffers real: CLIP's position_ids is not in the file.
    from accelerate import init_empty_weights

    with init_empty_weights():
        return cls(config)


def _finish(model, device):
    return model.to(device).eval()  # moves the buffers; parameters are already on `device`


def _clip_layout(header):
    """(config, {key without prefixes: key in the file}) for a CLIP-L file, harmless extras dropped."""
    expect_kind(header, "clip_l", "CLIP-L (--clip_l)")
    prefix = strip_prefix(header.keys, CLIP_PREFIXES)
    canonical = {key[len(prefix):].removeprefix("text_model."): key for key in header.keys}
    shapes = {k: header.tensors[f].shape for k, f in canonical.items()}
    config = clip_l_config(**{**_clip_shape_fields(shapes, header.path), **_metadata_overrides(header)})
    return config, {k: f for k, f in canonical.items() if k not in _CLIP_IGNORED}


def _t5_layout(header):
    """(config, {key without prefixes: key in the file}) for a T5 encoder file, the embedding as `shared.weight`."""
    expect_kind(header, "t5", "T5-XXL (--t5xxl)")
    keys = [k for k in header.keys if not fp8_scaled.is_scale_key(k)]  # a scaled fp8 file's scales and marker
    prefix = strip_prefix(keys, T5_PREFIXES)
    canonical = {key[len(prefix):]: key for key in keys}
    if "shared.weight" in canonical:
        canonical.pop("encoder.embed_tokens.weight", None)  # a stored copy of the tied embedding
    elif "encoder.embed_tokens.weight" in canonical:
        canonical["shared.weight"] = canonical.pop("encoder.embed_tokens.weight")
    shapes = {k: header.tensors[f].shape for k, f in canonical.items()}
    overrides = _metadata_overrides(header)
    inferred = _t5_shape_fields(shapes, header.path, int(overrides.get("d_kv", T5_XXL_CONFIG["d_kv"])))
    return t5xxl_config(**{**inferred, **overrides}), canonical


def clip_l_config_from_file(path: str | os.PathLike):
    """The `CLIPTextConfig` `load_clip_l` would build for this file, read from its header only."""
    return _clip_layout(read_header(path))[0]


def t5xxl_config_from_file(path: str | os.PathLike):
    """The `T5Config` `load_t5xxl` would build for this file, read from its header only."""
    return _t5_layout(read_header(path))[0]


def load_clip_l(path: str | os.PathLike, dtype: torch.dtype | str | None = None,
                device: str | torch.device = "cpu"):
    """Load a CLIP-L text encoder (`transformers.CLIPTextModel`, eval mode) from a safetensors file.

    Accepts the HF layout (`text_model.*`) under any of CLIP_PREFIXES, or without `text_model.`; ignores
    `text_projection.weight`, `logit_scale` and `position_ids`, and is otherwise strict. `dtype` None keeps the
    file's dtype. Parameters keep requires_grad=True (as transformers builds them): freeze them unless training.
    Raises ModelFileError naming the file when it is not a usable CLIP-L.
    """
    from transformers import CLIPTextModel

    config, canonical = _clip_layout(read_header(path))
    model = _empty_model(CLIPTextModel, config)
    # transformers 5 flattened CLIPTextModel (no `text_model.` level); 4.x has it.
    nested = any(k.startswith("text_model.") for k in model.state_dict())
    rename = {f: ("text_model." if nested else "") + k for k, f in canonical.items()}
    state = load_tensors(path, keys=list(rename), dtype=str_to_dtype(dtype), device=device, rename=rename)
    assign_weights(model, state, path)
    return _finish(model, device)


def load_t5xxl(path: str | os.PathLike, dtype: torch.dtype | str | None = None,
               device: str | torch.device = "cpu"):
    """Load a T5-XXL encoder (`transformers.T5EncoderModel`, eval mode) from a safetensors file.

    Accepts `encoder.*` + `shared.weight` under any of T5_PREFIXES; a file with `encoder.embed_tokens.weight`
    instead of (or beside) `shared.weight` works, the two are one tied tensor. Otherwise strict. `dtype` None keeps
    the file's dtypes as stored (an fp8 file stays fp8: running it needs an upcasting wrapper; a scaled fp8 file's
    scales become `scale_weight` buffers, see library/formats/fp8_scaled.py), a dtype dequantises. Parameters keep
    requires_grad=True: freeze them unless training. Raises ModelFileError naming the file when it is not a usable
    T5 encoder.
    """
    from transformers import T5EncoderModel

    header = read_header(path)
    config, canonical = _t5_layout(header)
    model = _empty_model(T5EncoderModel, config)
    model.set_input_embeddings(model.shared)  # tie explicitly: models built on meta are not tied yet
    rename = {f: k for k, f in canonical.items()}
    state = load_tensors(path, keys=list(rename), dtype=str_to_dtype(dtype), device=device, rename=rename)
    scale_keys = {k: fp8_scaled.scale_key(f) for k, f in canonical.items()
                  if k.endswith(".weight") and fp8_scaled.scale_key(f) in header.tensors}
    if scale_keys:  # ComfyUI's t5xxl_fp8_e4m3fn_scaled.safetensors
        scales = load_tensors(path, keys=list(scale_keys.values()))
        fp8_scaled.apply_scales(model, state, {k: scales[f] for k, f in scale_keys.items()}, str_to_dtype(dtype))
    if "encoder.embed_tokens.weight" in model.state_dict():
        state["encoder.embed_tokens.weight"] = state["shared.weight"]
    assign_weights(model, state, path)
    keep_t5_ff_output_in_fp32(model)
    return _finish(model, device)


def keep_t5_ff_output_in_fp32(model) -> None:
    """In an fp16 T5 put the feed-forward output projections (`wo`) back in fp32, as transformers does for T5
    (`_keep_in_fp32_modules`): their activations exceed fp16's range in T5-XXL, which gives inf and then NaN text
    embeddings. T5's own forward casts into them; `encode_prompts` runs such a T5 outside fp16 autocast."""
    import torch

    changed = False
    for name, module in model.named_modules():
        if name.endswith(".wo") and module.weight.dtype == torch.float16:
            module.float()
            changed = True
    if changed:
        model.keeps_ff_output_in_fp32 = True


# ----------------------------------------------------------------------------------------------------------------
# Saving (real-format keys, so other tools read our files)


def save_clip_l(model, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write a CLIPTextModel as `text_model.*` keys (the HF/ComfyUI layout), with the config metadata that
    `load_clip_l` needs when the config is not the real one."""
    tensors = {"text_model." + k.removeprefix("text_model."): v for k, v in model.state_dict().items()
               if not k.endswith("position_ids")}
    shapes = {k.removeprefix("text_model."): tuple(v.shape) for k, v in tensors.items()}
    diff = _config_diff(model.config, _clip_shape_fields(shapes, path), CLIP_L_CONFIG)
    meta = dict(metadata or {})
    if diff:
        meta[CONFIG_METADATA_KEY] = json.dumps(diff, sort_keys=True)
    save_file_atomic(tensors, path, meta)


def save_t5xxl(model, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write a T5EncoderModel as `encoder.*` + `shared.weight` (the layout of t5xxl_fp16.safetensors), with the
    config metadata that `load_t5xxl` needs when the config is not the real one."""
    tensors = {k: v for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    inferred = _t5_shape_fields(shapes, path, model.config.d_kv)
    diff = _config_diff(model.config, inferred, T5_XXL_CONFIG)
    if model.config.d_kv != T5_XXL_CONFIG["d_kv"]:
        diff["d_kv"] = model.config.d_kv  # shapes cannot tell d_kv from the head count
    meta = dict(metadata or {})
    if diff:
        meta[CONFIG_METADATA_KEY] = json.dumps(diff, sort_keys=True)
    save_file_atomic(tensors, path, meta)


def kohya_clip_root(clip: torch.nn.Module) -> torch.nn.Module:
    """CLIP-L as network modules name it: kohya (and LyCORIS) name CLIP-L modules by the transformers 4.x path
    (`text_model.encoder...`); transformers 5's CLIPTextModel has no `text_model` level, so it is put under one."""
    if hasattr(clip, "text_model"):
        return clip
    holder = torch.nn.Module()
    holder.text_model = clip
    return holder
