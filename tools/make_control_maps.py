"""Write the control maps of a folder of pictures, for FLUX.1 Canny / Depth training (the dataset's
`conditioning_data_dir`): each picture's Canny edges (OpenCV, BFL's thresholds 50/200) or estimated depth (a local
transformers depth-estimation model), at the picture's own size, under the same file name (as PNG).

    python tools/make_control_maps.py --images data/images --out data/canny --preprocessor canny
    python tools/make_control_maps.py --images data/images --out data/depth --preprocessor depth \
        --depth_model models/depth-anything-large-hf

The maps are made by the code inference uses (library/flow/canny_depth.py), so training sees what inference feeds.
Existing maps are kept unless --overwrite. A PNG holds 0..255: a depth estimate beyond BFL's d / 127.5 - 1 range
is clipped to it (inference computes depth unclipped).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Write Canny or depth control maps of a folder of pictures.")
    p.add_argument("--images", required=True, help="folder of training pictures")
    p.add_argument("--out", required=True, help="folder for the maps (the dataset's conditioning_data_dir)")
    p.add_argument("--preprocessor", required=True, choices=["canny", "depth"])
    p.add_argument("--depth_model", default=None, help="with depth: a local transformers depth-estimation model")
    p.add_argument("--device", default="cpu", help="device of the depth model (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="remake maps that exist")
    return p


def make_control_maps(images: str | Path, out: str | Path, preprocessor: str, depth_model: str | None = None,
                      device: str = "cpu", overwrite: bool = False) -> list[Path]:
    """Write the maps; returns the paths written."""
    import numpy as np
    from PIL import Image

    from library.data.images import list_images, load_image  # torch after parsing: fast --help
    from library.flow.canny_depth import control_map
    from library.formats.atomic_io import atomic_write

    if preprocessor == "depth" and not depth_model:
        raise ValueError("--preprocessor depth needs --depth_model FOLDER")
    estimator = None
    if preprocessor == "depth":
        from library.models.depth import DepthEstimator

        estimator = DepthEstimator(depth_model, device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in list_images(images):
        target = out / (path.stem + ".png")
        if target.exists() and not overwrite:
            continue
        rgb = load_image(path)[0]
        pixels = control_map(rgb, rgb.shape[1], rgb.shape[0], preprocessor, estimator)[0]
        array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        picture = Image.fromarray(np.ascontiguousarray(array))
        atomic_write(target, lambda tmp, picture=picture: picture.save(tmp, format="PNG"))
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    args = setup_parser().parse_args(argv)
    written = make_control_maps(args.images, args.out, args.preprocessor, args.depth_model, args.device,
                                args.overwrite)
    print(f"wrote {len(written)} {args.preprocessor} maps to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
