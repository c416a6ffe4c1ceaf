"""One FLUX flow-matching loss evaluation for a batch, shared by every recipe.

batch -> latents (cached or encoded) and text conditioning (cached or encoded) -> sigma and noise -> the recipe's
model (the transformer, or a wrapper such as ControlledFlux, with the recipe's extra inputs from the batch)
-> prediction-type transform -> element-wise loss -> weighting, masks, per-sample weights -> scalar.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch

from library.data.batch import Batch
from library.flow.matching import (FlowMatchingSettings, apply_model_prediction_type, conditional_loss, flow_target,
                                   guidance_vector, huber_c_for, noisy_input, reduce_loss, sample_sigmas)
from library.models.packing import pack_latents, prepare_img_ids, unpack_latents
from library.models.text_encoding import encode_prompts


@dataclass
class TextConditioning:
    l_pooled: torch.Tensor
    t5_out: torch.Tensor
    txt_ids: torch.Tensor
    t5_mask: torch.Tensor | None


@dataclass
class FluxLossComputer:
    """Everything the loss needs besides the batch. `ae`, `clip_l`, `t5xxl` may be None when their outputs are
    cached; `train_text_encoders` keeps gradients through live text encoding (text-encoder LoRA)."""

    settings: FlowMatchingSettings
    model: torch.nn.Module  # called with the transformer's signature: the transformer or a recipe's wrapper of it
    device: torch.device
    dtype: torch.dtype  # activations' dtype (weight dtype or the autocast dtype)
    ae: torch.nn.Module | None = None
    clip_l: torch.nn.Module | None = None
    t5xxl: torch.nn.Module | None = None
    apply_t5_attn_mask: bool = False
    masked_loss: bool = False
    train_text_encoders: bool = False
    # a context in which the trainable delta is switched off (LoRA multiplier 0): differential output preservation
    reference_model: Callable[[], ContextManager] | None = None
    # a recipe's extra keyword inputs of `model` taken from the batch (ControlNet: its conditioning images)
    model_inputs: Callable[[object], dict] | None = None

    def latents(self, batch: Batch, generator: torch.Generator | None = None) -> torch.Tensor:
        if batch.latents is not None:
            return batch.latents.to(self.device, self.dtype)
        if self.ae is None:
            raise RuntimeError("batch has no cached latents and no autoencoder was kept to encode images")
        with torch.no_grad():
            latents = self.ae.encode(batch.images.to(self.device, self.ae.dtype), sample=True, generator=generator)
        return torch.nan_to_num(latents, 0.0).to(self.dtype)

    def text(self, batch: Batch) -> TextConditioning:
        cached = batch.text_encoder_outputs
        if cached is not None:
            l_pooled, t5_out, txt_ids, t5_mask = cached
        else:
            clip_ids, t5_ids, t5_mask = batch.token_ids
            grad = torch.enable_grad() if self.train_text_encoders else torch.no_grad()
            with grad:
                l_pooled, t5_out, txt_ids, t5_mask = encode_prompts(self.clip_l, self.t5xxl, clip_ids, t5_ids,
                                                                    t5_mask, self.apply_t5_attn_mask)
        to = dict(device=self.device, dtype=self.dtype)
        mask = t5_mask.to(self.device) if (self.apply_t5_attn_mask and t5_mask is not None) else None
        return TextConditioning(l_pooled.to(**to), t5_out.to(**to), txt_ids.to(**to), mask)

    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, text: TextConditioning,
                extra: dict | None = None) -> torch.Tensor:
        """The model's velocity for latents (B, 16, h, w), unpacked back to that shape; `extra`: the recipe's
        additional model inputs for this batch."""
        b, _, h, w = noisy.shape
        img_ids = prepare_img_ids(b, h // 2, w // 2).to(self.device, self.dtype)
        inputs = dict(img=pack_latents(noisy), img_ids=img_ids, txt=text.t5_out, txt_ids=text.txt_ids,
                      timesteps=sigmas.to(self.dtype), y=text.l_pooled,
                      guidance=guidance_vector(self.settings, b, self.device, self.dtype),
                      txt_attention_mask=text.t5_mask)
        return unpack_latents(self.model(**inputs, **(extra or {})), h // 2, w // 2)

    def __call__(self, batch: Batch, *, sigmas: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean loss of the batch. Validation passes fixed `sigmas` and `noise` so its numbers compare across steps."""
        latents = self.latents(batch, generator)
        text = self.text(batch)
        b, _, h, w = latents.shape
        if noise is None:
            noise = torch.randn(latents.shape, generator=generator, device="cpu" if generator else self.device)
        noise = noise.to(self.device, self.dtype)
        if sigmas is None:
            sigmas = sample_sigmas(self.settings, b, self.device, generator, image_seq_len=(h // 2) * (w // 2))
        sigmas = sigmas.to(self.device)
        noisy = noisy_input(latents, noise, sigmas, self.settings, generator).to(self.dtype)
        extra = self.model_inputs(batch) if self.model_inputs is not None else None
        pred, weighting = apply_model_prediction_type(self.predict(noisy, sigmas, text, extra), noisy, sigmas,
                                                      self.settings)
        target = self._preserved_target(batch, flow_target(noise, latents), noisy, sigmas, text, extra)
        huber_c = huber_c_for(self.settings, sigmas) if self.settings.loss_type in ("huber", "smooth_l1") else None
        loss = conditional_loss(pred.float(), target.float(), self.settings.loss_type, huber_c)
        mask = self._mask(batch) if self.masked_loss or batch.alpha_masks is not None else None
        return reduce_loss(loss, weighting, mask, batch.loss_weights.to(self.device))

    def _mask(self, batch: Batch) -> torch.Tensor | None:
        mask = batch.alpha_masks
        return mask.to(self.device, torch.float32) if mask is not None else None

    def _preserved_target(self, batch, target, noisy, sigmas, text, extra):
        """Differential output preservation: samples whose subset sets custom_attributes.diff_output_preservation
        learn the base model's prediction (delta switched off) instead of the data."""
        keep = [bool(a.get("diff_output_preservation")) for a in batch.custom_attributes]
        if not any(keep) or self.reference_model is None:
            return target
        with torch.no_grad(), (self.reference_model() or nullcontext()):
            base, _ = apply_model_prediction_type(self.predict(noisy, sigmas, text, extra), noisy, sigmas,
                                                  self.settings)
        idx = torch.tensor(keep, device=target.device)
        return torch.where(idx[:, None, None, None], base.to(target.dtype), target)
