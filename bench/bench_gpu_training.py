#!/usr/bin/env python
"""GPU benchmark of block swapping and fp8: LoRA training step time and peak memory, and inference time per image.

    python bench/bench_gpu_training.py [--blocks 0,8,18,28,35] [--json results.json]
    python bench/bench_gpu_training.py --bytes     # no GPU needed: GPU-resident and moved bytes per setting

The real FLUX.1-dev architecture (19 double + 38 single blocks, hidden 3072) with random weights made on the GPU
(nothing is downloaded; speed and memory do not depend on the values). For each --blocks_to_swap N and for bf16 and
fp8 (float8_e4m3fn storage, bf16 compute) base weights:

* training: LoRA rank 16 (alpha 16) on every transformer Linear, AdamW, batch 1 at 1024x1024 (4096 image tokens),
  512 T5 tokens (cached text-encoder outputs: random tensors of the right shapes), gradient checkpointing, bf16
  autocast; seconds per step (median of --steps after --warmup) and the peak of torch.cuda.max_memory_allocated
  over those steps (the weights, swap slots, LoRA and optimizer states included; the CUDA context is not);
* inference: the transformer's 28 Euler steps at 1024x1024 under no_grad (the text encoders and the autoencoder,
  which run once per image, are left out), seconds per image.

Swapped blocks live in pinned host memory (up to the whole model: 24 GB in bf16, 12 GB in fp8). Without CUDA the
script exits with status 2 and a message. Results go to stdout as a Markdown table (and to --json).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from library.memory.block_swap import enable_flux_block_swap  # noqa: E402
from library.memory.checkpointing import enable_gradient_checkpointing  # noqa: E402


def build(fp8: bool, blocks_to_swap: int, write_back: bool = False):
    from library.models.transformer import FLUX_PRESETS, Flux

    with torch.device("meta"):
        model = Flux(FLUX_PRESETS["dev"])
    model = model.to(dtype=torch.bfloat16).to_empty(device="cuda")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)  # random, small: keeps activations finite through 57 blocks
    if fp8:
        from library.memory.fp8 import prepare_fp8

        prepare_fp8(model, torch.float8_e4m3fn, torch.bfloat16)
    model.requires_grad_(False)
    if blocks_to_swap:
        enable_flux_block_swap(model, blocks_to_swap, "cuda", "cpu", host_to_device_only=not write_back)
    return model


def inputs(seed: int = 0, batch: int = 1, size: int = 1024, txt_len: int = 512):
    from library.models.packing import prepare_img_ids

    g = torch.Generator("cuda").manual_seed(seed)
    h = w = size // 16
    bf = dict(device="cuda", dtype=torch.bfloat16)
    return dict(img=torch.randn(batch, h * w, 64, generator=g, **bf), img_ids=prepare_img_ids(batch, h, w).to(**bf),
                txt=torch.randn(batch, txt_len, 4096, generator=g, **bf), txt_ids=torch.zeros(batch, txt_len, 3, **bf),
                timesteps=torch.rand(batch, generator=g, **bf), y=torch.randn(batch, 768, generator=g, **bf),
                guidance=torch.full((batch,), 3.5, **bf))


def train(model, steps: int, warmup: int) -> tuple[float, int]:
    from networks import lora_flux

    network = lora_flux.create_network(1.0, 16, 16.0, None, [None, None], model)
    network.apply_to([None, None], model, apply_text_encoder=False, apply_unet=True)
    network.to("cuda")
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    enable_gradient_checkpointing(model)
    model.train()
    times = []
    for step in range(warmup + steps):
        if step == warmup:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        x = inputs(step)
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**x).float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated()
    network.restore()  # inference below runs the base model alone
    return statistics.median(times[warmup:]), peak


@torch.no_grad()
def infer(model, steps: int = 28) -> float:
    from library.flow.sampling import get_schedule

    model.eval()
    x = inputs(1)
    timesteps = get_schedule(steps, x["img"].shape[1], shift=True)
    img = x.pop("img")
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for t_curr, t_prev in zip(timesteps[:-1], timesteps[1:]):
            pred = model(img=img, timesteps=torch.full((1,), t_curr, device="cuda", dtype=torch.bfloat16),
                         **{k: v for k, v in x.items() if k != "timesteps"})
            img = img + (t_prev - t_curr) * pred
    torch.cuda.synchronize()
    return time.perf_counter() - start


def print_bytes(blocks: list[int]) -> int:
    """Block weights on the GPU and bytes moved per LoRA training step (forward + backward) for each setting."""
    from library.models.transformer import FLUX_PRESETS, Flux
    from library.memory.fp8 import prepare_fp8

    print("| blocks_to_swap | base | block weights on GPU GiB | of which swap slots GiB | host-to-device GiB/step "
          "| sd-scripts' swap (both directions) GiB/step |")
    print("|---|---|---|---|---|---|")
    for fp8 in (False, True):
        for n in blocks:
            with torch.device("meta"):
                model = Flux(FLUX_PRESETS["dev"]).to(torch.bfloat16)
            if fp8:
                prepare_fp8(model, torch.float8_e4m3fn, torch.bfloat16)
            swappers = enable_flux_block_swap(model, n, "meta", "meta") if n else []
            if n:
                on_gpu = sum(s.buffer_bytes + s.resident_bytes for s in swappers)
                slots = sum(s.buffer_bytes for s in swappers)
                moved = sum(2 * s.schedule.num_swapped * s.block_bytes for s in swappers)
            else:
                on_gpu = sum(p.numel() * p.element_size() for b in (*model.double_blocks, *model.single_blocks)
                             for p in b.parameters())
                slots = moved = 0
            g = 2**30
            print(f"| {n} | {'fp8' if fp8 else 'bf16'} | {on_gpu / g:.2f} | {slots / g:.2f} | {moved / g:.2f} | "
                  f"{2 * moved / g:.2f} |")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", default="0,8,18,28,35", help="comma-separated --blocks_to_swap values")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per setting (default: 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps first (default: 2)")
    p.add_argument("--no-inference", action="store_true", help="skip the 28-step inference timing")
    p.add_argument("--write-back", action="store_true",
                   help="also time bf16 LoRA steps with write-back swapping (every evicted block copied back, as "
                        "sd-scripts does): what host-to-device-only saves")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--bytes", action="store_true",
                   help="no GPU needed: print the bytes each setting keeps on the GPU and moves per step, from the "
                        "real swappers on meta tensors")
    args = p.parse_args(argv)
    if args.bytes:
        return print_bytes([int(v) for v in args.blocks.split(",")])
    if not torch.cuda.is_available():
        print("bench_gpu_training.py needs a CUDA GPU; none is available here (see docs/benchmarks.md)",
              file=sys.stderr)
        return 2
    results = []
    device = torch.cuda.get_device_name()
    print(f"device: {device}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    print("| blocks_to_swap | base | s/step (LoRA r16, 1024², ckpt) | peak GiB | inference s/image (28 steps) |")
    print("|---|---|---|---|---|")
    blocks = [int(v) for v in args.blocks.split(",")]
    settings = [(fp8, n, False) for fp8 in (False, True) for n in blocks]
    settings += [(False, n, True) for n in blocks if n and args.write_back]
    for fp8, n, write_back in settings:
        model = build(fp8, n, write_back)
        gc.collect()
        torch.cuda.empty_cache()
        step_s, peak = train(model, args.steps, args.warmup)
        infer_s = None if (args.no_inference or write_back) else infer(model)
        base = ("fp8" if fp8 else "bf16") + (", write-back" if write_back else "")
        row = {"blocks_to_swap": n, "base": base, "seconds_per_step": step_s,
               "peak_bytes": peak, "inference_seconds_per_image": infer_s, "device": device,
               "torch": torch.__version__}
        results.append(row)
        print(f"| {n} | {row['base']} | {step_s:.2f} | {peak / 2**30:.2f} | "
              f"{'-' if infer_s is None else f'{infer_s:.1f}'} |", flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
