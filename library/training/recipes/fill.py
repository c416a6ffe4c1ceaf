"""FLUX.1 Fill training (a Fill transformer: img_in taking 384 features): the hooks the LoRA and full fine-tuning
recipes take from this mixin when the model is Fill. The rest -- the network or the trained transformer, saving,
resuming, block swapping, fp8 bases -- is theirs.

* data: each image's mask comes from its subset's `fill_mask_dir` (matched by file stem; every missing or unreadable
  mask is listed in one error before the models load) or is drawn per step by `--fill_masks` (library/data/
  fill_masks.py: seeded by the run's seed, the step and the image's path, so a resumed run draws the same); batches
  carry the picture as trained (flip included) and the mask at bucket size;
* the condition: `image * (1 - mask)` -> the AE's posterior mean -> packed (64), the mask by 8x8 space-to-depth ->
  packed (256) (library/models/fill.py), concatenated to every noisy token by `ExtraChannelsFlux`. With --cache_latents
  and a mask file for every image of a dataset, the masked pictures' latents and the masks are cached once
  (library/data/fill_cache.py, the target latents' staleness rules plus the mask file's hash). Otherwise (drawn masks
  change every step) the masked picture is encoded live: the AE stays on the device even with --cache_latents, and
  with cached target latents each picture is also decoded from its file every step -- one AE encoder pass per image
  per step (~ training without --cache_latents);
* loss: on every target token by default (DiffSynth); `--fill_kept_loss_weight W` weighs the kept area by W (0: the
  generated area only), through the loss's per-pixel mask (multiplied with an alpha mask when there is one);
* guidance: the variant table's training guidance (30, BFL's inference default) unless --guidance_scale is given;
* sample images: pure generation (an all-ones mask over a blank picture), as library/flow/fill.py defines it.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from library.data.config import load_dataset_config
from library.data.images import check_images
from library.data.cache_common import model_file_identity
from library.data.fill_cache import FillCache
from library.flow.fill import bind_fill, blank_canvas, fit_to, load_fill_canvas
from library.models.checkpoint import analyze_checkpoint
from library.models.conditioned import ExtraChannelsFlux
from library.models.fill import condition_tokens, encode_masked_image, fill_features
from library.training.errors import TrainingError
from library.training.recipes.fill_options import fill_options_given
from library.training.settings import DatasetKinds
from library.training.setup import model_variant

logger = logging.getLogger(__name__)

FILL = "fill"  # the variant (library/models/variants.py); Flex.2 also inpaints, with its own recipe mixin


def trains_fill(args) -> bool:
    """Whether the run's transformer is FLUX.1 Fill, from the file's header (--model_type, metadata, img_in width);
    False when the file cannot be read yet (loading reports that)."""
    path = getattr(args, "pretrained_model_name_or_path", None)
    try:
        info = analyze_checkpoint(path) if path else None
    except (OSError, ValueError):
        return getattr(args, "model_type", None) == FILL
    return info is not None and model_variant(args, info).name == FILL  # contradicting --model_type: TrainingError


def loss_weights(masks: torch.Tensor, kept_weight: float, alpha: torch.Tensor | None) -> torch.Tensor:
    """Per-pixel loss weights (B, H, W): 1 where the mask generates, `kept_weight` where it keeps (fractions in
    between), times the alpha mask when there is one."""
    weights = kept_weight + (1.0 - kept_weight) * masks.float()
    return weights if alpha is None else weights * alpha.to(weights.device, weights.dtype)


class FillHooks:
    """Mixin for a `Trainer` recipe (first in its bases): when the model is Fill it answers the hooks above,
    otherwise it hands every hook to the recipe unchanged (and refuses the Fill options)."""

    def __init__(self, args, settings=None):
        super().__init__(args, settings)
        self.fill = trains_fill(args)  # datasets are built before the models load: the file's header decides

    def dataset_kinds(self) -> DatasetKinds:
        kinds = super().dataset_kinds()
        return replace(kinds, support_fill=True) if self.fill else kinds

    def setup(self) -> None:
        args = self.args
        given = fill_options_given(args)
        if given and not self.fill:
            raise TrainingError(f"{' and '.join(given)}: for FLUX.1 Fill training, but "
                                f"{args.pretrained_model_name_or_path} is not a Fill model (img_in taking 384 "
                                f"features); remove them")
        if self.fill and getattr(args, "controlnet_model_name_or_path", None):
            raise TrainingError("--controlnet_model_name_or_path with FLUX.1 Fill is not supported (a ControlNet takes "
                                "64 features per token; Fill's img_in takes 384)")
        if self.fill and not args.fill_masks:  # every subset must then name its masks, checked before models load
            config = load_dataset_config(args, **self.dataset_kinds().config_flags())
            without = [s.where for s in config.all_subsets() if s.fill_mask_dir is None]
            if without:
                raise TrainingError(f"FLUX.1 Fill training needs a mask per image: {'; '.join(without)} has no "
                                    f"'fill_mask_dir'; add one or pass --fill_masks rectangles|strokes|mixed")
        super().setup()
        fill_inputs = [p for prompt in (self.samples.prompts if self.samples is not None else [])
                       for p in (getattr(prompt, "fill_image", None), getattr(prompt, "fill_mask", None)) if p]
        if not self.fill:
            if fill_inputs:
                logger.warning("sample prompts' --fi/--fm (FLUX.1 Fill pictures) are ignored: the model is not Fill")
            return
        check_images(fill_inputs)  # a sample prompt's picture or mask, before the first step
        for group in (self.train_group, self.val_group):
            if group is not None:
                group.use_fill(args.fill_masks)
        cached = self._cache_fill_latents()
        if not cached:
            self.models.ae.to(self.accelerator.device)  # masked pictures are encoded every step
        with_files = sum(1 for i in self.train_group.items if i.fill_mask_path is not None)
        logger.info("FLUX.1 Fill: %d of %d images with mask files, the rest drawn by --fill_masks %s; masked "
                    "pictures %s; kept-area loss weight %s; guidance %s", with_files, len(self.train_group.items),
                    args.fill_masks, "cached" if cached else "encoded every step", args.fill_kept_loss_weight,
                    self.loss_fn.settings.guidance_scale)

    def _cache_fill_latents(self) -> bool:
        """With --cache_latents, datasets whose every image has a mask file get their masked-picture latents cached
        (library/data/fill_cache.py); True when every dataset did (the AE is then not needed on the device)."""
        args, acc = self.args, self.accelerator
        datasets = [d for g in (self.train_group, self.val_group) if g is not None for d in g.datasets]
        if not args.cache_latents:
            return False
        cache = FillCache(args.cache_latents_to_disk, model_file_identity(args.ae), args.skip_cache_check)
        ae = self.models.ae
        ae.to(acc.device)

        def encode(pixels, masks):
            return encode_masked_image(ae, pixels.to(acc.device), masks.to(acc.device))

        done = []
        for d in datasets:
            if d.items and all(i.fill_mask_path is not None for i in d.items):
                cache.cache(d, encode, acc.process_index, acc.num_processes, acc.wait_for_everyone,
                            acc.is_local_main_process)
                d.fill_cache = cache
                done.append(d)
        if len(done) == len(datasets):
            self.models.free_unneeded(args, acc.device, keep_text_encoders=self.trains_text_encoder)
            return True
        return False

    def denoiser(self) -> torch.nn.Module:
        model = super().denoiser()
        return ExtraChannelsFlux(model) if self.fill else model

    def model_inputs(self, batch) -> dict:
        inputs = super().model_inputs(batch)
        if not self.fill:
            return inputs
        if (batch.fill_images is None and batch.fill_latents is None) or batch.fill_masks is None:
            raise TrainingError("a FLUX.1 Fill batch without pictures and masks (the datasets were not prepared "
                                "for Fill)")
        if batch.fill_latents is not None:  # cached (mask files, --cache_latents)
            features = condition_tokens(batch.fill_latents, batch.fill_masks)
        else:
            ae = self.models.ae
            device = next(ae.parameters()).device
            features = fill_features(ae, batch.fill_images.to(device), batch.fill_masks.to(device))
        if self.args.fill_kept_loss_weight != 1.0 and not batch.__dict__.get("_fill_weighted"):
            # the loss reads batch.alpha_masks as per-pixel weights (once per batch: a batch seen again keeps them)
            batch.alpha_masks = loss_weights(batch.fill_masks, self.args.fill_kept_loss_weight, batch.alpha_masks)
            batch.__dict__["_fill_weighted"] = True
        return {**inputs, "extra_channels": features}

    def sampling_model(self, prompt) -> torch.nn.Module:
        """A sample prompt's `--fi` picture and `--fm` mask (library/flow/fill.py's rules), resized to the prompt's
        size; without `--fi`, pure generation (an all-ones mask over a blank picture). Encoded once per picture, mask
        and size with the AE."""
        model = super().sampling_model(prompt)
        if not self.fill:
            return model
        cache = self.__dict__.setdefault("_sample_features", {})
        image, mask = getattr(prompt, "fill_image", None), getattr(prompt, "fill_mask", None)

        def features(timesteps, img_ids):
            h, w = int(img_ids[0, :, 1].max()) + 1, int(img_ids[0, :, 2].max()) + 1
            key = (image, mask, h, w)
            if key not in cache:
                canvas = blank_canvas(w * 16, h * 16) if image is None else load_fill_canvas(image, mask)
                pixels, masks = fit_to(canvas.image, canvas.mask, (w * 16, h * 16))
                ae = self.models.ae
                device = next(ae.parameters()).device
                cache[key] = fill_features(ae, pixels.to(device), masks.to(device))
            return cache[key]

        return bind_fill(model, features)
