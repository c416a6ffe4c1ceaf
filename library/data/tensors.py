"""Decoded pictures -> model inputs: (3, H, W) tensors in [-1, 1], and control images fitted to an output size."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from library.data.buckets import resize_and_crop


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> (3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div(127.5).sub(1.0)


def prepare_control_image(image: np.ndarray, width: int, height: int) -> torch.Tensor:
    """An HxWx3 uint8 control image scaled to cover width x height and centre-cropped (aspect kept, as training
    crops its targets), as (1, 3, height, width) in [-1, 1]."""
    h, w = image.shape[:2]
    scale = max(width / w, height / h)
    resized = (max(width, math.ceil(w * scale - 1e-6)), max(height, math.ceil(h * scale - 1e-6)))
    out, _, _, _ = resize_and_crop(image, resized, (width, height))
    return to_tensor(np.array(out))[None]  # a writable copy (decoded images can be read-only)


def control_image_source(image: np.ndarray) -> Callable[[int, int], torch.Tensor]:
    """`ControlledFlux`'s `control` for a picture: (width, height) -> the prepared conditioning tensor."""
    return lambda width, height: prepare_control_image(image, width, height)
