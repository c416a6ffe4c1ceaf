"""Aspect-ratio buckets: which bucket an image lands in, the size it is resized to, and the crop.

The rules reproduce sd-scripts exactly (same bucket list, same choice, same rounding, same centre crop), so a
dataset buckets identically in both tools and existing latent caches stay valid. One deliberate difference: without
bucketing (`enable_bucket=False`) every image is resized to cover `resolution` and centre-cropped, whether latents are
cached or not (sd-scripts does that only when caching, and otherwise demands pre-sized images or a random crop).
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import Iterable, Sequence

import cv2
import numpy as np
from PIL import Image

from library.data import NOTE

logger = logging.getLogger(__name__)

Size = tuple[int, int]  # (width, height) everywhere in this module


@dataclass(frozen=True)
class BucketChoice:
    bucket_reso: Size  # final (width, height) after cropping
    resized_size: Size  # (width, height) the image is resized to before cropping; covers bucket_reso
    ar_error: float  # bucket aspect ratio minus image aspect ratio (w/h), signed as sd-scripts records it


def make_bucket_resolutions(max_reso: Size, min_size: int = 256, max_size: int = 1024,
                            divisible: int = 64) -> list[Size]:
    """The predefined bucket list of upscale mode: a square of the same area plus a sweep of widths.

    Every bucket has area <= w*h of `max_reso`, both sides multiples of `divisible` within [min_size, max_size]
    (the square is only floored to `divisible`). Sorted ascending by (width, height).
    """
    area = max_reso[0] * max_reso[1]
    side = int(math.sqrt(area) // divisible) * divisible
    resos = {(side, side)}
    for width in range(min_size, max_size + 1, divisible):
        height = min(max_size, (area // width) // divisible * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
    return sorted(resos)


def _as_size(value: int | Sequence[int], name: str) -> Size:
    w, h = (value, value) if isinstance(value, int) else tuple(value)
    if not (isinstance(w, int) and isinstance(h, int)) or w <= 0 or h <= 0:
        raise ValueError(f"{name} must be positive integers (width, height), got {value!r}")
    return w, h


class BucketPlanner:
    """Bucket selection for one dataset (the settings sd-scripts takes per dataset).

    - enable_bucket and not bucket_no_upscale: predefined buckets from `make_bucket_resolutions`; every image is
      scaled up or down to cover its bucket.
    - enable_bucket and bucket_no_upscale: buckets made on demand; large images shrink to about the area of
      `resolution`, small ones keep their size; both are cropped down to multiples of `bucket_reso_steps`.
    - enable_bucket False: the single bucket `resolution` (resize to cover, centre crop).
    """

    def __init__(self, resolution: int | Sequence[int], enable_bucket: bool = False, min_bucket_reso: int = 256,
                 max_bucket_reso: int = 1024, bucket_reso_steps: int = 64, bucket_no_upscale: bool = False):
        self.resolution = _as_size(resolution, "resolution")
        self.enable_bucket = enable_bucket
        self.bucket_no_upscale = bucket_no_upscale
        if not isinstance(bucket_reso_steps, int) or bucket_reso_steps <= 0:
            raise ValueError(f"bucket_reso_steps must be a positive integer, got {bucket_reso_steps!r}")
        self.bucket_reso_steps = steps = bucket_reso_steps
        self.max_area = self.resolution[0] * self.resolution[1]
        self.min_bucket_reso = min_bucket_reso
        self.max_bucket_reso = max_bucket_reso
        self.predefined_resos: list[Size] = []

        if not enable_bucket:
            if bucket_no_upscale:
                logger.warning("bucket_no_upscale has no effect without enable_bucket; ignoring it", extra=NOTE)
            self.predefined_resos = [self.resolution]
        elif bucket_no_upscale:
            if (min_bucket_reso, max_bucket_reso) != (256, 1024):
                logger.warning("min_bucket_reso and max_bucket_reso are ignored with bucket_no_upscale "
                               "(buckets follow the image sizes, capped at the area of resolution)", extra=NOTE)
        else:
            rounded_min = min_bucket_reso - min_bucket_reso % steps
            rounded_max = max_bucket_reso + (-max_bucket_reso) % steps
            if rounded_min != min_bucket_reso:
                logger.warning("min_bucket_reso %d is not a multiple of bucket_reso_steps %d; rounded down to %d",
                               min_bucket_reso, steps, rounded_min, extra=NOTE)
            if rounded_max != max_bucket_reso:
                logger.warning("max_bucket_reso %d is not a multiple of bucket_reso_steps %d; rounded up to %d",
                               max_bucket_reso, steps, rounded_max, extra=NOTE)
            if rounded_min <= 0:
                raise ValueError(f"min_bucket_reso {min_bucket_reso} rounds down to {rounded_min} with "
                                 f"bucket_reso_steps {steps}; it must be at least {steps}")
            self.min_bucket_reso, self.max_bucket_reso = rounded_min, rounded_max
            if min(self.resolution) < rounded_min:
                raise ValueError(f"min_bucket_reso ({rounded_min}) must be <= the smaller side of resolution "
                                 f"{self.resolution[0]}x{self.resolution[1]}")
            if max(self.resolution) > rounded_max:
                raise ValueError(f"max_bucket_reso ({rounded_max}) must be >= the larger side of resolution "
                                 f"{self.resolution[0]}x{self.resolution[1]}")
            self.predefined_resos = make_bucket_resolutions(self.resolution, rounded_min, rounded_max, steps)

        self._predefined_set = set(self.predefined_resos)
        self._predefined_ars = [w / h for w, h in self.predefined_resos]

    @classmethod
    def fixed(cls, sizes: Sequence[Size]) -> "BucketPlanner":
        """A planner over exactly `sizes` (FLUX.1 Kontext's preferred sizes, see `scaled_bucket_sizes`): each
        image takes the size nearest its aspect ratio (the first on ties), resized to cover it and centre-cropped."""
        planner = cls(sizes[0], enable_bucket=False)
        planner.enable_bucket = True
        planner.predefined_resos = list(dict.fromkeys(sizes))
        planner._predefined_set = set(planner.predefined_resos)
        planner._predefined_ars = [w / h for w, h in planner.predefined_resos]
        return planner

    def select(self, image_size: Size) -> BucketChoice:
        """Bucket, resized size and aspect-ratio error for an image of `image_size` (width, height)."""
        w, h = image_size
        if w <= 0 or h <= 0:
            raise ValueError(f"invalid image size {w}x{h}")
        if self.enable_bucket and self.bucket_no_upscale:
            return self._select_no_upscale(w, h)
        return self._select_predefined(w, h)

    def _select_predefined(self, w: int, h: int) -> BucketChoice:
        ar = w / h
        if (w, h) in self._predefined_set:  # an image already at a bucket size is never resized
            index = self.predefined_resos.index((w, h))
        else:
            errors = [abs(bucket_ar - ar) for bucket_ar in self._predefined_ars]
            index = errors.index(min(errors))  # first minimum wins, like numpy's argmin
        bw, bh = self.predefined_resos[index]
        bucket_ar = self._predefined_ars[index]
        # Cover the bucket: the side that is relatively shorter matches exactly, the other overhangs.
        scale = bh / h if ar > bucket_ar else bw / w
        resized = (int(w * scale + 0.5), int(h * scale + 0.5))
        return BucketChoice((bw, bh), resized, bucket_ar - ar)

    def _select_no_upscale(self, w: int, h: int) -> BucketChoice:
        steps = self.bucket_reso_steps
        ar = w / h
        if w * h > self.max_area:
            # Shrink to the target area, then pick whichever side rounded to `steps` keeps the aspect better.
            rw = math.sqrt(self.max_area * ar)
            rh = self.max_area / rw

            def round_steps(x: float) -> int:
                x = int(x + 0.5)
                return x - x % steps

            bw = round_steps(rw)
            bh1 = round_steps(bw / ar)
            bh = round_steps(rh)
            bw2 = round_steps(bh * ar)
            # A zero side (extreme aspect ratios) would divide by zero in sd-scripts; treat it as unusable.
            err1 = abs(bw / bh1 - ar) if bh1 else math.inf
            err2 = abs(bw2 / bh - ar) if bh else math.inf
            resized = (bw, int(bw / ar + 0.5)) if err1 < err2 else (int(bh * ar + 0.5), bh)
        else:
            resized = (w, h)
        bucket = (resized[0] - resized[0] % steps, resized[1] - resized[1] % steps)
        if bucket[0] <= 0 or bucket[1] <= 0:
            raise ValueError(f"image {w}x{h} gives an empty bucket {bucket[0]}x{bucket[1]} with bucket_no_upscale "
                             f"and bucket_reso_steps {steps} (too small or too elongated)")
        return BucketChoice(bucket, resized, bucket[0] / bucket[1] - ar)

    def bucket_info(self, assignments: Iterable[BucketChoice | tuple[BucketChoice, int]]) -> dict:
        """`bucket_info` for this dataset, numbering buckets among all of its predefined ones."""
        return bucket_info(assignments, self.predefined_resos if self.enable_bucket else ())


def scaled_bucket_sizes(sizes: Sequence[Size], resolution: Size, reference_area: int = 1024 * 1024) -> list[Size]:
    """`sizes` (made for `reference_area` pixels) scaled to the area of `resolution`, each side floored to a
    multiple of 16 (at least 16), order kept, duplicates dropped: FLUX.1 Kontext's buckets at a dataset's
    resolution (at 1024x1024 the sizes themselves)."""
    scale = math.sqrt(resolution[0] * resolution[1] / reference_area)
    return list(dict.fromkeys((max(16, int(w * scale) // 16 * 16), max(16, int(h * scale) // 16 * 16))
                              for w, h in sizes))


def cover_size(image_size: Size, bucket_reso: Size) -> Size:
    """The size an image of `image_size` is resized to so that it covers `bucket_reso` with its aspect ratio kept
    (then centre-cropped to the bucket): how a reference image is fitted to its target's bucket."""
    (w, h), (bw, bh) = image_size, bucket_reso
    scale = max(bw / w, bh / h)
    return max(bw, int(w * scale + 0.5)), max(bh, int(h * scale + 0.5))


def bucket_info(assignments: Iterable[BucketChoice | tuple[BucketChoice, int]],
                predefined_resos: Iterable[Size] = ()) -> dict:
    """Summary recorded in training metadata (sd-scripts' `ss_bucket_info` layout).

    `assignments` holds one entry per image: a BucketChoice, or (BucketChoice, num_repeats). Returns
    {"buckets": {index: {"resolution": [w, h], "count": n}}, "mean_img_ar_error": float | None}. Counts include
    repeats; the mean |aspect error| is per image (no repeats). Buckets are numbered in sorted resolution order
    among all buckets of the dataset, predefined empty ones included (as sd-scripts numbers them), and empty
    buckets are left out.
    """
    counts: dict[Size, int] = {}
    errors: list[float] = []
    for item in assignments:
        choice, repeats = item if isinstance(item, tuple) else (item, 1)
        counts[choice.bucket_reso] = counts.get(choice.bucket_reso, 0) + repeats
        errors.append(abs(choice.ar_error))
    all_resos = sorted(set(predefined_resos) | set(counts))
    buckets = {i: {"resolution": [r[0], r[1]], "count": counts[r]}
               for i, r in enumerate(all_resos) if counts.get(r, 0) > 0}
    return {"buckets": buckets, "mean_img_ar_error": float(np.mean(errors)) if errors else None}


# ----------------------------------------------------------------------------------------------------------------
# Resizing and cropping

_CV2_INTERPOLATION = {
    "nearest": cv2.INTER_NEAREST_EXACT,  # exact pixel-centre nearest (INTER_NEAREST is shifted)
    "bilinear": cv2.INTER_LINEAR,
    "linear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "cubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
}
_PIL_INTERPOLATION = {"lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX}
INTERPOLATIONS = tuple(_PIL_INTERPOLATION) + tuple(_CV2_INTERPOLATION)


def _resize(array: np.ndarray, size: Size, method: str) -> np.ndarray:
    """Resize an HxWxC uint8 image or an HxW float32 mask to `size` (width, height)."""
    if method in _PIL_INTERPOLATION:
        # A 2-D float32 array becomes a PIL "F" image, so masks keep full precision through PIL too.
        return np.asarray(Image.fromarray(array).resize(size, _PIL_INTERPOLATION[method]))
    return cv2.resize(array, size, interpolation=_CV2_INTERPOLATION[method])


def get_crop_ltrb(bucket_reso: Size, image_size: Size) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of the original image's aspect ratio fitted, centred, inside the bucket.

    With bucket (bw, bh) and image aspect a = iw/ih: if the bucket is wider than the image (bw/bh > a) the box is
    bh tall and bh*a wide, else bw wide and bw/a tall. left = floor((bw - box_w) / 2), top = floor((bh - box_h)/2)
    (floor division as sd-scripts does it), right = left + box_w, bottom = top + box_h. Values are floats; the box
    depends only on the sizes, not on a random crop. It is what the latent cache stores as `crop_ltrb_<h>x<w>`;
    FLUX training never reads it.
    """
    bw, bh = bucket_reso
    image_ar = image_size[0] / image_size[1]
    if bw / bh > image_ar:
        box_w, box_h = bh * image_ar, float(bh)
    else:
        box_w, box_h = float(bw), bw / image_ar
    left = float((bw - box_w) // 2)
    top = float((bh - box_h) // 2)
    return left, top, left + box_w, top + box_h


def resize_and_crop(image: np.ndarray, resized_size: Size, bucket_reso: Size, interpolation: str | None = None,
                    random_crop: bool = False, rng: random.Random | None = None, alpha: np.ndarray | None = None,
                    ) -> tuple[np.ndarray, np.ndarray | None, tuple[float, float, float, float], tuple[int, int]]:
    """Resize `image` (HxWx3 uint8) to `resized_size`, then crop it to `bucket_reso`; same for the alpha mask.

    Interpolation: `interpolation` if given, else "area" when both sides shrink, else "lanczos". lanczos and box
    use PIL, the others OpenCV. The crop is centred ((w - bw)//2), or a uniform random offset per overhanging
    side (width first) drawn from `rng` with `random_crop`. Returns (image, alpha or None, crop_ltrb from
    `get_crop_ltrb` for the original size, (left, top) of the crop window in the resized image).
    """
    h, w = image.shape[:2]
    if alpha is not None and alpha.shape[:2] != (h, w):
        raise ValueError(f"alpha mask shape {alpha.shape[:2]} does not match the image shape {(h, w)}")
    crop_ltrb = get_crop_ltrb(bucket_reso, (w, h))
    rw, rh = resized_size
    if (w, h) != (rw, rh):
        method = (interpolation or ("area" if rw < w and rh < h else "lanczos")).lower()
        if method not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {interpolation!r}; choose one of {', '.join(INTERPOLATIONS)}")
        image = _resize(image, (rw, rh), method)
        if alpha is not None:
            # Resized on its own (not premultiplied with the colours) and clipped: lanczos/cubic overshoot.
            alpha = np.clip(_resize(np.asarray(alpha, np.float32), (rw, rh), method), 0.0, 1.0)
    bw, bh = bucket_reso
    if rw < bw or rh < bh:
        raise ValueError(f"resized size {rw}x{rh} does not cover the bucket {bw}x{bh}")
    if random_crop and rng is None and (rw > bw or rh > bh):
        raise ValueError("random_crop needs an explicit rng (random.Random)")
    left = (rng.randint(0, rw - bw) if random_crop else (rw - bw) // 2) if rw > bw else 0
    top = (rng.randint(0, rh - bh) if random_crop else (rh - bh) // 2) if rh > bh else 0
    image = np.ascontiguousarray(image[top:top + bh, left:left + bw])
    if alpha is not None:
        alpha = np.ascontiguousarray(alpha[top:top + bh, left:left + bw], dtype=np.float32)
    return image, alpha, crop_ltrb, (left, top)
