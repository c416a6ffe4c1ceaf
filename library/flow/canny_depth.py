"""FLUX.1 Canny / Depth control for sampling and training: a control picture -> its map (given, or computed:
Canny edges or a depth estimate) at the output size -> AE posterior mean -> packed tokens, the 64 extra features per
token of `ExtraChannelsFlux`. One builder for flux_minimal_inference.py, training sample images and the training
recipes' control latents.

    control = ControlEncoder(ae, preprocessor="canny", placement=placement)
    models.flux = bind_control(flux, control("photo.png", width, height))

BFL (flux/sampling.py prepare_control): the picture is resized to the output size (PIL Lanczos, stretched), the map
is made from the resized picture, encoded by the AE and packed. BFL encodes the posterior mean; diffusers'
FluxControlPipeline draws a sample from the posterior instead (its only difference; tests compare with the mean).
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from library.data.control_maps import canny_map, resize_control
from library.data.images import BadImageError, load_image
from library.data.tensors import to_tensor
from library.flow.generation import Placement
from library.models.conditioned import ExtraChannelsFlux
from library.models.packing import pack_latents

logger = logging.getLogger(__name__)

CONTROL_PREPROCESSORS = ("none", "canny", "depth")  # none: the picture is the map


def control_map(rgb: np.ndarray, width: int, height: int, preprocessor: str = "none",
                depth_estimator=None) -> torch.Tensor:
    """The control map of an HxWx3 uint8 picture at width x height, (1, 3, height, width) float in [-1, 1] (depth:
    BFL's d / 127.5 - 1, unclamped)."""
    resized = resize_control(rgb, width, height)
    if preprocessor == "none":
        return to_tensor(resized)[None]
    if preprocessor == "canny":
        return to_tensor(canny_map(resized))[None]
    if preprocessor == "depth":
        if depth_estimator is None:
            raise ValueError("the depth control map needs a depth-estimation model: give --depth_model FOLDER")
        return depth_estimator(resized)
    raise ValueError(f"control preprocessor {preprocessor!r}: expected one of {', '.join(CONTROL_PREPROCESSORS)}")


def load_control_picture(path: str | Path) -> np.ndarray:
    try:
        return load_image(path)[0]
    except BadImageError as e:
        raise ValueError(f"control image {e}") from None


@torch.no_grad()
def encode_control(pixels: torch.Tensor, ae: torch.nn.Module, placement: Placement | None = None) -> torch.Tensor:
    """Control maps (B, 3, H, W) in [-1, 1] -> packed control latents (B, H/16 * W/16, 64), float32 (AE mean)."""
    placement = placement or Placement(next(ae.parameters()).device, offload=False)
    with placement.use(ae):
        param = next(ae.parameters())
        latents = ae.encode(pixels.to(param.device, param.dtype)).float()
    return pack_latents(latents)


def bind_control(flux: torch.nn.Module, tokens: torch.Tensor | None) -> ExtraChannelsFlux:
    """`flux` (or the ExtraChannelsFlux around it) bound to packed control latents; None unbinds."""
    model = flux if isinstance(flux, ExtraChannelsFlux) else ExtraChannelsFlux(flux)
    return model.bind(tokens)


class ControlEncoder:
    """Control pictures -> packed control latents with fixed rules, remembering the last (path, size): interactive
    prompts and sample images that keep their control picture encode it once."""

    def __init__(self, ae: torch.nn.Module, preprocessor: str = "none", depth_estimator=None,
                 placement: Placement | None = None):
        if preprocessor not in CONTROL_PREPROCESSORS:
            raise ValueError(f"control preprocessor {preprocessor!r}: expected one of "
                             f"{', '.join(CONTROL_PREPROCESSORS)}")
        if preprocessor == "depth" and depth_estimator is None:
            raise ValueError("--control_preprocessor depth needs --depth_model FOLDER (a local transformers "
                             "depth-estimation model)")
        self.ae, self.preprocessor, self.depth_estimator, self.placement = ae, preprocessor, depth_estimator, placement
        self._last: tuple[tuple[str, int, int], torch.Tensor] | None = None

    def __call__(self, path: str | Path, width: int, height: int) -> torch.Tensor:
        key = (str(path), width, height)
        if self._last is None or self._last[0] != key:
            rgb = load_control_picture(path)
            pixels = control_map(rgb, width, height, self.preprocessor, self.depth_estimator)
            logger.info(f"control image {path} {rgb.shape[1]}x{rgb.shape[0]} -> {width}x{height}, map: "
                        f"{'as given' if self.preprocessor == 'none' else self.preprocessor}")
            self._last = (key, encode_control(pixels, self.ae, self.placement))
        return self._last[1]


def control_image_size(path: str | Path) -> tuple[int, int]:
    """The output size a control picture gives when none is asked for: its own, floored to multiples of 16."""
    rgb = load_control_picture(path)
    height, width = rgb.shape[:2]
    if width < 16 or height < 16:
        raise ValueError(f"control image {path} is {width}x{height}: smaller than 16x16")
    return width // 16 * 16, height // 16 * 16


def bind_control_image(flux: ExtraChannelsFlux, control: ControlEncoder, path: str | Path, width: int | None,
                       height: int | None) -> tuple[int, int]:
    """Bind `flux` to the control latents of `path` at the output size and return (width, height) as asked, or the
    control picture's own size (floored to 16) for what is not given. Sizes round up to 16 as the sampler's do."""
    if width is None or height is None:
        own_w, own_h = control_image_size(path)
        width, height = width or own_w, height or own_h
    flux.bind(control(path, -(-width // 16) * 16, -(-height // 16) * 16))
    return width, height


def control_encoder_for(preprocessor: str, depth_model: str | None, ae: torch.nn.Module,
                        placement: Placement | None) -> ControlEncoder:
    """The command line's ControlEncoder: the depth model (local folder) loaded only for `depth`, on the compute
    device."""
    depth = None
    if preprocessor == "depth":
        from library.models.depth import DepthEstimator

        depth = DepthEstimator(depth_model, placement.device if placement else "cpu")
    return ControlEncoder(ae, preprocessor, depth, placement)


class ControlLatentCache:
    """Packed control latents of training batches, remembered by the content of each fitted map (a digest of its
    pixels), so a map seen again (the next epoch, the other half of a flip) is not encoded again. Content-keyed, so
    never stale; in memory only, least recently used entries dropped beyond `max_bytes`."""

    def __init__(self, max_bytes: int = 2 * 1024**3):
        self.max_bytes, self.bytes, self.encoded = max_bytes, 0, 0
        self._entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()

    @staticmethod
    def _key(pixels: torch.Tensor) -> bytes:
        data = pixels.detach().to("cpu", torch.float32).contiguous().numpy()
        return hashlib.blake2b(data.tobytes(), digest_size=16, person=str(data.shape).encode()[:16]).digest()

    def __call__(self, maps: torch.Tensor, ae: torch.nn.Module, placement: Placement | None = None) -> torch.Tensor:
        """Maps (B, 3, H, W) in [-1, 1] -> packed control latents (B, N, 64) float32 (AE mean), encoding only the
        maps not seen before (together, in one call)."""
        keys = [self._key(m) for m in maps]
        missing = [i for i, k in enumerate(keys) if k not in self._entries]
        if missing:
            fresh = encode_control(maps[missing], ae, placement).cpu()
            self.encoded += len(missing)
            for i, tokens in zip(missing, fresh):
                if keys[i] not in self._entries:
                    self._entries[keys[i]] = tokens
                    self.bytes += tokens.numel() * tokens.element_size()
        out = []
        for k in keys:
            self._entries.move_to_end(k)
            out.append(self._entries[k])
        result = torch.stack(out)
        while self.bytes > self.max_bytes and len(self._entries) > len(set(keys)):
            _, dropped = self._entries.popitem(last=False)
            self.bytes -= dropped.numel() * dropped.element_size()
        return result
