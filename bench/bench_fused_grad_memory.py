"""Peak bytes of live gradients (.grad tensors) during one backward pass of full fine-tuning, at real FLUX.1 sizes.

    python bench/bench_fused_grad_memory.py [--preset dev] [--dtype bf16]

The transformer is built on the `meta` device (shapes without data), so this runs anywhere in seconds: gradients
are counted by hooks registered before the fused optimizers' hooks (tests/test_fused_optimizers.py checks the same
numbers on a small preset with real tensors). Plain training holds every gradient at the end of backward;
--blockwise_fused_optimizers one block's; --fused_backward_pass one tensor's. Optimizer state and activations are
not counted (see tools/plan_memory.py for whole-step numbers).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from library.formats.dtypes import str_to_dtype  # noqa: E402
from library.models.transformer import FLUX_PRESETS, Flux  # noqa: E402
from library.training.fused_optimizers import BlockwiseOptimizers, FusedBackward, HookSettings, group_by_block  # noqa: E402
from library.planner.live_bytes import track_live_gradient_peak  # noqa: E402


class _NoStep(torch.optim.Optimizer):
    """Counts nothing and changes nothing: the bytes of gradients do not depend on the update rule."""

    def __init__(self, params):
        super().__init__(params, {})

    def step(self, closure=None):
        return None


def peak_live_gradients(preset: str, dtype: torch.dtype, mode: str) -> int:
    with torch.device("meta"):
        model = Flux(FLUX_PRESETS[preset]).to(dtype)
    model.requires_grad_(True)
    params = list(model.parameters())
    peak = track_live_gradient_peak(params)
    if mode == "fused_backward_pass":
        FusedBackward(_NoStep(params), params, HookSettings())
    elif mode == "blockwise_fused_optimizers":
        blocks = [ps for _, ps in group_by_block(model.named_parameters())]
        BlockwiseOptimizers([_NoStep(ps) for ps in blocks], blocks, HookSettings())
    p = model.params
    meta = dict(device="meta", dtype=dtype)
    out = model(img=torch.randn(1, 64, p.in_channels, **meta), img_ids=torch.zeros(1, 64, 3, **meta),
                txt=torch.randn(1, 16, p.context_in_dim, **meta), txt_ids=torch.zeros(1, 16, 3, **meta),
                timesteps=torch.ones(1, **meta), y=torch.randn(1, p.vec_in_dim, **meta),
                guidance=torch.ones(1, **meta) if p.guidance_embed else None)
    out.float().square().mean().backward()
    return peak()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="dev", choices=sorted(FLUX_PRESETS))
    parser.add_argument("--dtype", default="bf16", help="dtype of the trained weights (and so of their gradients)")
    args = parser.parse_args(argv)
    dtype = str_to_dtype(args.dtype)
    print(f"torch {torch.__version__}, FLUX.1 preset {args.preset}, weights {dtype}, meta device")
    print("| mode | peak live gradients |")
    print("|---|---|")
    for mode in ("plain", "blockwise_fused_optimizers", "fused_backward_pass"):
        print(f"| {mode} | {peak_live_gradients(args.preset, dtype, mode) / 2**30:.3f} GiB |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
