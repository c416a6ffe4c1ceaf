"""FLUX.1 Fill training masks (1 = area the model generates, 0 = kept): read from a subset's `fill_mask_dir`, or drawn
per sample and step by a seeded generator.

    mask = generate_mask("mixed", 512, 384, mask_seed(run_seed, step, "cats/001.png"))   # float32 (H, W) in {0, 1}

The generator (`--fill_masks rectangles|strokes|mixed`) draws, from a `random.Random` seeded by the run's seed, the
batch's step and the image's path relative to its dataset (so a resumed run draws the same masks, and a moved
dataset too):
* rectangles: 1 to 3 axis-aligned boxes, each side 10% to 60% of the image's;
* strokes: 1 to 4 brush strokes, each a polyline of 2 to 6 points with round joints, 3% to 12% of the shorter side
  thick;
* mixed: one of the two (even odds), and one sample in ten entirely masked (pure generation, as the model also does
  with an all-ones mask).
Mask files are read as grey (PIL "L") / 255 and kept as fractions (BFL keeps float masks).
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image, ImageDraw

MASK_GENERATORS = ("rectangles", "strokes", "mixed")
FULL_MASK_SHARE = 0.1  # mixed: share of samples masked entirely


def mask_seed(seed: int, step: int, key: str) -> str:
    """The seed of one sample's generated mask: the run's seed, the batch's step (global, from the start of
    training) and the image's path relative to its dataset."""
    return f"{seed}:fill_mask:{step}:{key}"


def _rectangles(draw: ImageDraw.ImageDraw, width: int, height: int, rng: random.Random) -> None:
    for _ in range(rng.randint(1, 3)):
        w = max(1, round(width * rng.uniform(0.1, 0.6)))
        h = max(1, round(height * rng.uniform(0.1, 0.6)))
        left, top = rng.randint(0, width - w), rng.randint(0, height - h)
        draw.rectangle((left, top, left + w - 1, top + h - 1), fill=255)


def _strokes(draw: ImageDraw.ImageDraw, width: int, height: int, rng: random.Random) -> None:
    for _ in range(rng.randint(1, 4)):
        thickness = max(1, round(min(width, height) * rng.uniform(0.03, 0.12)))
        points = [(rng.uniform(0, width), rng.uniform(0, height)) for _ in range(rng.randint(2, 6))]
        draw.line(points, fill=255, width=thickness, joint="curve")
        r = thickness / 2
        for x, y in points:  # round ends
            draw.ellipse((x - r, y - r, x + r, y + r), fill=255)


def generate_mask(kind: str, width: int, height: int, seed: str | int) -> np.ndarray:
    """A float32 (height, width) mask of 0 and 1 drawn by generator `kind` from `seed` (see the module's rules)."""
    if kind not in MASK_GENERATORS:
        raise ValueError(f"mask generator {kind!r}: expected one of {', '.join(MASK_GENERATORS)}")
    rng = random.Random(seed)
    if kind == "mixed":
        if rng.random() < FULL_MASK_SHARE:
            return np.ones((height, width), np.float32)
        kind = "rectangles" if rng.random() < 0.5 else "strokes"
    image = Image.new("L", (width, height), 0)
    (_rectangles if kind == "rectangles" else _strokes)(ImageDraw.Draw(image), width, height, rng)
    return (np.asarray(image) > 127).astype(np.float32)


def mask_from_rgb(rgb: np.ndarray) -> np.ndarray:
    """A decoded mask file (H, W, 3 uint8) as float32 (H, W) in [0, 1]: grey / 255, fractions kept."""
    return np.asarray(Image.fromarray(rgb).convert("L"), np.float32) / 255.0


def bucket_pixels(dataset, item, flipped: bool):
    """An item's picture at its bucket size (centre crop), flipped if asked, as (3, H, W) in [-1, 1]."""
    from library.data.augment import flip_horizontal
    from library.data.tensors import to_tensor

    rgb, _, _, _ = dataset.load_pixels(item)
    if flipped:
        rgb, _ = flip_horizontal(rgb)
    return to_tensor(np.array(rgb))  # a writable copy (decoded images can be read-only)


def bucket_mask(dataset, item, flipped: bool) -> np.ndarray:
    """An item's mask file through its picture's geometry (scaled to the picture's size, then the same resize and
    crop, flipped with it) as float32 (H, W) in [0, 1] at the bucket's size."""
    import cv2

    from library.data.augment import flip_horizontal
    from library.data.buckets import resize_and_crop
    from library.data.images import load_image

    rgb, _ = load_image(item.fill_mask_path)
    if (rgb.shape[1], rgb.shape[0]) != item.image_size:
        rgb = cv2.resize(rgb, item.image_size, interpolation=cv2.INTER_LINEAR)
    interpolation = item.resize_interpolation or dataset.config.resize_interpolation
    rgb, _, _, _ = resize_and_crop(rgb, item.resized_size, item.bucket_reso, interpolation)
    if flipped:
        rgb, _ = flip_horizontal(rgb)
    return mask_from_rgb(np.ascontiguousarray(rgb))


def fill_inputs(dataset, item, sample: dict, flipped: bool, step: int) -> dict:
    """A Fill sample's inputs. From the dataset's Fill cache when it has one (cached latents of the masked picture
    and the mask); otherwise the picture (3, H, W) in [-1, 1] (the target's pixels as trained, augmentation
    included) and its mask (H, W) at the bucket's size: the item's mask file through the picture's geometry, else
    one drawn by the dataset's generator. `dataset` is the FluxDataset (its pixel loaders, `fill_generator`,
    `fill_cache`)."""
    import torch

    if dataset.fill_cache is not None:
        latents, mask = dataset.fill_cache.get(item, flipped)
        return {"fill_latents": latents, "fill_mask": mask}
    image = sample.get("image")
    if image is None:  # latents are cached: decode the picture for its masked copy
        image = bucket_pixels(dataset, item, flipped)
    width, height = item.bucket_reso
    if item.fill_mask_path is not None:
        mask = bucket_mask(dataset, item, flipped)
    elif dataset.fill_generator is not None:
        mask = generate_mask(dataset.fill_generator, width, height, mask_seed(dataset.seed, step, item.relative_path))
    else:
        raise ValueError(f"{item.absolute_path}: no FLUX.1 Fill mask (its subset has no 'fill_mask_dir' and no "
                         f"--fill_masks generator is set)")
    return {"fill_image": image, "fill_mask": torch.from_numpy(np.ascontiguousarray(mask))}
