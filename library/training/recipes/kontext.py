"""FLUX.1 Kontext training (`--model_type kontext`): the hooks the LoRA and full fine-tuning recipes take from this
mixin when the model is Kontext. The rest -- the network or the trained transformer, saving, resuming -- is theirs.

* data: subsets may name reference images (`reference_image_dir`); a dataset with them buckets with BFL's preferred
  sizes scaled to its resolution, and each reference is fitted to its target's bucket (library/data);
* the model: `KontextFlux(transformer)`: each batch's reference latents (cached, or encoded here with the AE's
  posterior mean) become tokens with ids (1, row, col) appended to the target's; noise goes on the target only and
  the wrapper returns the target tokens' prediction only, so the loss never sees the references;
* guidance: the variant table's training guidance (1.0) unless --guidance_scale is given (training/setup.py);
* sample images: a prompt's `--ri` images bound as its references, encoded as inference does (none: plain
  text-to-image);
* the file must fit: a transformer without guidance embedder (schnell) is refused; a file whose ModelSpec metadata
  says Kontext trains as Kontext under the default --model_type flux.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from library.data.images import check_images
from library.flow.references import ReferenceEncoder, bind_references
from library.models.checkpoint import analyze_checkpoint
from library.models.kontext import PREFERRED_KONTEXT_RESOLUTIONS, KontextFlux, reference_tokens
from library.models.variants import VARIANTS, ModelVariant
from library.training.errors import TrainingError
from library.training.settings import DatasetKinds
from library.training.setup import model_variant

logger = logging.getLogger(__name__)

KONTEXT = VARIANTS["kontext"]
REFERENCE_LAYOUT = "overlap"  # several references per item: each on its own grid at index 1 (DiffSynth's choice)


def is_kontext(args) -> bool:
    return getattr(args, "model_type", None) == KONTEXT.name


def run_variant(args) -> ModelVariant | None:
    """The run's variant from the transformer file's header (--model_type, else ModelSpec metadata, else keys), before
    the models load; None when the file cannot be read yet (loading reports that). A --model_type the keys
    contradict (kontext on a file without guidance embedder) is a TrainingError."""
    path = getattr(args, "pretrained_model_name_or_path", None)
    try:
        info = analyze_checkpoint(path) if path else None
    except (OSError, ValueError):
        return None
    return model_variant(args, info) if info is not None else None


def trains_kontext(args) -> bool:
    """Whether a run trains Kontext: the file's variant (--model_type or its ModelSpec), else --model_type alone."""
    variant = run_variant(args)
    return variant.reference_images if variant is not None else is_kontext(args)


def reference_inputs(latents: torch.Tensor) -> dict:
    """The wrapper's keyword inputs from reference latents (B, R, 16, h, w)."""
    tokens, ids = reference_tokens([latents[:, r] for r in range(latents.shape[1])], REFERENCE_LAYOUT)
    return {"reference_tokens": tokens, "reference_ids": ids}


@torch.no_grad()
def encode_reference_pixels(ae, images: torch.Tensor) -> torch.Tensor:
    """Reference pixels (B, R, 3, H, W) in [-1, 1] -> latents (B, R, 16, H/8, W/8) with the posterior mean."""
    b, r = images.shape[:2]
    flat = images.flatten(0, 1).to(next(ae.parameters()).device, ae.dtype)
    latents = torch.nan_to_num(ae.encode(flat, sample=False), 0.0).float()
    return latents.unflatten(0, (b, r))


class KontextHooks:
    """Mixin for a `Trainer` recipe (first in its bases): when the model is Kontext it answers the hooks above,
    otherwise it hands every hook to the recipe unchanged."""

    def __init__(self, args, settings=None):
        super().__init__(args, settings)
        self.kontext = trains_kontext(args)  # datasets are built before the models load: the file's header decides
        if self.kontext and getattr(args, "controlnet_model_name_or_path", None):
            raise TrainingError(f"--controlnet_model_name_or_path {args.controlnet_model_name_or_path}: LoRA "
                                "training through a frozen ControlNet does not take FLUX.1 Kontext yet (ControlNet "
                                "subsets have no reference images); train the Kontext LoRA without it")

    def dataset_kinds(self) -> DatasetKinds:
        kinds = super().dataset_kinds()
        if not self.kontext:
            return kinds
        return replace(kinds, support_reference=True, reference_buckets=PREFERRED_KONTEXT_RESOLUTIONS)

    def setup(self) -> None:
        super().setup()
        if not self.kontext:
            return
        with_refs = sum(1 for i in self.train_group.items if i.reference_paths)
        logger.info("FLUX.1 Kontext: %d of %d images with reference images; guidance %s", with_refs,
                    len(self.train_group.items), self.loss_fn.settings.guidance_scale)
        if not with_refs:
            logger.warning("FLUX.1 Kontext without reference images: no subset has 'reference_image_dir', so "
                           "every image trains text-to-image")
        if self.samples is not None:  # a sample prompt's --ri images, checked before the first step
            check_images([p for prompt in self.samples.prompts for p in prompt.reference_images])

    def denoiser(self) -> torch.nn.Module:
        model = super().denoiser()
        return KontextFlux(model) if self.kontext else model

    def model_inputs(self, batch) -> dict:
        inputs = super().model_inputs(batch)
        if not self.kontext:
            return inputs
        latents = batch.reference_latents
        if latents is None and batch.reference_images is not None:
            if self.models.ae is None:
                raise TrainingError("batch has reference images but no autoencoder was kept to encode them")
            latents = encode_reference_pixels(self.models.ae, batch.reference_images)
        return inputs if latents is None else {**inputs, **reference_inputs(latents)}

    def sampling_model(self, prompt) -> torch.nn.Module:
        """The prompt's `--ri` images encoded as flux_minimal_inference.py encodes them (library/flow/references.py:
        BFL's preferred size nearest each one's aspect ratio, AE mean), so a preview shows what inference renders."""
        model = super().sampling_model(prompt)
        paths = list(getattr(prompt, "reference_images", None) or [])
        if not self.kontext or not paths:
            return model
        if getattr(self, "_reference_encoder", None) is None:
            self._reference_encoder = ReferenceEncoder(self.models.ae, layout=REFERENCE_LAYOUT,
                                                       placement=self.samples.placement)
        return bind_references(model, self._reference_encoder(paths))
