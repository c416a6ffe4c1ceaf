"""Image augmentations with explicit random generators.

Every function takes its `random.Random`, so augmentation never touches Python's global random state (sd-scripts
reseeds the global state each epoch, which couples flips, caption shuffles and crops across the process).
"""

from __future__ import annotations

import random

import cv2
import numpy as np

COLOR_AUG_PROBABILITY = 0.33
HUE_SHIFT_LIMIT = 8.0  # OpenCV 8-bit hue units (degrees / 2, range 0..179)
GAMMA_RANGE = (0.95, 1.05)


def flip_horizontal(image: np.ndarray, alpha: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Mirror an HxWxC image and its HxW alpha mask left-right (contiguous copies)."""
    flipped = np.ascontiguousarray(image[:, ::-1])
    return flipped, (None if alpha is None else np.ascontiguousarray(alpha[:, ::-1]))


def hue_shift(image_rgb: np.ndarray, shift: float) -> np.ndarray:
    """Rotate the hue of an RGB uint8 image by `shift` OpenCV hue units (wrapping at 180)."""
    # Converted as RGB: sd-scripts converted this RGB data with the BGR flag, which turns a hue shift into a
    # different colour change for every hue (red and blue swapped in the hue wheel).
    hsv = cv2.cvtColor(np.ascontiguousarray(image_rgb), cv2.COLOR_RGB2HSV)
    hue = np.rint(hsv[:, :, 0].astype(np.float32) + shift) % 180
    hsv[:, :, 0] = hue.astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def gamma(image_rgb: np.ndarray, g: float) -> np.ndarray:
    """Apply (x/255)^g * 255 per pixel, rounded and clipped to uint8."""
    x = image_rgb.astype(np.float32) / 255.0
    return np.clip(np.rint(np.power(x, g) * 255.0), 0, 255).astype(np.uint8)


def color_aug(image_rgb: np.ndarray, rng: random.Random) -> np.ndarray:
    """sd-scripts' `color_aug`: with probability 0.33, half the time a hue shift by U(-8, 8), else gamma U(0.95, 1.05).

    Draws from `rng` in this order: apply? (random), which one? (random), amount (uniform). Returns the input
    unchanged (same object) when no augmentation is drawn. RGB channels only; an alpha mask is never touched.
    """
    if rng.random() >= COLOR_AUG_PROBABILITY:
        return image_rgb
    if rng.random() < 0.5:
        return hue_shift(image_rgb, rng.uniform(-HUE_SHIFT_LIMIT, HUE_SHIFT_LIMIT))
    return gamma(image_rgb, rng.uniform(*GAMMA_RANGE))
