"""Step time of gradient synchronisation on 2 processes: DDP and the reducer (all-reduce launched while the backward
runs) against the old after-backward sync, with the bytes each step communicates; and a stated model of 8 x H100.

    python bench/bench_grad_sync.py                 # 2 gloo processes on this machine, the "small" preset
    python bench/bench_grad_sync.py --model-only    # only the 8 x H100 model of a 12B full fine-tune

Both processes build the same transformer (FLUX.1's architecture at a small width, fp32) and run forward + backward
of a fixed random batch; the modes take turns in each round (a busy machine slows them alike), in the same processes:

* `no sync`: compute only, each process keeps its own gradients (the floor);
* `after backward`: the path this replaced -- once the backward has finished, the gradients are packed into 256 MiB
  buckets and all-reduced one bucket after another (nothing overlaps);
* `reducer`: library/distributed/grad_sync.py's GradientBuckets (25 MiB buckets launched from gradient hooks);
* `ddp`: torch's DistributedDataParallel (25 MiB buckets, accelerate's default), as the DDP engine runs it.

"payload" is the gradient bytes all-reduced per step; a ring all-reduce sends and receives 2(N-1)/N of it per
process. The CPU numbers measure the schedule (gloo runs on its own threads, so the all-reduce can overlap compute),
not GPU bandwidth: the 8 x H100 model prints what the same schedules cost at NVLink and PCIe bandwidths.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from library.distributed.grad_sync import GradientBuckets, plan_buckets  # noqa: E402
from library.models.transformer import FLUX_PRESETS, Flux  # noqa: E402

MODES = ("no sync", "after backward", "reducer", "ddp")
OLD_BUCKET_BYTES = 256 * 2**20  # the old grad_sync.average_gradients' buckets
MiB = 2**20


def small_params():
    """FLUX.1's blocks at width 512 (4 heads of 128): 4 double + 8 single blocks, ~70 M parameters."""
    return replace(FLUX_PRESETS["dev"], hidden_size=512, num_heads=4, depth=4, depth_single_blocks=8,
                   context_in_dim=512, vec_in_dim=256)


def batch(params, tokens: int, text: int):
    g = torch.Generator().manual_seed(0)
    grid = int(tokens ** 0.5)
    ids = torch.zeros(1, grid * grid, 3)
    ids[0, :, 1] = torch.arange(grid).repeat_interleave(grid)
    ids[0, :, 2] = torch.arange(grid).repeat(grid)
    return dict(img=torch.randn(1, grid * grid, params.in_channels, generator=g), img_ids=ids,
                txt=torch.randn(1, text, params.context_in_dim, generator=g), txt_ids=torch.zeros(1, text, 3),
                timesteps=torch.full((1,), 0.5), y=torch.randn(1, params.vec_in_dim, generator=g),
                guidance=torch.full((1,), 3.5))


def average_after_backward(params, world: int) -> int:
    """The old path: after the backward, 256 MiB buckets all-reduced one after another; returns the payload."""
    payload = 0
    for bucket in plan_buckets([p for p in params if p.grad is not None], OLD_BUCKET_BYTES):
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        dist.all_reduce(flat)
        flat.div_(world)
        for p, part in zip(bucket, flat.split([p.numel() for p in bucket])):
            p.grad.copy_(part.view_as(p.grad))
        payload += flat.numel() * flat.element_size()
    return payload


def _worker(rank: int, init: str, opts, results) -> None:
    torch.set_num_threads(opts.threads)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        params = small_params()
        torch.manual_seed(0)
        model = Flux(params)
        inputs = batch(params, opts.tokens, opts.text)
        trained = list(model.parameters())
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        payload = dict.fromkeys(MODES, 0)
        mode = [None]
        # all set up at once and taken in turns each round, so a busy neighbour slows every mode alike: DDP's hooks
        # act only after its own forward, the reducer's only when its mode runs
        ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=25)

        def counted(state, bucket):
            payload["ddp"] += bucket.buffer().numel() * bucket.buffer().element_size()
            return default_hooks.allreduce_hook(state, bucket)

        ddp.register_comm_hook(None, counted)
        buckets = GradientBuckets(trained, "cpu", lambda: mode[0] == "reducer")

        def finish(m):
            if m == "reducer":
                payload[m] += sum(size * 4 for size in buckets.sizes)
                buckets.finish()
            elif m == "after backward":
                payload[m] += average_after_backward(trained, 2)

        times = {m: [] for m in MODES}
        for i in range(opts.warmup + opts.steps):
            for m in MODES:
                if i == opts.warmup:
                    payload[m] = 0
                mode[0] = m
                dist.barrier()
                start = time.perf_counter()
                (ddp if m == "ddp" else model)(**inputs).float().square().mean().backward()
                finish(m)
                times[m].append(time.perf_counter() - start)
                model.zero_grad(set_to_none=True)
        out = {m: (statistics.median(times[m][opts.warmup:]), payload[m] / opts.steps) for m in MODES}
        results[rank] = (out, sum(p.numel() for p in trained))
    finally:
        dist.destroy_process_group()


