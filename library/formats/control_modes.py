"""Union ControlNet modes on command lines and in dataset configs (torch-free): InstantX Union's names or numbers."""

from __future__ import annotations

import argparse

UNION_MODE_NAMES = ("canny", "tile", "depth", "blur", "pose", "gray", "lq")  # InstantX Union's modes 0..6


def control_mode(text: str) -> int | None:
    """A Union mode: a name (canny, tile, depth, blur, pose, gray, lq: InstantX's 0..6) or a number; none for a
    pass of a ControlNet that is not a Union model (beside Union passes)."""
    text = str(text).strip().lower()
    if text == "none":
        return None
    if text in UNION_MODE_NAMES:
        return UNION_MODE_NAMES.index(text)
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a mode number (0 or more), one of {', '.join(UNION_MODE_NAMES)} "
                                         f"or none, got {text!r}")
    return value


control_mode.__name__ = "Union mode"
