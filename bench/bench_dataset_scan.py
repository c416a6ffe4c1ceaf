#!/usr/bin/env python
"""Dataset scanning (header probe + bucket choice) and image decode throughput.

What it checks: probing and bucketing 10,000 images from their headers takes at most 5 s on the 2-core development
machine (`--limit`), so a dataset can be fully validated before training starts; and how many images per second
the decode + resize + crop path delivers at 1024 px with 0, 1 and 2 DataLoader workers.

How:
  1. Writes `--n` small images (long side 64-640 px, 12 aspect ratios, ~45 % JPEG, ~45 % PNG, 5 % WebP, 5 % BMP;
     every tenth JPEG carries an EXIF orientation of 3, 6 or 8; smooth content, so files are small: ~15 KB
     on average) into a temporary folder. Not timed.
  2. Scan = `list_images` + `check_images` (header probe and structure check of every file) + `BucketPlanner.select`
     for every image (resolution 1024, buckets on, upscale mode), and `bucket_info`. "cold" passes first flush the
     files to disk and drop them from the page cache (posix_fadvise DONTNEED on these files only); "warm" passes
     run right after. Each variant runs with 1 and 2 probe threads.
  3. Decode: `--decode-n` JPEGs of about 1200x900 (a few other sizes) are loaded with `load_image`, assigned a
     bucket and resized + centre-cropped with `resize_and_crop` inside a minimal torch Dataset, iterated by a
     DataLoader (batch_size=1) with 0, 1 and 2 workers, repeats interleaved. Worker start-up is included.
     (Do not call cv2.setNumThreads inside forked DataLoader workers: with OpenCV 5.0 the call hangs forever once
     the parent process has used OpenCV's thread pool.)
  4. Content identity (the caches' staleness check): `file_content_hash` (BLAKE2b of every byte) of the scan set's
     images, cold (evicted first) and warm; and `weights_fingerprint` of a `--model-mb` safetensors file of random
     bytes: cold and sampled (first run, 64 MiB read), remembered (later runs: an index lookup), and a full BLAKE2b
     read of the same file for comparison.

    python bench/bench_dataset_scan.py                 # 10,000 images, 200 decodes (~1 min)
    python bench/bench_dataset_scan.py --n 2000 --decode-n 50 --markdown
The process exits 1 when the best 10,000-image-equivalent scan time exceeds --limit seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from library.data import cache_common  # noqa: E402
from library.data.buckets import BucketPlanner, resize_and_crop  # noqa: E402
from library.data.images import check_images, list_images, load_image  # noqa: E402

ASPECTS = [(1, 1), (4, 3), (3, 4), (3, 2), (2, 3), (16, 9), (9, 16), (5, 4), (4, 5), (2, 1), (1, 2), (21, 9)]


def _texture(rng: np.random.Generator, w: int, h: int, noise: float) -> np.ndarray:
    """Smooth gradients plus optional noise (noise makes JPEG decoding photo-like, but PNG encoding very slow)."""
    x = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    base = 255 * (0.5 + 0.5 * np.sin(6 * x * rng.uniform(0.5, 2) + 4 * y * rng.uniform(0.5, 2) + np.arange(3)))
    if noise:
        base = base + rng.normal(0, noise, (h, w, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


def generate_scan_set(folder: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    # Images are crops of one posterised texture: encoding (PNG above all) stays fast and files small.
    pool = _texture(rng, 640, 640, noise=0) // 16 * 16
    for i in range(n):
        aw, ah = ASPECTS[i % len(ASPECTS)]
        long_side = int(rng.integers(64, 641))
        w, h = (long_side, max(8, long_side * ah // aw)) if aw >= ah else (max(8, long_side * aw // ah), long_side)
        img = Image.fromarray(pool[:h, :w])
        kind = i % 20
        if kind < 9:
            exif = Image.Exif()
            if i % 10 == 0:
                exif[0x0112] = (3, 6, 8)[(i // 10) % 3]
            img.save(folder / f"img_{i:05d}.jpg", "JPEG", quality=85, exif=exif)
        elif kind < 18:
            img.save(folder / f"img_{i:05d}.png", "PNG", compress_level=1)
        elif kind == 18:
            img.save(folder / f"img_{i:05d}.webp", "WEBP", quality=80, method=0)
        else:
            img.save(folder / f"img_{i:05d}.bmp", "BMP")


def generate_decode_set(folder: Path, n: int, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    sizes = [(1200, 900), (1200, 900), (1280, 960), (900, 1200), (1344, 768)]
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        Image.fromarray(_texture(rng, w, h, noise=6)).save(folder / f"dec_{i:04d}.jpg", "JPEG", quality=90)


def evict(paths: list[Path]) -> None:
    """Drop these files from the page cache (only these: nothing else on the machine is touched)."""
    os.sync()  # dirty pages cannot be dropped
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def scan(folder: Path, planner: BucketPlanner, threads: int) -> tuple[float, int, dict]:
    t0 = time.perf_counter()
    paths = list_images(folder)
    probes, _ = check_images(paths, num_threads=threads)
    choices = [planner.select(p.size) for p in probes]
    info = planner.bucket_info(choices)
    return time.perf_counter() - t0, len(probes), info


class DecodeDataset:
    """Minimal map-style dataset: load, pick the bucket, resize and centre-crop; returns a CHW uint8 tensor."""

    def __init__(self, probes, planner):
        self.items = [(p.path, planner.select(p.size)) for p in probes]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        import torch

        path, choice = self.items[i]
        rgb, _ = load_image(path)
        out, _, _, _ = resize_and_crop(rgb, choice.resized_size, choice.bucket_reso)
        return torch.from_numpy(out).permute(2, 0, 1)


def decode_throughput(dataset, workers: int) -> float:
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=1, shuffle=False, num_workers=workers)
    t0 = time.perf_counter()
    count = sum(1 for _ in loader)
    return count / (time.perf_counter() - t0)


def hash_images(paths: list[Path]) -> float:
    t0 = time.perf_counter()
    for p in paths:
        cache_common.file_content_hash(p)
    return time.perf_counter() - t0


def fingerprint_costs(folder: Path, megabytes: int) -> dict[str, float]:
    """Seconds of weights_fingerprint on a fresh file (cold: sampled read), remembered, and a full cold read."""
    path = folder / "model.safetensors"
    header = json.dumps({"w": {"dtype": "U8", "shape": [megabytes << 20], "data_offsets": [0, megabytes << 20]}})
    header = header.encode() + b" " * (-len(header) % 8)
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        for _ in range(megabytes):
            f.write(rng.bytes(1 << 20))
    os.environ[cache_common.FINGERPRINT_INDEX_ENV] = str(folder / "fingerprints.json")  # not the user's index
    out = {}
    evict([path])
    t0 = time.perf_counter()
    cache_common.weights_fingerprint(path)
    out["first run (cold, sampled)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    cache_common.weights_fingerprint(path)
    out["later runs (remembered)"] = time.perf_counter() - t0
    evict([path])
    t0 = time.perf_counter()
    cache_common.file_content_hash(path)
    out["full BLAKE2b read (cold), for comparison"] = time.perf_counter() - t0
    return out


def machine_line() -> str:
    from machine import cpu_model

    model = cpu_model()
    return f"{model}, {os.cpu_count()} cores"


def versions_line() -> str:
    import cv2
    import PIL
    import torch

    return (f"Python {platform.python_version()}, numpy {np.__version__}, Pillow {PIL.__version__}, "
            f"opencv {cv2.__version__}, torch {torch.__version__}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10_000, help="images for the scan benchmark")
    ap.add_argument("--decode-n", type=int, default=200, help="~1200x900 JPEGs for the decode benchmark")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of each warm scan and decode variant")
    ap.add_argument("--limit", type=float, default=5.0, help="seconds allowed for 10,000 images (best pass)")
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    ap.add_argument("--model-mb", type=int, default=1024, help="size of the model file fingerprinted (MiB)")
    ap.add_argument("--markdown", action="store_true", help="print the result tables as markdown")
    args = ap.parse_args()

    load_before = os.getloadavg()[0]  # the machines are shared: say how busy this one was
    work = args.dir or Path(tempfile.mkdtemp(prefix="bench_scan_"))
    scan_dir, decode_dir = work / "scan", work / "decode"
    scan_dir.mkdir(parents=True, exist_ok=True)
    decode_dir.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        generate_scan_set(scan_dir, args.n)
        generate_decode_set(decode_dir, args.decode_n)
        print(f"generated {args.n} + {args.decode_n} images in {time.perf_counter() - t0:.1f} s (not timed)")
        planner = BucketPlanner(1024, enable_bucket=True)
        paths = list_images(scan_dir)
        total_bytes = sum(p.stat().st_size for p in paths)

        rows = []
        for threads in (1, 2):
            evict(paths)
            cold, count, info = scan(scan_dir, planner, threads)
            warm = [scan(scan_dir, planner, threads)[0] for _ in range(args.repeats)]
            rows.append((threads, cold, statistics.median(warm), min(warm)))
        best = min(min(r[1:]) for r in rows) * 10_000 / count

        probes, _ = check_images(list_images(decode_dir))
        dataset = DecodeDataset(probes, planner)
        rates: dict[int, list[float]] = {0: [], 1: [], 2: []}
        for _ in range(args.repeats):  # interleaved, so a burst of load from elsewhere hits every variant
            for w in rates:
                rates[w].append(decode_throughput(dataset, w))
        decode_rows = [(w, statistics.median(r), max(r)) for w, r in rates.items()]
        buckets_used = sorted({tuple(b["resolution"]) for b in info["buckets"].values()})

        evict(paths)
        hash_cold = hash_images(paths)
        hash_warm = [hash_images(paths) for _ in range(args.repeats)]
        fingerprints = fingerprint_costs(work, args.model_mb)
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\nmachine: {machine_line()}, 1-min load average {load_before:.2f} before and "
          f"{os.getloadavg()[0]:.2f} after the run\nversions: {versions_line()}")
    print(f"scan: {count} images, {total_bytes / 1e6:.1f} MB, {len(buckets_used)} buckets used, "
          f"mean |ar error| {info['mean_img_ar_error']:.4f}")
    header = ["probe threads", "cold pass s", "warm pass s (median)", "warm pass s (min)", "images/s (warm median)"]
    print("\n" + _table(header, [[str(t), f"{c:.2f}", f"{m:.2f}", f"{mn:.2f}", f"{count / m:,.0f}"]
                                  for t, c, m, mn in rows], args.markdown))
    print(f"\nbest pass scaled to 10,000 images: {best:.2f} s (limit {args.limit:.1f} s)")
    print(f"\ndecode + resize + centre crop, {len(dataset)} JPEGs ~1200x900 -> 1024-class buckets:")
    print("\n" + _table(["DataLoader workers", "images/s (median)", "images/s (best)"],
                        [[str(w), f"{m:.1f}", f"{b:.1f}"] for w, m, b in decode_rows], args.markdown))
    print(f"\ncontent hash (BLAKE2b) of the {count} scan images ({total_bytes / 1e6:.1f} MB), one thread:")
    print("\n" + _table(["pass", "s", "s per 10,000 images"],
                        [[name, f"{t:.2f}", f"{t * 10_000 / count:.2f}"]
                         for name, t in (("cold", hash_cold), ("warm (median)", statistics.median(hash_warm)))],
                        args.markdown))
    print(f"\nmodel fingerprint of a {args.model_mb} MiB safetensors file:")
    print("\n" + _table(["case", "s"], [[k, f"{v:.3f}"] for k, v in fingerprints.items()], args.markdown))
    return 0 if best <= args.limit else 1


def _table(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*header)] + [fmt.format(*r) for r in rows])


if __name__ == "__main__":
    sys.exit(main())
