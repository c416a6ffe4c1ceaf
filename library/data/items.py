"""Finding the images of each subset: files, captions, sizes, repeats, regularisation balance, validation split.

Everything here runs before any model loads. Every image (and ControlNet conditioning image, and FLUX.1 Kontext
reference image) is probed from its header, so a bad file stops the run up front with the full list of problems (or
is skipped with --skip_bad_images).

Reference images (`reference_image_dir`) match an image by file stem: `<stem>.<ext>` is its one reference, or
`<stem>_0.<ext>`, `<stem>_1.<ext>`, ... (consecutive from 0) are its several references, in that order
(musubi-tuner's convention); the first of IMAGE_EXTENSIONS wins when a stem has several files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from library.formats.atomic_io import atomic_write
from library.data.captions import (CaptionOptions, find_caption_file, finetune_caption, read_caption_file,
                                   text_encoder_cache_caption)
from library.data.buckets import cover_size
from library.data.config import DatasetConfig, SubsetConfig
from library.data.images import IMAGE_EXTENSIONS, BadImage, BadImageError, check_images, list_images, verify_images

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class ImageItem:
    """One training image. Satisfies the caches' item protocol (absolute_path, image_size, bucket_reso, flip_aug,
    alpha_mask, te_caption; relative_path seeds the latent cache's posterior sample)."""

    absolute_path: Path
    caption: str  # as read (before per-step processing)
    subset: SubsetConfig
    image_size: tuple[int, int]  # (W, H) after EXIF orientation
    num_repeats: int = 1
    conditioning_path: Path | None = None
    conditioning_size: tuple[int, int] | None = None
    reference_paths: tuple[Path, ...] = ()  # FLUX.1 Kontext reference images, in order
    reference_sizes: tuple[tuple[int, int], ...] = ()  # their (W, H) after EXIF orientation
    fill_mask_path: Path | None = None  # FLUX.1 Fill: the subset's mask of this image (fill_mask_dir)
    bucket_reso: tuple[int, int] | None = None  # set by bucketing
    resized_size: tuple[int, int] | None = None
    caption_options: CaptionOptions = field(init=False)

    def __post_init__(self):
        self.caption_options = CaptionOptions.from_subset(self.subset)

    @property
    def flip_aug(self) -> bool:
        return self.subset.flip_aug

    @property
    def alpha_mask(self) -> bool:
        return self.subset.alpha_mask

    @property
    def is_reg(self) -> bool:
        return self.subset.is_reg

    @property
    def resize_interpolation(self) -> str | None:
        return self.subset.resize_interpolation  # already resolved subset > dataset > general

    @property
    def relative_path(self) -> str:
        """The image's path relative to its dataset root (POSIX separators), the seed of its per-item randomness:
        the subset's image_dir, or the metadata file's folder for a fine-tuning subset without one. A dataset moved
        to another folder keeps every seed, so it trains the same."""
        root = self.subset.image_dir
        if root is None:
            root = Path(self.subset.metadata_file).parent
        return Path(os.path.relpath(self.absolute_path, Path(root).resolve())).as_posix()

    @property
    def te_caption(self) -> str:
        """The text encoded when text-encoder outputs are cached (deterministic processing only)."""
        return text_encoder_cache_caption(self.caption, self.caption_options)

    def control_item(self) -> "ControlItem":
        """The conditioning image as a cache item of its own: a control input encoded by the AE (Flex.2, Canny/Depth,
        diffusers-layout ControlNets)."""
        return ControlItem(self)

    def reference_items(self) -> list["ReferenceItem"]:
        """Each reference image as a cache item fitted to this item's bucket (set by bucketing first)."""
        return [ReferenceItem(self, i) for i in range(len(self.reference_paths))]