def measure(opts) -> tuple[dict, int]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        results = mp.Manager().dict()
        os.environ.setdefault("OMP_NUM_THREADS", str(opts.threads))
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), opts, results), nprocs=2, join=True)
        out, count = results[0]
        slowest = {m: (max(results[r][0][m][0] for r in range(2)), out[m][1]) for m in MODES}
        return slowest, count


def h100_model(opts) -> list[tuple[str, ...]]:
    """Per optimizer step of a 12B full fine-tune on N GPUs: the ring all-reduce time of the bf16 gradients at a
    bus bandwidth, and what of it shows in the step without and with overlap."""
    payload = opts.params_b * 1e9 * 2  # bf16 gradients
    ring = 2 * (opts.gpus - 1) / opts.gpus * payload
    rows = []
    for name, gbps in (("NVLink", opts.nvlink_gbps), ("PCIe", opts.pcie_gbps)):
        comm = ring / (gbps * 1e9)
        tail = 2 * (opts.gpus - 1) / opts.gpus * 25 * MiB / (gbps * 1e9)  # the last 25 MiB bucket after backward
        exposed = max(0.0, comm - opts.backward_s) + tail
        base = opts.forward_s + opts.backward_s
        rows.append((f"{name} {gbps:g} GB/s", f"{ring / 1e9:.1f} GB", f"{comm:.3f} s", f"{base + comm:.2f} s",
                     f"{base + exposed:.2f} s", f"{exposed:.3f} s", f"{comm / (base + comm):.0%}"))
    return rows


def print_table(header, rows) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64, help="image tokens (a square grid)")
    ap.add_argument("--text", type=int, default=16, help="text tokens")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="compute threads per process")
    ap.add_argument("--model-only", action="store_true", help="only print the 8 x H100 model")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--params_b", type=float, default=11.9, help="trained parameters, billions (FLUX.1: 11.9)")
    ap.add_argument("--nvlink_gbps", type=float, default=360.0, help="NCCL all-reduce bus bandwidth over NVLink")
    ap.add_argument("--pcie_gbps", type=float, default=25.0, help="NCCL all-reduce bus bandwidth over PCIe")
    ap.add_argument("--forward_s", type=float, default=0.32, help="assumed forward time of one micro-batch")
    ap.add_argument("--backward_s", type=float, default=0.64, help="assumed backward time of one micro-batch")
    opts = ap.parse_args(argv)
    if not opts.model_only:
        from machine import cpu_model

        import accelerate

        print(f"{cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}, accelerate {accelerate.__version__}"
              f", Python {sys.version.split()[0]}; 2 gloo processes x {opts.threads} thread(s); "
              f"{opts.tokens} image + {opts.text} text tokens\n")
        results, count = measure(opts)
        floor = results["no sync"][0]
        rows = [(mode, f"{t * 1000:.0f} ms", f"{(t - floor) * 1000:+.0f} ms", f"{payload / MiB:.0f} MiB",
                 f"{payload / MiB:.0f} MiB" if payload else "0")  # 2(N-1)/N = 1 at N = 2
                for mode, (t, payload) in results.items()]
        print(f"small preset: {count / 1e6:.1f} M parameters, fp32 gradients {count * 4 / MiB:.0f} MiB")
        print_table(("mode", "step (median, slower rank)", "over no sync", "payload / step",
                     "ring bytes sent per process"), rows)
    print(f"model: {opts.gpus} GPUs, {opts.params_b:g} B parameters, bf16 gradients; forward {opts.forward_s:g} s, "
          f"backward {opts.backward_s:g} s per micro-batch (assumed)")
    print_table(("interconnect (bus bandwidth)", "ring bytes per GPU", "all-reduce", "step, after backward",
                 "step, overlapped", "exposed comm", "comm share without overlap"), h100_model(opts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
