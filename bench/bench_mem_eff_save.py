"""Peak RSS of saving a model with the plain writer and with --mem_eff_save (library/formats/model_saving.py).

    python bench/bench_mem_eff_save.py [--size-mb 1024] [--save_precision bf16]

Each writer runs in a fresh process holding a float32 state dict of --size-mb (tensors the size of a FLUX.1 block
Linear, 3072 x 3072); the figure is VmHWM (peak RSS) minus the RSS just before the save, i.e. the memory the save
itself needs. Linux only (/proc/self/status).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(size_mb: int, save_precision: str | None, streaming: bool, out: str) -> None:
    sys.path.insert(0, str(ROOT))
    import torch

    from library.formats.model_saving import save_dtype, save_model

    per = 3072 * 3072 * 4
    tensors = {f"blocks.{i}.weight": torch.randn(3072, 3072) for i in range(max(1, size_mb * 2**20 // per))}
    before = _status("VmRSS")
    save_model(tensors, out, {"modelspec.architecture": "flux-1-dev"}, save_dtype(save_precision), streaming=streaming)
    print(json.dumps({"model_bytes": sum(t.numel() * 4 for t in tensors.values()),
                      "save_peak_bytes": _status("VmHWM") - before}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--save_precision", default="bf16", choices=["float", "fp16", "bf16", "none"])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    precision = None if args.save_precision == "none" else args.save_precision
    if args.child is not None:
        child(args.size_mb, precision, args.child == "stream", str(Path(tempfile.gettempdir()) / "bench_save.st"))
        return 0
    import torch

    print(f"torch {torch.__version__}, Python {sys.version.split()[0]}, fp32 state dict of {args.size_mb} MB, "
          f"--save_precision {args.save_precision}")
    print("| writer | model MB | peak RSS of the save MB |")
    print("|---|---|---|")
    for mode in ("plain", "stream"):
        r = subprocess.run([sys.executable, __file__, "--size-mb", str(args.size_mb), "--save_precision",
                            args.save_precision, "--child", mode], capture_output=True, text=True, check=True)
        result = json.loads(r.stdout.strip().splitlines()[-1])
        name = "--mem_eff_save" if mode == "stream" else "plain (safetensors save_file)"
        print(f"| {name} | {result['model_bytes'] / 2**20:.0f} | {result['save_peak_bytes'] / 2**20:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
