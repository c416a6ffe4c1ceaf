"""Draw the quick start's result: what the LoRA learned, side by side with the base model, and the loss curve.

    python tools/quickstart_report.py --images quickstart/data/images --samples quickstart/samples \
        --ae quickstart/models/ae.safetensors --loss_csv quickstart/loss.csv --out quickstart

writes OUT/result.png: one row per training image (its caption above), columns: the training image, its latents as
the trainer cached them (and trained on) decoded by the AE (the best a LoRA can show through this AE), and the base
model's and the LoRA's samples for that caption (same seed), decoded; each sample's MSE to the training latents is
printed under it. OUT/loss.png plots the trainer's `--loss_csv`. Everything is drawn with PIL.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CELL = 128  # pixels per panel side
PAD = 8
TEXT = 14  # height of a text line with PIL's default font
COLUMNS = ("training image", "its latents, decoded", "base model sample", "LoRA sample")


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Draw result.png (training image, base and LoRA samples) and loss.png.")
    p.add_argument("--images", required=True, help="training images with .txt captions and the trainer's latent "
                                                   "caches (<stem>_<W>x<H>_flux.npz, from --cache_latents_to_disk)")
    p.add_argument("--samples", required=True, help="folder of <stem>_base/ and <stem>_lora/, each holding the "
                                                    "*_latents.safetensors of flux_minimal_inference --output_latents")
    p.add_argument("--ae", required=True, help="the AE file the samples were made with")
    p.add_argument("--loss_csv", default=None, help="the trainer's --loss_csv (step,loss,lr); no loss.png without")
    p.add_argument("--out", required=True, help="output folder")
    return p


def training_latents(image: Path):
    """The latents the trainer cached for `image` (16 x h x w)."""
    import numpy as np
    import torch

    caches = sorted(image.parent.glob(f"{image.stem}_*_flux.npz"))
    if not caches:
        raise FileNotFoundError(f"no latent cache for {image} (train with --cache_latents_to_disk)")
    with np.load(caches[-1]) as cache:
        key = next(k for k in cache.files if k.startswith("latents_"))
        return torch.from_numpy(cache[key]).float()


def sample_latents(folder: Path):
    from safetensors.torch import load_file

    paths = sorted(folder.glob("*_latents.safetensors"))
    if not paths:
        raise FileNotFoundError(f"no *_latents.safetensors in {folder} (sample with --output_latents)")
    z = load_file(str(paths[-1]))["latents"].float()
    return z.reshape(z.shape[-3:])  # (16, h, w), without a batch dimension


def decode(ae, z):
    """A 16 x h x w latent as a CELL x CELL picture, through the AE's decoder."""
    import torch
    from PIL import Image

    with torch.no_grad():
        x = ae.decode(z[None].to(ae.dtype))[0].float().clamp(-1, 1)
    pixels = ((x + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(pixels, "RGB").resize((CELL, CELL), Image.NEAREST)


def draw_result(rows: list[dict], ae, path: Path) -> Path:
    """rows: caption, image (PIL), target/base/lora latents, decoded by `ae`. Writes the labelled grid to `path`."""
    from PIL import Image, ImageDraw

    width = PAD + len(COLUMNS) * (CELL + PAD)
    row_height = TEXT + CELL + 2 * TEXT + PAD
    top = 2 * TEXT + PAD
    canvas = Image.new("RGB", (width, top + len(rows) * row_height), "white")
    d = ImageDraw.Draw(canvas)
    d.text((PAD, 2), "Same caption and seed with and without the LoRA; all latents decoded by the tiny AE.",
           fill="black")
    for c, title in enumerate(COLUMNS):
        d.text((PAD + c * (CELL + PAD), TEXT + 2), title, fill="black")
    for r, row in enumerate(rows):
        y = top + r * row_height
        d.text((PAD, y), f'"{row["caption"]}"', fill="black")
        y += TEXT
        panels = [row["image"].convert("RGB").resize((CELL, CELL), Image.NEAREST)]
        panels += [decode(ae, row[k]) for k in ("target", "base", "lora")]
        for c, panel in enumerate(panels):
            canvas.paste(panel, (PAD + c * (CELL + PAD), y))
        for c, key in ((2, "base"), (3, "lora")):
            mse = ((row[key] - row["target"]) ** 2).mean().item()
            d.text((PAD + c * (CELL + PAD), y + CELL + 2), f"MSE to training: {mse:.3f}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def read_losses(path: Path) -> list[float]:
    with open(path, newline="", encoding="utf-8") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def draw_loss(losses: list[float], path: Path, size: tuple[int, int] = (640, 360)) -> Path:
    """Per-step loss (light) and its running mean over ~5% of the steps (dark), linear axes from 0, drawn with PIL."""
    from PIL import Image, ImageDraw

    w, h = size
    left, right, top, bottom = 56, 16, 28, 32
    canvas = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(canvas)
    window = max(1, len(losses) // 20)
    mean = [sum(losses[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(losses))]
    y_max = max(losses) if losses else 1.0
    y_max = y_max if y_max > 0 else 1.0
    n = max(len(losses), 2)

    def xy(i: int, v: float) -> tuple[float, float]:
        return (left + (w - left - right) * i / (n - 1), h - bottom - (h - top - bottom) * min(v, y_max) / y_max)

    d.rectangle((left, top, w - right, h - bottom), outline="black")
    for frac in (0, 0.25, 0.5, 0.75, 1):
        _, y = xy(0, frac * y_max)
        d.line((left - 4, y, left, y), fill="black")
        d.text((4, y - 6), f"{frac * y_max:.3g}", fill="black")
    for i in (0, n - 1):
        x, _ = xy(i, 0)
        d.text((x - 8, h - bottom + 4), str(i + 1), fill="black")
    d.text((left, 6), f"training loss per step (light) and its {window}-step running mean (dark); x: step",
           fill="black")
    if len(losses) > 1:
        d.line([xy(i, v) for i, v in enumerate(losses)], fill=(170, 190, 230), width=1)
        d.line([xy(i, v) for i, v in enumerate(mean)], fill=(20, 40, 140), width=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def make_report(images: str | Path, samples: str | Path, ae: str | Path, out: str | Path,
                loss_csv: str | Path | None = None) -> dict[str, Path]:
    import torch
    from PIL import Image

    from library.models.autoencoder import load_ae  # torch only when drawing: --help stays fast

    images, samples, out = Path(images), Path(samples), Path(out)
    rows = []
    for image in sorted(images.glob("*.png")):
        rows.append({"caption": image.with_suffix(".txt").read_text(encoding="utf-8").strip(),
                     "image": Image.open(image), "target": training_latents(image),
                     "base": sample_latents(samples / f"{image.stem}_base"),
                     "lora": sample_latents(samples / f"{image.stem}_lora")})
    if not rows:
        raise FileNotFoundError(f"no training images (*.png) in {images}")
    written = {"result": draw_result(rows, load_ae(ae, dtype=torch.float32), out / "result.png")}
    if loss_csv:
        written["loss"] = draw_loss(read_losses(Path(loss_csv)), out / "loss.png")
    for row in rows:
        base = ((row["base"] - row["target"]) ** 2).mean().item()
        lora = ((row["lora"] - row["target"]) ** 2).mean().item()
        print(f'"{row["caption"]}": latent MSE to the training latents: base {base:.4f}, LoRA {lora:.4f} '
              f"({base / max(lora, 1e-12):.1f}x closer)")
    return written


def main(argv: list[str] | None = None) -> int:
    args = setup_parser().parse_args(argv)
    for name, path in make_report(args.images, args.samples, args.ae, args.out, args.loss_csv).items():
        print(f"{name:6s} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