class _CompanionItem:
    """An image the latent cache encodes for a target item (a reference, a control picture): it takes its target's
    bucket, flip and interpolation, and is encoded with the posterior mean. Subclasses say which file, which size
    and which subset folder its cache path is relative to."""

    target: ImageItem
    posterior = "mean"
    alpha_mask = False
    folder_key: str  # the subset key naming the folder of these images

    @property
    def bucket_reso(self) -> tuple[int, int]:
        return self.target.bucket_reso

    @property
    def subset(self) -> SubsetConfig:
        return self.target.subset

    @property
    def flip_aug(self) -> bool:
        return self.target.flip_aug

    @property
    def resize_interpolation(self) -> str | None:
        return self.target.resize_interpolation

    @property
    def relative_path(self) -> str:
        root = Path(getattr(self.subset, self.folder_key)).resolve()
        return Path(os.path.relpath(Path(self.absolute_path).resolve(), root)).as_posix()


@dataclass(eq=False)
class ReferenceItem(_CompanionItem):
    """A reference image as the latent cache sees it: its own file and size, resized to cover its target's bucket
    and centre-cropped to it (flipped with it), encoded with the posterior mean (`posterior`)."""

    target: ImageItem
    index: int
    folder_key = "reference_image_dir"

    @property
    def absolute_path(self) -> Path:
        return self.target.reference_paths[self.index]

    @property
    def image_size(self) -> tuple[int, int]:
        return self.target.reference_sizes[self.index]

    @property
    def resized_size(self) -> tuple[int, int]:
        return cover_size(self.image_size, self.bucket_reso)


@dataclass(eq=False)
class ControlItem(_CompanionItem):
    """A ControlNet-style conditioning image as the latent cache sees it when a recipe encodes it as a control input
    (Flex.2, Canny/Depth, diffusers-layout ControlNets): its own file, through its target's geometry (scaled to the
    target's original size, then the target's resize and centre crop; flipped with it), encoded with the posterior
    mean. The provenance records its file's
    content hash with the target's sizes, so an edited control picture or a changed target is re-encoded."""

    target: ImageItem
    folder_key = "conditioning_data_dir"

    @property
    def absolute_path(self) -> Path:
        return self.target.conditioning_path

    @property
    def image_size(self) -> tuple[int, int]:
        return self.target.image_size

    @property
    def resized_size(self) -> tuple[int, int]:
        return self.target.resized_size


@dataclass
class SubsetItems:
    subset: SubsetConfig
    items: list[ImageItem]


def _dreambooth_candidates(subset: SubsetConfig) -> list[tuple[Path, str | None]]:
    """(image, caption or None) for every image of a DreamBooth or ControlNet subset."""
    out = []
    for path in list_images(subset.image_dir):
        caption_file = find_caption_file(path, subset.caption_extension)
        out.append((path.resolve(), read_caption_file(caption_file, subset.enable_wildcard) if caption_file else None))
    return out


def _finetune_candidates(subset: SubsetConfig) -> list[tuple[Path, str | None]]:
    """(image, caption) from a fine-tuning metadata file: JSON {key: entry} or JSONL with `image_path`."""
    path = Path(subset.metadata_file)
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".jsonl":
            entries = [json.loads(line) for line in text.splitlines() if line.strip()]
            entries = {e["image_path"]: e for e in entries}
        else:
            entries = json.loads(text)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: cannot read the fine-tuning metadata ({e})") from None
    if not isinstance(entries, dict):
        raise ValueError(f"{path}: the metadata must be a JSON object of image entries")
    out = []
    for key, entry in entries.items():
        image = Path(key)
        if not image.is_absolute() and subset.image_dir is not None:
            image = Path(subset.image_dir) / image
        if not image.suffix and subset.image_dir is not None:  # sd-scripts keys may omit the extension
            image = next((image.with_suffix(e) for e in IMAGE_EXTENSIONS if image.with_suffix(e).exists()), image)
        out.append((image.resolve(), finetune_caption(entry, subset.caption_separator, subset.enable_wildcard)))
    return out


def _conditioning_image(subset: SubsetConfig, image: Path) -> Path | None:
    return _same_stem(Path(subset.conditioning_data_dir), image)


