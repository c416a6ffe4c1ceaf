"""Prompt -> token ids -> FLUX text conditioning, shared by the trainers, the caches and inference.

sd-scripts splits this into a tokenize strategy and an encoding strategy held in global singletons (reference 4.4);
here they are a plain object and a plain function the caller owns.
"""

from __future__ import annotations

import contextlib

import torch

CLIP_MAX_LENGTH = 77


def t5_max_length_for(is_schnell: bool, override: int | None = None) -> int:
    """T5 token length (reference 5.6): --t5xxl_max_token_length when given, else 256 for schnell, 512 for dev."""
    if override is not None:
        return int(override)
    return 256 if is_schnell else 512


class FluxTokenizer:
    """Tokenizes prompts for CLIP-L and T5-XXL, each padded to its max length and truncated.

    Calling it with a prompt or a list of prompts returns `(clip_ids (B, 77), t5_ids (B, L), t5_mask (B, L))`, all
    int64; `t5_mask` is 1 for tokens (EOS included) and 0 for padding. A tokenizer given as None yields None for
    its outputs (e.g. a model without CLIP-L).
    """

    def __init__(self, clip_tokenizer, t5_tokenizer, t5_max_length: int = 512,
                 clip_max_length: int = CLIP_MAX_LENGTH):
        self.clip_tokenizer = clip_tokenizer
        self.t5_tokenizer = t5_tokenizer
        self.t5_max_length = t5_max_length
        self.clip_max_length = clip_max_length

    @staticmethod
    def _tokenize(tokenizer, prompts: list[str], max_length: int):
        return tokenizer(prompts, max_length=max_length, padding="max_length", truncation=True,
                         return_tensors="pt")

    def __call__(self, prompts: str | list[str]):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        clip_ids = t5_ids = t5_mask = None
        if self.clip_tokenizer is not None:
            clip_ids = self._tokenize(self.clip_tokenizer, prompts, self.clip_max_length)["input_ids"].long()
        if self.t5_tokenizer is not None:
            t5 = self._tokenize(self.t5_tokenizer, prompts, self.t5_max_length)
            t5_ids, t5_mask = t5["input_ids"].long(), t5["attention_mask"].long()
        return clip_ids, t5_ids, t5_mask


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def encode_prompts(clip_l, t5xxl, clip_ids: torch.Tensor | None, t5_ids: torch.Tensor | None,
                   t5_mask: torch.Tensor | None, apply_t5_attn_mask: bool = False):
    """Run the text encoders (reference 4.4 FluxTextEncodingStrategy) and return
    `(l_pooled (B, 768), t5_out (B, L, 4096), txt_ids (B, L, 3), t5_mask)`.

    - `l_pooled` is CLIP-L's `pooler_output` (final-LN hidden state at the EOS position).
    - `t5_out` is T5's `last_hidden_state`. With `apply_t5_attn_mask` (reference 6.10) the encoder sees `t5_mask`
      and the padded positions of `t5_out` after the first are set to zero; the first padding position keeps T5's
      output, which Chroma attends (as its reference pipelines do; FLUX masks every padding position, so it never
      reads it). Without the mask the encoder sees every position, as BFL's reference inference does.
    - `txt_ids` are zeros (float32) on `t5_out`'s device; `t5_mask` is returned as given (the tokenizer mask).
    - An encoder given as None yields None for its outputs (`txt_ids` too for T5), so callers can mix in cached
      halves. Inputs are moved to each encoder's device.

    Gradients follow the caller's mode: wrap the call in `torch.no_grad()` unless a text encoder is being trained.
    """
    l_pooled = t5_out = txt_ids = None
    if clip_l is not None:
        l_pooled = clip_l(input_ids=clip_ids.to(_device_of(clip_l))).pooler_output
    if t5xxl is not None:
        device = _device_of(t5xxl)
        mask = None
        if apply_t5_attn_mask:
            if t5_mask is None:
                raise ValueError("apply_t5_attn_mask needs the T5 attention mask")
            mask = t5_mask.to(device)
        # an fp16 T5 keeps its `wo` projections in fp32 (text_encoders.keep_t5_ff_output_in_fp32): fp16 autocast
        # would run them in fp16 again
        fp32_ff = getattr(t5xxl, "keeps_ff_output_in_fp32", False)
        with torch.autocast(device.type, enabled=False) if fp32_ff else contextlib.nullcontext():
            t5_out = t5xxl(input_ids=t5_ids.to(device), attention_mask=mask).last_hidden_state
        if mask is not None:  # tokens and the first padding position kept
            kept = torch.arange(mask.shape[1], device=device)[None] <= mask.sum(dim=1, keepdim=True)
            t5_out = t5_out * kept.unsqueeze(-1).to(t5_out.dtype)
        txt_ids = torch.zeros(t5_out.shape[0], t5_out.shape[1], 3, device=t5_out.device)
    return l_pooled, t5_out, txt_ids, t5_mask


def caption_encoder(tokenizer, clip_l, t5xxl, apply_t5_attn_mask: bool = False):
    """captions -> (l_pooled, t5_out, txt_ids, t5_mask) without gradients: what the text-encoder cache and any other
    consumer that knows no model is given, so text is tokenized and encoded in this one place."""

    @torch.no_grad()
    def encode(captions: list[str]):
        clip_ids, t5_ids, t5_mask = tokenizer(captions)
        return encode_prompts(clip_l, t5xxl, clip_ids, t5_ids, t5_mask, apply_t5_attn_mask)

    return encode
