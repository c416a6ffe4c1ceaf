"""What a training step receives: one bucket's samples, collated by `FluxDataset` (or built by the memory planner).

The DataLoader runs with `batch_size=None`, so a `Batch` passes through it (and its worker processes) unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch


class TextEncoderOutputs(NamedTuple):
    """Cached text-encoder outputs of a batch, as `text_encoder_cache.stack_outputs` collates them."""

    l_pooled: torch.Tensor | None  # (B, 768) CLIP-L pooled output
    t5_out: torch.Tensor | None  # (B, L, 4096) T5-XXL last hidden state
    txt_ids: torch.Tensor | None  # (B, L, 3) zeros
    t5_attn_mask: torch.Tensor | None  # (B, L) int64, 0 marks padding


class TokenIds(NamedTuple):
    """Token ids of a batch's captions, as `FluxTokenizer` returns them (None for a missing tokenizer)."""

    clip_ids: torch.Tensor | None  # (B, 77) int64
    t5_ids: torch.Tensor | None  # (B, L) int64
    t5_mask: torch.Tensor | None  # (B, L) int64, 0 marks padding


@dataclass
class Batch:
    """One training batch. Exactly one of `latents` / `images` is set, and at most one of `text_encoder_outputs` /
    `token_ids` (neither before the dataset is given a tokenizer or a text-encoder cache)."""

    captions: list[str]  # processed (shuffled, dropped out, ...) or, with cached outputs, the caption encoded
    loss_weights: torch.Tensor  # (B,) float32: prior_loss_weight for regularisation images, else 1
    latents: torch.Tensor | None = None  # (B, 16, h, w) float32 from the latent cache
    images: torch.Tensor | None = None  # (B, 3, H, W) in [-1, 1], to be encoded by the autoencoder
    alpha_masks: torch.Tensor | None = None  # (B, H, W) in [0, 1] at bucket size; ones for samples without one
    conditioning_images: torch.Tensor | None = None  # (B, 3, H, W) in [-1, 1], ControlNet input
    # the conditioning images as cached AE latents (posterior mean), for recipes that encode them (Flex.2)
    control_latents: torch.Tensor | None = None  # (B, 16, h, w) float32
    # FLUX.1 Kontext: each sample's R reference images at its bucket size, as cached latents (posterior mean) or as
    # pixels to encode; None in batches without references (plain text-to-image items)
    reference_latents: torch.Tensor | None = None  # (B, R, 16, h, w) float32
    reference_images: torch.Tensor | None = None  # (B, R, 3, H, W) in [-1, 1]
    text_encoder_outputs: TextEncoderOutputs | None = None
    token_ids: TokenIds | None = None
    custom_attributes: list[dict] = field(default_factory=list)  # each sample's subset's, e.g. diff_output_preservation
    image_keys: list[str] = field(default_factory=list)  # image paths: which samples these are (read by tests)
    # (path, reason) of images that failed to decode and were replaced (--skip_bad_images), for the run's summary
    skipped_images: list[tuple[str, str]] = field(default_factory=list)
