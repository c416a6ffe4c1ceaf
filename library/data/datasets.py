"""Training datasets: bucketed batches built from resolved dataset configs, shared by every trainer.

Each dataset item is a whole batch from one bucket (as in sd-scripts). Unlike sd-scripts, the order of an epoch is
a pure function of (seed, epoch): the sampler hands `(epoch, index, step)` keys to `__getitem__`, so DataLoader
workers need no shared state, every random choice (flip, crop, caption shuffle) is reproducible, and a resumed run
sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from library.data.augment import color_aug, flip_horizontal
from library.data.batch import Batch, TextEncoderOutputs, TokenIds
from library.data.buckets import BucketPlanner, resize_and_crop, scaled_bucket_sizes
from library.data.captions import process_caption
from library.data.config import DatasetConfig, DatasetGroupConfig
from library.data.fill_masks import fill_inputs
from library.data.items import (ControlItem, ImageItem, ReferenceItem, balance_regularisation,
                                collect_subset_items, split_for_validation)
from library.data.images import BadImage, BadImageError, load_image
from library.data.tensors import to_tensor
from library.data.text_encoder_cache import stack_outputs

logger = logging.getLogger(__name__)

BatchKey = tuple[int, int, int]  # (epoch, batch index, global step for caption warm-up)


@dataclass
class BatchEntry:
    bucket: int  # index into FluxDataset.buckets
    start: int  # first position in the bucket's (shuffled) list


class FluxDataset(torch.utils.data.Dataset):
    """One `[[datasets]]` entry: its images in buckets, served as whole batches."""

    def __init__(self, config: DatasetConfig, items: list[ImageItem], seed: int, *, max_train_steps: int = 0,
                 conditioning_as_mask: bool = False, skip_bad_images: bool = False, control_latents: bool = False):
        self.config, self.items, self.seed = config, items, seed
        self.skip_bad_images = skip_bad_images
        self.undecodable: dict[Path, str] = {}  # files that failed to decode mid-run (this process), with reason
        self.max_train_steps = max_train_steps
        self.conditioning_as_mask = conditioning_as_mask
        self.control_latents = control_latents  # conditioning images are AE-encoded control inputs (control_inputs.py)
        self.tokenizer = self.latent_cache = self.te_cache = None  # see DatasetGroup.attach
        self.fill_inputs = False  # FLUX.1 Fill: samples also carry the picture and its mask (DatasetGroup.use_fill)
        self.fill_generator: str | None = None  # and draw masks for items without a mask file (fill_masks.py)
        self.fill_cache = None  # or serve cached masked-picture latents and masks (data/fill_cache.py)
        if config.bucket_sizes:  # FLUX.1 Kontext: the preferred sizes at the resolution's area
            self.planner = BucketPlanner.fixed(scaled_bucket_sizes(config.bucket_sizes, config.resolution))
        else:
            self.planner = BucketPlanner(config.resolution, config.enable_bucket, config.min_bucket_reso,
                                         config.max_bucket_reso, config.bucket_reso_steps, config.bucket_no_upscale)
        # a bucket is a size and a number of reference images: items with and without references never share a
        # batch, and the references of a batch stack (each fitted to the target's bucket)
        buckets: dict[tuple[tuple[int, int], int], list[int]] = {}
        self.ar_errors = []
        for index, item in enumerate(items):
            choice = self.planner.select(item.image_size)
            item.bucket_reso, item.resized_size = choice.bucket_reso, choice.resized_size
            self.ar_errors.append(abs(choice.ar_error))
            buckets.setdefault((choice.bucket_reso, len(item.reference_paths)), []).extend([index] * item.num_repeats)
        self.bucket_keys = sorted(buckets)
        self.bucket_resos = [reso for reso, _ in self.bucket_keys]
        self.buckets = [buckets[k] for k in self.bucket_keys]
        bs = config.batch_size
        self.entries = [BatchEntry(b, start) for b, content in enumerate(self.buckets)
                        for start in range(0, len(content), bs)]

    # --- sizes ----------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def latent_items(self) -> list:
        """What the latent cache encodes: every image and every reference image (fitted to its image's bucket), and
        every conditioning image when they are encoded control inputs (through their target's geometry)."""
        controls = [i.control_item() for i in self.items if i.conditioning_path is not None] \
            if self.control_latents else []
        return [*self.items, *(r for i in self.items for r in i.reference_items()), *controls]

    @property
    def num_train_images(self) -> int:
        """Images per epoch with repeats (regularisation included), as sd-scripts counts them."""
        return sum(len(b) for b in self.buckets)

    def bucket_table(self) -> list[dict]:
        return [{"resolution": list(r), "count": len(b)} for r, b in zip(self.bucket_resos, self.buckets)]

    # --- batches --------------------------------------------------------------------------------------------------

    def _bucket_order(self, epoch: int, bucket: int) -> list[int]:
        order = list(self.buckets[bucket])
        random.Random(f"{self.seed}:{epoch}:{bucket}").shuffle(order)
        return order

    def __getitem__(self, key: int | BatchKey) -> Batch:
        epoch, index, step = (1, key, 0) if isinstance(key, int) else key
        entry = self.entries[index]
        members = self._bucket_order(epoch, entry.bucket)[entry.start: entry.start + self.config.batch_size]
        skipped: list[BadImage] = []
        samples = [self._sample_or_substitute(i, entry.bucket, f"{self.seed}:{epoch}:{index}:{j}", epoch, step,
                                              skipped) for j, i in enumerate(members)]
        batch = self._collate(samples)
        batch.skipped_images = [(str(b.path), b.reason) for b in skipped]
        return batch

    def _sample_or_substitute(self, index: int, bucket: int, rng_key: str, epoch: int, step: int,
                              skipped: list[BadImage]) -> dict:
        """The sample of item `index`; with --skip_bad_images, an image that fails to decode is replaced by the next
        good one of the same bucket in the epoch's order (the batch keeps its shape, and the choice depends only on
        the key and the files, so a resumed run makes the same one); the failures go into `skipped`."""
        candidates = [index]
        if self.skip_bad_images:
            candidates += [i for i in dict.fromkeys(self._bucket_order(epoch, bucket)) if i != index]
        for i in candidates:
            item = self.items[i]
            known = self.undecodable.get(item.absolute_path)
            try:
                if known is not None:
                    raise BadImageError([BadImage(item.absolute_path, known)])
                return self._sample(item, random.Random(rng_key), epoch, step)
            except BadImageError as e:
                if not self.skip_bad_images:
                    raise BadImageError([BadImage(e.path, f"{e.reason} (--skip_bad_images skips such files)")]) \
                        from None
                self.undecodable.setdefault(item.absolute_path, e.reason)
                skipped.append(e.bad_images[0])
        raise BadImageError([BadImage(self.items[index].absolute_path, "no image of its bucket "
                                      f"{self.bucket_resos[bucket]} can be decoded")])

    def _sample(self, item: ImageItem, rng: random.Random, epoch: int, step: int) -> dict:
        flipped = item.flip_aug and rng.random() < 0.5
        out = {"item": item, "flipped": flipped, "loss_weight": self.config.prior_loss_weight if item.is_reg else 1.0}
        if self.latent_cache is not None:
            entry = self.latent_cache.get(item)
            out["latents"] = entry.latents_flipped if flipped else entry.latents
            mask = entry.alpha_mask
            if mask is not None and flipped:
                mask = torch.flip(mask, dims=[-1])
            out["alpha_mask"] = mask
        else:
            image, alpha, _, _ = self.load_pixels(item, rng)
            if flipped:
                image, alpha = flip_horizontal(image, alpha)
            if item.subset.color_aug:
                image = color_aug(image, rng)
            out.update(image=to_tensor(image), alpha_mask=torch.from_numpy(alpha) if alpha is not None else None)
        if item.reference_paths:
            out.update(self._references(item, flipped))
        if item.conditioning_path is not None and self.control_latents and self.latent_cache is not None:
            entry = self.latent_cache.get(item.control_item())
            out["control_latents"] = entry.latents_flipped if flipped else entry.latents
        elif item.conditioning_path is not None:
            cond = self.load_conditioning(item, flipped)
            out["conditioning_image"] = cond
            if self.conditioning_as_mask:  # masked loss from the conditioning image's red channel
                out["alpha_mask"] = (cond[0] + 1) / 2
        if self.fill_inputs:
            out.update(fill_inputs(self, item, out, flipped, step))
        out["caption"] = (item.te_caption if self.te_cache is not None else
                          process_caption(item.caption, item.caption_options, rng, epoch, step, self.max_train_steps))
        return out

    def _references(self, item: ImageItem, flipped: bool) -> dict:
        """The item's reference images fitted to its bucket (flipped with it): cached latents, else pixels."""
        refs = item.reference_items()
        if self.latent_cache is not None:
            entries = [self.latent_cache.get(r) for r in refs]
            return {"reference_latents": torch.stack([e.latents_flipped if flipped else e.latents for e in entries])}
        images = []
        for ref in refs:
            rgb = self.load_pixels(ref)[0]
            images.append(to_tensor(flip_horizontal(rgb)[0] if flipped else rgb))
        return {"reference_images": torch.stack(images)}

    def load_pixels(self, item: ImageItem | ReferenceItem | ControlItem, rng: random.Random | None = None):
        """(rgb at bucket size, alpha or None, crop_ltrb, crop left/top): decode, resize and crop one image."""
        if isinstance(item, ControlItem):
            return self._conditioning_pixels(item.target)
        image, alpha = load_image(item.absolute_path, with_alpha=item.alpha_mask)
        interpolation = item.resize_interpolation or self.config.resize_interpolation
        return resize_and_crop(image, item.resized_size, item.bucket_reso, interpolation,
                               item.subset.random_crop, rng, alpha)

    def load_conditioning(self, item: ImageItem, flipped: bool) -> torch.Tensor:
        """The conditioning image through the target's exact geometry: scaled to the target's original size first,
        then the same resize and centre crop, so the two stay aligned whatever their own aspect ratios."""
        cond = self._conditioning_pixels(item)[0]
        if flipped:
            cond, _ = flip_horizontal(cond)
        return to_tensor(cond)

    def _conditioning_pixels(self, item: ImageItem):
        """load_pixels' tuple for an item's conditioning image, through the item's geometry (load_conditioning)."""
        import cv2

        cond, _ = load_image(item.conditioning_path)
        if (cond.shape[1], cond.shape[0]) != item.image_size:
            cond = cv2.resize(cond, item.image_size, interpolation=cv2.INTER_AREA)
        interpolation = item.resize_interpolation or self.config.resize_interpolation
        return resize_and_crop(cond, item.resized_size, item.bucket_reso, interpolation)

    def _collate(self, samples: list[dict]) -> Batch:
        items = [s["item"] for s in samples]
        captions = [s["caption"] for s in samples]
        text_encoder_outputs = token_ids = None
        if self.te_cache is not None:
            text_encoder_outputs = TextEncoderOutputs(*stack_outputs([self.te_cache.get(i) for i in items]))
        elif self.tokenizer is not None:
            token_ids = TokenIds(*self.tokenizer(captions))
        return Batch(
            captions=captions,
            loss_weights=torch.tensor([s["loss_weight"] for s in samples], dtype=torch.float32),
            latents=torch.stack([s["latents"] for s in samples]) if "latents" in samples[0] else None,
            images=torch.stack([s["image"] for s in samples]) if "image" in samples[0] else None,
            alpha_masks=_stack_masks(samples),
            conditioning_images=(torch.stack([s["conditioning_image"] for s in samples])
                                 if "conditioning_image" in samples[0] else None),
            fill_images=torch.stack([s["fill_image"] for s in samples]) if "fill_image" in samples[0] else None,
            fill_masks=torch.stack([s["fill_mask"] for s in samples]) if "fill_mask" in samples[0] else None,
            fill_latents=torch.stack([s["fill_latents"] for s in samples]) if "fill_latents" in samples[0] else None,
            control_latents=(torch.stack([s["control_latents"] for s in samples])
                             if "control_latents" in samples[0] else None),
            reference_latents=(torch.stack([s["reference_latents"] for s in samples])
                               if "reference_latents" in samples[0] else None),
            reference_images=(torch.stack([s["reference_images"] for s in samples])
                              if "reference_images" in samples[0] else None),
            text_encoder_outputs=text_encoder_outputs,
            token_ids=token_ids,
            custom_attributes=[i.subset.custom_attributes for i in items],
            image_keys=[str(i.absolute_path) for i in items],
        )


def _stack_masks(samples: list[dict]) -> torch.Tensor | None:
    masks = [s.get("alpha_mask") for s in samples]
    if all(m is None for m in masks):
        return None
    shape = next(m for m in masks if m is not None).shape
    return torch.stack([m if m is not None else torch.ones(shape) for m in masks])


class DatasetGroup(torch.utils.data.Dataset):
    """All datasets of a run. Keys are (epoch, global batch index, step); see EpochBatchSampler."""

    def __init__(self, datasets: Sequence[FluxDataset], seed: int):
        self.datasets, self.seed = list(datasets), seed
        self.offsets = np.cumsum([0] + [len(d) for d in self.datasets])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, key: int | BatchKey) -> Batch:
        epoch, index, step = (1, key, 0) if isinstance(key, int) else key
        d = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return self.datasets[d][(epoch, index - int(self.offsets[d]), step)]

    def attach(self, tokenizer=None, latent_cache=None, te_cache=None) -> None:
        """Give every dataset what its batches need once models exist: cached latents instead of images, cached
        text-encoder outputs instead of token ids (a tokenizer otherwise)."""
        for d in self.datasets:
            d.tokenizer, d.latent_cache, d.te_cache = tokenizer, latent_cache, te_cache

    def use_fill(self, generator: str | None) -> None:
        """FLUX.1 Fill: batches carry each picture and its mask (file, else drawn by `generator`)."""
        for d in self.datasets:
            d.fill_inputs, d.fill_generator = True, generator

    @property
    def items(self) -> list[ImageItem]:
        return [i for d in self.datasets for i in d.items]

    def epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self)))
        random.Random(f"{self.seed}:order:{epoch}").shuffle(order)
        return order

    @property
    def num_train_images(self) -> int:
        return sum(d.num_train_images for d in self.datasets)


