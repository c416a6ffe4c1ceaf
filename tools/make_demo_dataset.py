"""Write a small synthetic captioned dataset and its sd-scripts dataset TOML, for the quickstart and tests.

    python tools/make_demo_dataset.py --out demo_dataset [--count 4] [--size 64]

Images are simple shapes in flat colours (so a tiny model can visibly learn them), each with a `.txt` caption, in
`OUT/images/`, and `OUT/dataset.toml` points at them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SHAPES = ("circle", "square", "triangle", "stripes")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 200, 40)}


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Write a tiny synthetic captioned dataset with a dataset TOML.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--count", type=int, default=4, help="number of images (default: %(default)s)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default: %(default)s)")
    p.add_argument("--resolution", type=int, default=None, help="training resolution in the TOML (default: --size)")
    p.add_argument("--repeats", type=int, default=1, help="num_repeats in the TOML (default: %(default)s)")
    p.add_argument("--controlnet", action="store_true",
                   help="ControlNet pairs instead: red shapes with one shared caption and their silhouettes in "
                        "OUT/conditioning/")
    return p


def draw(shape: str, colour: tuple[int, int, int], size: int):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (245, 245, 240))
    d = ImageDraw.Draw(image)
    m = size // 6
    if shape == "circle":
        d.ellipse((m, m, size - m, size - m), fill=colour)
    elif shape == "square":
        d.rectangle((m, m, size - m, size - m), fill=colour)
    elif shape == "triangle":
        d.polygon([(size // 2, m), (size - m, size - m), (m, size - m)], fill=colour)
    else:
        for x in range(0, size, max(size // 8, 2) * 2):
            d.rectangle((x, 0, x + max(size // 8, 2) - 1, size), fill=colour)
    return image


def make_demo_dataset(out: str | Path, count: int = 4, size: int = 64, resolution: int | None = None,
                      repeats: int = 1) -> Path:
    """Write the images, captions and dataset.toml; returns the TOML's path."""
    out = Path(out)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    colours = list(COLOURS.items())
    for i in range(count):
        shape = SHAPES[i % len(SHAPES)]
        name, rgb = colours[(i // len(SHAPES) + i) % len(colours)]
        draw(shape, rgb, size).save(images / f"{i:03d}_{name}_{shape}.png")
        (images / f"{i:03d}_{name}_{shape}.txt").write_text(f"a {name} {shape} on a white background\n")
    return write_dataset_toml(out, images, resolution or size, repeats)


def write_dataset_toml(out: Path, images: Path, resolution: int, repeats: int,
                       conditioning: Path | None = None) -> Path:
    """`OUT/dataset.toml`: one subset of `images` (with its ControlNet `conditioning` folder when given)."""
    cond_line = f'  conditioning_data_dir = "{conditioning.resolve().as_posix()}"\n' if conditioning else ""
    toml = out / "dataset.toml"
    toml.write_text(
        "[general]\n"
        f"resolution = {resolution}\n"
        'caption_extension = ".txt"\n'
        "\n[[datasets]]\nbatch_size = 1\n"
        f'  [[datasets.subsets]]\n  image_dir = "{images.resolve().as_posix()}"\n{cond_line}'
        f"  num_repeats = {repeats}\n")
    return toml


def silhouette(shape: str, size: int):
    """The conditioning image of a ControlNet pair: the shape in white on black."""
    return draw(shape, (255, 255, 255), size).point(lambda v: 255 if v == 255 else 0)


def make_controlnet_demo_dataset(out: str | Path, count: int = 3, size: int = 64, resolution: int | None = None,
                                 repeats: int = 1, caption: str = "a red shape on a white background") -> Path:
    """ControlNet pairs: red shapes in `OUT/images/` with ONE caption for all, their white-on-black silhouettes (same
    file names) in `OUT/conditioning/`: only the conditioning image says which shape to draw. Returns the TOML."""
    out = Path(out)
    images, cond = out / "images", out / "conditioning"
    images.mkdir(parents=True, exist_ok=True)
    cond.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        shape = SHAPES[i % len(SHAPES)]
        draw(shape, COLOURS["red"], size).save(images / f"{i:03d}_{shape}.png")
        (images / f"{i:03d}_{shape}.txt").write_text(caption + "\n")
        silhouette(shape, size).save(cond / f"{i:03d}_{shape}.png")
    return write_dataset_toml(out, images, resolution or size, repeats, conditioning=cond)


def main(argv: list[str] | None = None) -> int:
    args = setup_parser().parse_args(argv)
    make = make_controlnet_demo_dataset if args.controlnet else make_demo_dataset
    print(make(args.out, args.count, args.size, args.resolution, args.repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
