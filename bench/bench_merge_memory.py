#!/usr/bin/env python
"""Peak RSS of networks/flux_merge_lora.py merging a LoRA into a real-width FLUX checkpoint.

What it checks: the merge streams the checkpoint tensor by tensor (read, add the LoRA update in fp32, write), so its
peak RSS above the interpreter should stay a small fraction of the checkpoint, not one or two copies of it.

How: writes a real-width (hidden 3072) BFL checkpoint of about --size-gb with bench_load_memory's streaming writer
and a rank --rank kohya LoRA on every block Linear, then runs the merge CLI's code in a fresh process and reports
its VmHWM (the kernel's peak RSS) minus the RSS before the merge started, beside the checkpoint size.

    python bench/bench_merge_memory.py                    # ~1.5 GB bf16 checkpoint, rank 16
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def child(ckpt: str, lora: str, out: str, save_precision: str | None) -> None:
    from bench_load_memory import proc_status

    from networks import flux_merge_lora

    before = proc_status()
    t0 = time.perf_counter()
    argv = ["--flux_model", ckpt, "--save_to", out, "--models", lora]
    if save_precision:
        argv += ["--save_precision", save_precision]
    assert flux_merge_lora.main(argv) == 0
    after = proc_status()
    print(json.dumps({"baseline": before["VmRSS"], "hwm": after["VmHWM"], "seconds": time.perf_counter() - t0}))


def write_lora(path: Path, params, rank: int) -> int:
    import torch

    from library.models.transformer import Flux
    from library.formats.safetensors_io import save_file_atomic
    from networks import lora_flux

    with torch.device("meta"):
        flux = Flux(params)
    sd = {}
    g = torch.Generator().manual_seed(0)
    blocks = ("DoubleStreamBlock", "SingleStreamBlock")
    for name, module in lora_flux._linears(flux, lora_flux.LORA_PREFIX_FLUX, blocks):
        sd[f"{name}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=g) * 0.01
        sd[f"{name}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.01
        sd[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file_atomic(sd, path)
    return path.stat().st_size


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gb", type=float, default=1.5)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--save-precision", default=None, help="e.g. fp32 to also measure a widening merge")
    p.add_argument("--_child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        child(*args._child, args.save_precision)
        return 0
    import torch
    from bench_load_memory import checkpoint_entries, plan_params, write_checkpoint

    params = plan_params(args.size_gb, 2)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt_bytes = write_checkpoint(tmp / "flux.safetensors", checkpoint_entries(params, "bfl"), "BF16",
                                      {"modelspec.architecture": "flux-1-dev"})
        lora_bytes = write_lora(tmp / "lora.safetensors", params, args.rank)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", str(tmp / "flux.safetensors"),
               str(tmp / "lora.safetensors"), str(tmp / "merged.safetensors")]
        if args.save_precision:
            cmd += ["--save-precision", args.save_precision]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if r.returncode:
            print(r.stderr[-3000:])
            return 1
        m = json.loads(r.stdout.strip().splitlines()[-1])
        out_bytes = (tmp / "merged.safetensors").stat().st_size
    peak = m["hwm"] - m["baseline"]
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}, "
          f"torch {torch.__version__}")
    print(f"checkpoint {ckpt_bytes / 1e9:.2f} GB bf16 ({params.depth} double + {params.depth_single_blocks} single "
          f"real-width blocks), LoRA rank {args.rank} {lora_bytes / 1e6:.0f} MB, output {out_bytes / 1e9:.2f} GB")
    print(f"merge: {m['seconds']:.1f} s, peak RSS above start {peak / 1e6:.0f} MB = "
          f"{peak / ckpt_bytes:.2f} x the checkpoint")
    return 0


if __name__ == "__main__":
    sys.exit(main())