class EpochBatchSampler(torch.utils.data.Sampler):
    """Yields this process's keys of one epoch in its seeded order; `set_epoch` before iterating, `skip` batches
    on resume. With several processes, rank r takes every n-th batch of the epoch order; the shorter ranks repeat
    their first batch (a rank with none the epoch's first) so every rank runs the same number of steps.

    The step passed with each key counts batches from the start of training (for caption token warm-up)."""

    def __init__(self, group: DatasetGroup, epoch: int = 1, skip: int = 0, process_index: int = 0,
                 num_processes: int = 1):
        self.group, self.epoch, self.skip = group, epoch, skip
        self.process_index, self.num_processes = process_index, num_processes

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    @property
    def batches_per_epoch(self) -> int:
        """Batches each process sees in a whole epoch."""
        return math.ceil(len(self.group) / self.num_processes)

    def __len__(self) -> int:
        return max(self.batches_per_epoch - self.skip, 0)

    def __iter__(self) -> Iterator[BatchKey]:
        order = self.group.epoch_order(self.epoch)
        mine = order[self.process_index::self.num_processes]
        # fewer batches than processes leaves a rank none: it repeats the epoch's first (a rank that trained no
        # step would wait forever in the others' next collective: validation, sampling, saving)
        mine += (mine or order)[: self.batches_per_epoch - len(mine)]
        base = (self.epoch - 1) * self.batches_per_epoch
        for position in range(self.skip, len(mine)):
            yield self.epoch, mine[position], base + position