def _same_stem(folder: Path, image: Path) -> Path | None:
    return next((folder / (image.stem + e) for e in IMAGE_EXTENSIONS if (folder / (image.stem + e)).exists()), None)


def _reference_index(subset: SubsetConfig) -> dict[str, list[Path]]:
    """The images of a subset's reference folder by stem, each stem's files in IMAGE_EXTENSIONS order."""
    index: dict[str, list[Path]] = {}
    for path in list_images(subset.reference_image_dir):
        index.setdefault(path.stem, []).append(path.resolve())
    for paths in index.values():
        paths.sort(key=lambda p: IMAGE_EXTENSIONS.index(p.suffix.lower()))
    return index


def _references(index: dict[str, list[Path]], image: Path, folder) -> tuple[tuple[Path, ...], str | None]:
    """(reference paths of `image`, None) or ((), reason)."""
    stem = image.stem
    numbered = []
    while f"{stem}_{len(numbered)}" in index:
        numbered.append(index[f"{stem}_{len(numbered)}"][0])
    if stem in index and numbered:
        return (), (f"both {index[stem][0].name} and {numbered[0].name} in {folder}: one reference (<stem>.ext) or "
                    "numbered ones (<stem>_0.ext, <stem>_1.ext, ...), not both")
    if stem in index:
        return (index[stem][0],), None
    if numbered:
        return tuple(numbered), None
    return (), f"no reference image {stem}.<ext> or {stem}_0.<ext> in {folder}"


def collect_subset_items(dataset: DatasetConfig, skip_bad_images: bool = False,
                         verify: bool = False) -> list[SubsetItems]:
    """Images, captions and probed sizes of every subset of `dataset` (subsets with num_repeats < 1 are left out).

    Raises BadImageError listing every unreadable image (and every missing conditioning image) of the dataset
    unless `skip_bad_images`, in which case each is reported and skipped. `verify`: also decode every image in
    full (--verify_images), which finds data corrupted behind a valid header."""
    found: list[tuple[SubsetConfig, list[tuple[Path, str | None, Path | None]]]] = []
    missing_conditioning: list[BadImage] = []
    fill_masks: dict[Path, Path] = {}  # FLUX.1 Fill: image -> its mask (probed like the images)
    references: dict[Path, tuple[Path, ...]] = {}
    for subset in dataset.subsets:
        if subset.num_repeats < 1:
            logger.warning("%s: num_repeats %d < 1, subset ignored", subset.where or subset.image_dir,
                           subset.num_repeats)
            continue
        candidates = _finetune_candidates(subset) if subset.kind == "finetune" else _dreambooth_candidates(subset)
        entries = []
        ref_index = _reference_index(subset) if subset.reference_image_dir is not None else None
        for image, caption in candidates:
            if ref_index is not None:
                refs, problem = _references(ref_index, image, subset.reference_image_dir)
                if problem:
                    missing_conditioning.append(BadImage(image, problem))
                    continue
                references[image] = refs
            cond = None
            if subset.kind == "controlnet":
                cond = _conditioning_image(subset, image)
                if cond is None:
                    missing_conditioning.append(BadImage(image, f"no conditioning image with the same name in "
                                                                f"{subset.conditioning_data_dir}"))
                    continue
            if subset.fill_mask_dir is not None:
                mask = _same_stem(Path(subset.fill_mask_dir), image)
                if mask is None:
                    missing_conditioning.append(BadImage(image, f"no mask with the same name in "
                                                                f"{subset.fill_mask_dir} (fill_mask_dir)"))
                    continue
                fill_masks[image] = mask
            entries.append((image, caption, cond))
        found.append((subset, entries))

    paths = [p for _, entries in found for image, _, cond in entries
             for p in (image, cond, fill_masks.get(image), *references.get(image, ())) if p is not None]
    probes, bad = check_images(paths, skip_bad=True)
    undecodable = []
    if verify:
        started = time.perf_counter()
        undecodable = verify_images([p.path for p in probes], num_threads=min(8, os.cpu_count() or 1))
        seconds = time.perf_counter() - started
        logger.info("--verify_images: %d images decoded in %.1f s (%.1f ms each)", len(probes), seconds,
                    1000 * seconds / max(len(probes), 1))
    bad += undecodable + missing_conditioning
    owners = {ref: image for image, refs in references.items() for ref in refs}
    bad = [BadImage(b.path, f"{b.reason} (reference image of {owners[b.path].name})") if b.path in owners else b
           for b in bad]
    if bad and not skip_bad_images:
        raise BadImageError(bad)
    for b in undecodable + missing_conditioning:
        logger.warning("skipping image %s: %s", b.path, b.reason)
    sizes = {p.path: p.size for p in probes}
    bad_paths = {b.path for b in bad}

    result = []
    for subset, entries in found:
        items, uncaptioned = [], []
        for image, caption, cond in entries:
            refs = references.get(image, ())
            if (image in bad_paths or cond in bad_paths or fill_masks.get(image) in bad_paths
                    or bad_paths.intersection(refs)):
                continue
            if caption is None:
                uncaptioned.append(image)
                caption = subset.class_tokens or ""
            items.append(ImageItem(image, caption, subset, sizes[image], subset.num_repeats, cond,
                                   sizes.get(cond) if cond else None, refs, tuple(sizes[r] for r in refs),
                                   fill_mask_path=fill_masks.get(image)))
        if uncaptioned:
            shown = ", ".join(str(p.name) for p in uncaptioned[:5]) + (" ..." if len(uncaptioned) > 5 else "")
            fallback = f"class_tokens {subset.class_tokens!r}" if subset.class_tokens else "an empty caption"
            logger.warning("%d image(s) without a caption file (%s) in %s use %s: %s", len(uncaptioned),
                           subset.caption_extension, subset.image_dir, fallback, shown)
        if subset.cache_info and subset.kind == "dreambooth":
            write_metadata_cache(subset, items)
        result.append(SubsetItems(subset, items))
    return result


