"""Depth maps for FLUX.1 Depth, as BFL makes them (flux/modules/image_embedders.py DepthImageEncoder): a
transformers depth-estimation model (BFL: Depth-Anything large, `LiheYoung/depth-anything-large-hf`) run on the
uint8 picture through its own image processor, `predicted_depth` resized (bicubic, antialiased) to the picture's
size, mapped by d / 127.5 - 1 and replicated to three channels.

The weights come from a local folder the user gives (`--depth_model PATH`: config.json, model.safetensors and the
image processor's preprocessor_config.json, as `save_pretrained` writes them); nothing is downloaded, and only
safetensors weights are read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


class DepthEstimator:
    """A local transformers depth-estimation model: `__call__(rgb uint8 HxWx3)` -> (1, 3, H, W) float32 map."""

    def __init__(self, folder: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise ValueError(f"--depth_model {folder}: expected a folder with config.json, model.safetensors and "
                             "preprocessor_config.json (a transformers depth-estimation model, e.g. "
                             "LiheYoung/depth-anything-large-hf downloaded with save_pretrained or the hub CLI)")
        if not (folder / "model.safetensors").is_file() and not any(folder.glob("model-*.safetensors")):
            raise ValueError(f"--depth_model {folder}: no model.safetensors (only safetensors weights are read)")
        if not (folder / "preprocessor_config.json").is_file():
            raise ValueError(f"--depth_model {folder}: no preprocessor_config.json (the model's image processor)")
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        self.processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        self.model = AutoModelForDepthEstimation.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                                                 torch_dtype=dtype).to(device).eval()
        self.device, self.dtype, self.folder = torch.device(device), dtype, folder

    @torch.no_grad()
    def __call__(self, rgb: np.ndarray) -> torch.Tensor:
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"depth estimation expects an HxWx3 uint8 picture, got {rgb.dtype} {rgb.shape}")
        pixels = self.processor(images=rgb, return_tensors="pt")["pixel_values"]
        depth = self.model(pixel_values=pixels.to(self.device, self.dtype)).predicted_depth.float()  # (B, h, w)
        depth = depth[:, None].expand(-1, 3, -1, -1)
        depth = F.interpolate(depth, rgb.shape[:2], mode="bicubic", antialias=True, align_corners=False)
        return (depth / 127.5 - 1.0).cpu()