def build_datasets(group_config: DatasetGroupConfig, seed: int, *, skip_bad_images: bool = False,
                   max_train_steps: int = 0, conditioning_as_mask: bool = False, verify_images: bool = False,
                   control_latents: bool = False) -> tuple[DatasetGroup, DatasetGroup | None]:
    """Training and validation DatasetGroups (validation None when no dataset asks for a split). `verify_images`:
    decode every image in full up front (see collect_subset_items)."""
    train, val = [], []
    for index, config in enumerate(group_config.datasets):
        subset_items = collect_subset_items(config, skip_bad_images, verify=verify_images)
        split_seed = config.validation_seed if config.validation_seed is not None else seed + index
        if config.kind == "dreambooth" and 0 < config.validation_split <= 1:
            train_items, val_items = split_for_validation(subset_items, config.validation_split, split_seed)
        else:
            train_items, val_items = [i for s in subset_items for i in s.items], []
        balance_regularisation(train_items)
        options = dict(max_train_steps=max_train_steps, conditioning_as_mask=conditioning_as_mask,
                       skip_bad_images=skip_bad_images, control_latents=control_latents)
        train.append(FluxDataset(config, train_items, seed + index, **options))
        if val_items:
            val.append(FluxDataset(config, val_items, seed + index, **options))
    return DatasetGroup(train, seed), (DatasetGroup(val, seed) if val else None)


def steps_per_epoch(num_batches: int, num_processes: int = 1, gradient_accumulation_steps: int = 1) -> int:
    """Optimizer steps per epoch: batches split over processes, then accumulated (reference 3.11)."""
    return math.ceil(math.ceil(num_batches / num_processes) / gradient_accumulation_steps)


def max_train_steps_for(num_batches: int, max_train_steps: int, max_train_epochs: int | None,
                        num_processes: int = 1, gradient_accumulation_steps: int = 1) -> int:
    """--max_train_epochs overrides --max_train_steps (reference 3.11)."""
    if max_train_epochs:
        return max_train_epochs * math.ceil(num_batches / num_processes / gradient_accumulation_steps)
    return max_train_steps


def num_train_epochs(max_train_steps: int, steps_in_epoch: int) -> int:
    return math.ceil(max_train_steps / max(steps_in_epoch, 1))