def write_metadata_cache(subset: SubsetConfig, items: list[ImageItem]) -> None:
    """sd-scripts' `metadata_cache.json` ({path: {caption, resolution}}); sizes here come from fast header probes,
    so the file is written for tools that read it, never trusted over the images themselves."""
    data = {str(i.absolute_path): {"caption": i.caption, "resolution": list(i.image_size)} for i in items}
    path = Path(subset.image_dir) / "metadata_cache.json"
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1), encoding="utf-8"))


def balance_regularisation(items: list[ImageItem]) -> None:
    """Raise the repeats of regularisation images round-robin until they are at least as many as the training
    images (repeats counted), as sd-scripts does; warns when there are more regularisation images."""
    train = sum(i.num_repeats for i in items if not i.is_reg)
    reg = [i for i in items if i.is_reg]
    if not reg:
        return
    n_reg = sum(i.num_repeats for i in reg)
    if n_reg > train:
        logger.warning("%d regularisation images (with repeats) outnumber the %d training images; "
                       "not all of them are used every epoch", n_reg, train)
    k = 0
    while n_reg < train:
        reg[k % len(reg)].num_repeats += 1
        n_reg += 1
        k += 1


def split_for_validation(subset_items: list[SubsetItems], split: float, seed: int) -> tuple[list, list]:
    """(training items, validation items) of a DreamBooth dataset: per non-regularisation subset, a shuffle seeded
    by `seed`; the first ceil(n*(1-split)) train, the rest validate (always complementary, unlike sd-scripts
    without validation_seed). Regularisation subsets stay in training; validation repeats are 1."""
    train, val = [], []
    for entry in subset_items:
        if entry.subset.is_reg or split <= 0:
            train += entry.items
            continue
        order = list(entry.items)
        random.Random(seed).shuffle(order)
        cut = math.ceil(len(order) * (1 - split))
        train += order[:cut]
        for item in order[cut:]:
            item.num_repeats = 1
            val.append(item)
    return train, val
