"""Control maps of FLUX.1 Canny: pictures -> edge maps, as BFL makes them (flux/modules/image_embedders.py):
OpenCV's Canny with thresholds 50 / 200 on the uint8 RGB picture, the one-channel result replicated to three.

Control pictures are first resized to the output size (PIL Lanczos, stretched as BFL and diffusers'
FluxControlPipeline resize them), then turned into a map; a map given as a file is only resized. The depth map
needs a depth-estimation model and lives in library/models/depth.py.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

CANNY_THRESHOLDS = (50, 200)  # BFL's CannyImageEncoder defaults


def resize_control(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """An HxWx3 uint8 picture resized to width x height (PIL Lanczos, aspect not kept), as BFL and diffusers do."""
    if rgb.shape[1] == width and rgb.shape[0] == height:
        return rgb
    return np.array(Image.fromarray(rgb).resize((width, height), Image.Resampling.LANCZOS))


def canny_map(rgb: np.ndarray, low: int = CANNY_THRESHOLDS[0], high: int = CANNY_THRESHOLDS[1]) -> np.ndarray:
    """OpenCV Canny edges of an HxWx3 uint8 RGB picture, replicated to HxWx3 uint8 (0 or 255)."""
    try:
        import cv2  # a base requirement (opencv-python-headless); imported here for a clear message without it
    except ImportError:
        raise ValueError("the canny control map needs OpenCV: pip install opencv-python-headless") from None
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"canny_map expects an HxWx3 uint8 picture, got {rgb.dtype} {rgb.shape}")
    edges = cv2.Canny(np.ascontiguousarray(rgb), low, high)
    return np.repeat(edges[:, :, None], 3, axis=2)
