"""FLUX.1 Kontext reference images for sampling: files -> BFL's size -> AE posterior mean -> packed tokens and ids,
bound to a `KontextFlux`. One path for flux_minimal_inference.py and for sample images during Kontext training.

    refs = encode_references(["cat.png"], ae, resize="preferred", layout="overlap", placement=placement)
    models.flux = bind_references(flux, refs)          # a KontextFlux: the sampler is unchanged
    width, height = target_size(None, None, refs)      # BFL: the target takes the (first) reference's size

Each reference is resized once (PIL Lanczos, as BFL and diffusers do) to the preferred Kontext size nearest its aspect
ratio (`resize="preferred"`, BFL's rule), or only floored to multiples of 16 (`resize="none"`, DiffSynth uses the
image as given), encoded with the AE's posterior mean (scaled latents) and packed; its ids are (1, row, col) on its
own grid. The tokens are identical at every step, so they are encoded once per set of references. The schedule's
shift counts the target's tokens only: the sampler never sees the reference tokens (KontextFlux appends them inside
the call and returns the target's prediction).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from library.data.images import BadImageError, load_image
from library.data.tensors import to_tensor
from library.flow.generation import Placement
from library.models.kontext import (MULTI_REFERENCE_LAYOUTS, KontextFlux, reference_tokens, size_for_aspect,
                                    snap_to_preferred)

logger = logging.getLogger(__name__)

REFERENCE_RESIZES = ("preferred", "none")
DEFAULT_SIZE = (1360, 768)  # the target without references or a given size (sd-scripts' inference default)
MULTI_REFERENCE_WARNING = ("{n} reference images: FLUX.1 Kontext was trained with one; several are placed by "
                           "--reference_layout {layout} ({how}), a convention outside its training")
LAYOUT_HOW = {"overlap": "every reference at (1, 0, 0), as DiffSynth does",
              "columns": "each reference's columns after the previous ones', as diffusers' multi-image community "
                         "pipeline does"}


@dataclass(frozen=True)
class References:
    """Encoded reference images: tokens (1, N, 64) and ids (1, N, 3) for `KontextFlux`, and what they came from."""

    tokens: torch.Tensor
    ids: torch.Tensor
    paths: tuple[str, ...]
    sizes: tuple[tuple[int, int], ...]  # (width, height) as encoded
    source_sizes: tuple[tuple[int, int], ...]  # (width, height) of the files (EXIF orientation applied)
    resize: str
    layout: str

    @property
    def size(self) -> tuple[int, int]:
        """The first reference's encoded size: the target's size when none is given (BFL)."""
        return self.sizes[0]

    def png_text(self) -> dict[str, str]:
        """PNG text records: the files (`;`-separated, as `--ri` takes them), their encoded sizes, the rules."""
        text = {"reference_images": ";".join(self.paths),
                "reference_sizes": ";".join(f"{w}x{h}" for w, h in self.sizes), "reference_resize": self.resize}
        if len(self.paths) > 1:
            text["reference_layout"] = self.layout
        return text


def reference_size(width: int, height: int, resize: str = "preferred") -> tuple[int, int]:
    """The size a width x height reference is encoded at: BFL's preferred size nearest its aspect ratio, or (resize
    "none") its own size floored to multiples of 16."""
    if resize == "preferred":
        return snap_to_preferred(width, height)
    if resize == "none":
        if width < 16 or height < 16:
            raise ValueError(f"a {width}x{height} reference is smaller than 16x16; use --reference_resize preferred")
        return width // 16 * 16, height // 16 * 16
    raise ValueError(f"reference resize {resize!r}: expected one of {', '.join(REFERENCE_RESIZES)}")


def load_reference(path: str, resize: str = "preferred") -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """(pixels (1, 3, H, W) in [-1, 1], source (width, height), encoded (width, height)) of one reference file."""
    try:
        rgb, _ = load_image(path)
    except BadImageError as e:
        raise ValueError(f"reference image {e}") from None
    source = (rgb.shape[1], rgb.shape[0])
    size = reference_size(*source, resize)
    image = Image.fromarray(rgb)
    if size != source:
        image = image.resize(size, Image.Resampling.LANCZOS)
    return to_tensor(np.array(image))[None], source, size


@torch.no_grad()
def encode_references(paths: Sequence[str], ae: torch.nn.Module, *, resize: str = "preferred",
                      layout: str = "overlap", placement: Placement | None = None) -> References:
    """Load, resize and AE-encode (posterior mean) reference images once; their packed tokens and ids, in order.
    The tokens are float32 on the AE's compute device (KontextFlux casts them to the transformer's dtype)."""
    if not paths:
        raise ValueError("encode_references needs one or more reference images")
    if layout not in MULTI_REFERENCE_LAYOUTS:
        raise ValueError(f"reference layout {layout!r}: expected one of {', '.join(MULTI_REFERENCE_LAYOUTS)}")
    loaded = [load_reference(str(p), resize) for p in paths]
    placement = placement or Placement(next(ae.parameters()).device, offload=False)
    with placement.use(ae):
        param = next(ae.parameters())
        latents = [ae.encode(pixels.to(param.device, param.dtype)).float() for pixels, _, _ in loaded]
    tokens, ids = reference_tokens(latents, layout)
    return References(tokens, ids, tuple(str(p) for p in paths), tuple(s for _, _, s in loaded),
                      tuple(s for _, s, _ in loaded), resize, layout)


def bind_references(flux: torch.nn.Module, refs: References | None) -> KontextFlux:
    """`flux` (or the KontextFlux around it) bound to `refs`; None unbinds (text-to-image with a Kontext model)."""
    model = flux if isinstance(flux, KontextFlux) else KontextFlux(flux)
    return model.bind(None) if refs is None else model.bind(refs.tokens, refs.ids)


def target_size(width: int | None, height: int | None, refs: References | None = None,
                aspect_ratio: float | None = None) -> tuple[int, int]:
    """The target's (width, height): as given; else, with `aspect_ratio` (BFL's option), about 1 megapixel at that
    width / height floored to 16; what is not given comes from the first reference (BFL: its encoded size; one side
    given: the other keeps the reference's aspect ratio, rounded to 16), else 1360x768."""
    if width is not None and height is not None:
        return width, height
    if aspect_ratio is not None and width is None and height is None:
        return size_for_aspect(aspect_ratio)
    if refs is None:
        return width or DEFAULT_SIZE[0], height or DEFAULT_SIZE[1]
    ref_w, ref_h = refs.size
    if width is None and height is None:
        return ref_w, ref_h
    if width is not None:
        return width, max(16, round(width * ref_h / ref_w / 16) * 16)
    return max(16, round(height * ref_w / ref_h / 16) * 16), height


def multi_reference_warning(refs: References) -> str | None:
    """The warning for several references (both conventions are off-distribution), or None for one."""
    if len(refs.paths) < 2:
        return None
    return MULTI_REFERENCE_WARNING.format(n=len(refs.paths), layout=refs.layout, how=LAYOUT_HOW[refs.layout])


class ReferenceEncoder:
    """`encode_references` with fixed rules, remembering the last set of paths: interactive prompts and sample
    images that keep their references encode them once. Logs each new set's sizes and the several-references
    warning."""

    def __init__(self, ae: torch.nn.Module, resize: str = "preferred", layout: str = "overlap",
                 placement: Placement | None = None):
        self.ae, self.resize, self.layout, self.placement = ae, resize, layout, placement
        self._last: tuple[tuple[str, ...], References] | None = None

    def __call__(self, paths: Sequence[str]) -> References | None:
        """The references of `paths` (None for no paths)."""
        key = tuple(str(p) for p in paths)
        if not key:
            return None
        if self._last is None or self._last[0] != key:
            refs = encode_references(key, self.ae, resize=self.resize, layout=self.layout, placement=self.placement)
            sizes = ", ".join(f"{p} {a}x{b} -> {w}x{h}" for p, (a, b), (w, h)
                              in zip(refs.paths, refs.source_sizes, refs.sizes))
            logger.info(f"reference images ({self.resize}): {sizes}")
            warning = multi_reference_warning(refs)
            if warning:
                logger.warning(warning)
            self._last = (key, refs)
        return self._last[1]
