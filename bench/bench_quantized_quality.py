"""Output error and bytes of one real-width FLUX.1 block under each base storage, against bf16 (issue 18).

    python bench/bench_quantized_quality.py [--tokens 256] [--text_tokens 64] [--init default|trained-scale]

One double and one single block of FLUX.1-dev's width (3072, 24 heads, MLP 12288) with random weights run forward
on the CPU in bf16 on the same inputs, once with bf16 weights (the reference) and once with the block Linears stored
as fp8 (--fp8_base), nf4 or int8 (library/memory/quantized_linear.py, bitsandbytes' quantization). Reported per
storage: rel-L2 = ||out - out_bf16|| / ||out_bf16|| of the block's outputs (for the double block, image and text
streams together), the same error relative to the block's update ||out_bf16 - in|| (the residual stream carries the
input through, which the first number includes), the block's bytes and the bytes saved against bf16. The weights
are random (PyTorch's default Linear initialisation, or `--init trained-scale`: normal with std 0.02 and one
20x outlier per row, closer to trained weights), so the numbers describe the storage formats, not FLUX.1-dev's own
weights.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from machine import cpu_model  # noqa: E402

STORAGES = ("bf16", "fp8", "nf4", "int8")


def make_block(kind: str, init: str) -> torch.nn.Module:
    from library.models.transformer import DoubleStreamBlock, SingleStreamBlock

    torch.manual_seed(0)
    block = DoubleStreamBlock(3072, 24, 12288, True) if kind == "double" else SingleStreamBlock(3072, 24, 12288)
    if init == "trained-scale":
        g = torch.Generator().manual_seed(1)
        for m in block.modules():
            if isinstance(m, torch.nn.Linear):
                w = torch.randn(m.weight.shape, generator=g) * 0.02
                rows = torch.arange(w.shape[0])
                w[rows, torch.randint(0, w.shape[1], (w.shape[0],), generator=g)] *= 20  # one outlier per row
                m.weight.data = w
    return block.to(torch.bfloat16).requires_grad_(False)


def stored_as(block: torch.nn.Module, storage: str) -> torch.nn.Module:
    import copy

    from library.memory.fp8 import prepare_fp8
    from library.memory.quantized_base import quantize_linears

    block = copy.deepcopy(block)
    if storage == "fp8":
        prepare_fp8(block, torch.float8_e4m3fn, torch.bfloat16)
    elif storage != "bf16":
        quantize_linears(block, storage, torch.bfloat16)
    return block


def inputs(kind: str, n_img: int, n_txt: int):
    from library.models.flux_math import position_embedding

    g = torch.Generator().manual_seed(0)
    img = torch.randn(1, n_img, 3072, generator=g).bfloat16()
    txt = torch.randn(1, n_txt, 3072, generator=g).bfloat16()
    vec = torch.randn(1, 3072, generator=g).bfloat16()
    side = int(n_img**0.5)
    ids = torch.zeros(n_txt + n_img, 3)
    ids[n_txt:, 1] = torch.arange(n_img) // side
    ids[n_txt:, 2] = torch.arange(n_img) % side
    pe = position_embedding(ids[None], (16, 56, 56), 10_000)
    return (img, txt, vec, pe) if kind == "double" else (torch.cat((txt, img), 1), vec, pe)


def flat(out) -> torch.Tensor:
    return torch.cat([o.float().reshape(-1) for o in (out if isinstance(out, tuple) else (out,))])


def block_bytes(block: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*block.parameters(), *block.buffers()])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=256, help="image tokens (256 = 256x256)")
    p.add_argument("--text_tokens", type=int, default=64)
    p.add_argument("--init", choices=["default", "trained-scale"], default="default")
    a = p.parse_args(argv)
    print(f"machine: {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{a.tokens} image + {a.text_tokens} text tokens, bf16 compute, init {a.init}")
    print("\n| block | storage | rel-L2 of the output | rel-L2 of the update | block MiB | saved vs bf16 "
          "| quantize s |")
    print("|---|---|---|---|---|---|---|")
    for kind in ("double", "single"):
        block = make_block(kind, a.init)
        args = inputs(kind, a.tokens, a.text_tokens)
        with torch.no_grad():
            ref = flat(block(*args))
        # the block's update (output - input): the residual stream passes the input through, so the output's
        # error alone understates how much the block's own contribution changed
        update = ref - flat(args[:2] if kind == "double" else args[:1])
        base = block_bytes(block)
        for storage in STORAGES:
            t0 = time.perf_counter()
            stored = stored_as(block, storage)
            took = time.perf_counter() - t0
            with torch.no_grad():
                out = flat(stored(*args))
            rel, rel_update = ((out - ref).norm() / ref.norm()).item(), ((out - ref).norm() / update.norm()).item()
            size = block_bytes(stored)
            print(f"| {kind} | {storage} | {rel:.4f} | {rel_update:.4f} | {size / 2**20:.1f} | {1 - size / base:.1%} "
                  f"| {took:.1f} |", flush=True)
            del stored
    return 0


if __name__ == "__main__":
    sys.exit(main())
