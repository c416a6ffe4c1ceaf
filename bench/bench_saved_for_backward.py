"""Bytes one real-size FLUX.1 block keeps for backward at 1024x1024, ours beside diffusers' (issue 19).

    python bench/bench_saved_for_backward.py [--tokens 4096] [--text_tokens 512] [--dtype bf16] [--fp8] [--by_op]

One double and one single block of FLUX.1-dev's width (3072, 24 heads, MLP 12288) run forward on the CPU with
real data under `torch.autograd.graph.saved_tensors_hooks`; the bytes of the distinct storages autograd saves are
summed, leaving out the block's own parameters (a saved weight is a reference, not new memory) and the block's
inputs (the caller keeps those anyway). Two modes, as in the issue: every parameter trains ("all parameters"), or
nothing does and only the inputs need gradients ("inputs only", what a frozen base under a LoRA keeps without the
LoRA's own tensors). diffusers' FluxTransformerBlock / FluxSingleTransformerBlock get the same inputs. `--fp8`
stores our block's Linear weights in fp8 (--fp8_base), where an upcast weight copy kept for backward would count.
`--by_op` prints which op saved what (the largest first).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from library.planner.live_bytes import SavedBytes  # noqa: E402
from machine import cpu_model  # noqa: E402

MIB = 2**20


def _inputs(n_img: int, n_txt: int, dtype, trains_inputs=True):
    g = torch.Generator().manual_seed(0)
    img = torch.randn(1, n_img, 3072, generator=g).to(dtype).requires_grad_(trains_inputs)
    txt = torch.randn(1, n_txt, 3072, generator=g).to(dtype).requires_grad_(trains_inputs)
    vec = torch.randn(1, 3072, generator=g).to(dtype).requires_grad_(trains_inputs)
    return img, txt, vec


def _ids(n_img: int, n_txt: int) -> torch.Tensor:
    side = int(n_img**0.5)
    img_ids = torch.zeros(side, n_img // side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(n_img // side)[None, :]
    return torch.cat((torch.zeros(n_txt, 3), img_ids.reshape(-1, 3)))


def ours(kind: str, n_img: int, n_txt: int, dtype, train_params: bool, fp8: bool):
    from library.memory.fp8 import prepare_fp8
    from library.models.flux_math import position_embedding
    from library.models.transformer import DoubleStreamBlock, SingleStreamBlock

    block = (DoubleStreamBlock(3072, 24, 12288, True) if kind == "double" else SingleStreamBlock(3072, 24, 12288))
    block = block.to(dtype)
    if fp8:
        prepare_fp8(block, torch.float8_e4m3fn, dtype)
    block.requires_grad_(train_params)
    img, txt, vec = _inputs(n_img, n_txt, dtype)
    pe = position_embedding(_ids(n_img, n_txt)[None], (16, 56, 56), 10_000)
    args = (img, txt, vec, pe) if kind == "double" else (torch.cat((txt, img), 1).detach().requires_grad_(), vec, pe)
    with SavedBytes([*block.parameters(), *args]) as saved:
        out = block(*args)
    saved.attribute(out if isinstance(out, tuple) else (out,))
    return saved


def diffusers_block(kind: str, n_img: int, n_txt: int, dtype, train_params: bool):
    from diffusers.models.embeddings import FluxPosEmbed
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    if kind == "double":
        block = FluxTransformerBlock(dim=3072, num_attention_heads=24, attention_head_dim=128)
    else:
        block = FluxSingleTransformerBlock(dim=3072, num_attention_heads=24, attention_head_dim=128)
    block = block.to(dtype).requires_grad_(train_params)
    img, txt, vec = _inputs(n_img, n_txt, dtype)
    rotary = FluxPosEmbed(theta=10_000, axes_dim=[16, 56, 56])(_ids(n_img, n_txt))
    with SavedBytes([*block.parameters(), img, txt, vec, *rotary]) as saved:
        out = block(hidden_states=img, encoder_hidden_states=txt, temb=vec, image_rotary_emb=rotary)
    saved.attribute(out if isinstance(out, tuple) else (out,))
    return saved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096, help="image tokens (4096 = 1024x1024)")
    p.add_argument("--text_tokens", type=int, default=512)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--fp8", action="store_true", help="our blocks with fp8-stored Linear weights")
    p.add_argument("--by_op", action="store_true", help="print the saved bytes by autograd op")
    p.add_argument("--no_diffusers", action="store_true")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    torch.manual_seed(0)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    rows = []
    modes = (("all parameters", True), ("inputs only", False))
    for mode, train_params in modes[1:] if a.fp8 else modes:  # fp8 weights are frozen weights
        row = {"mode": mode}
        for kind in ("double", "single"):
            started = time.perf_counter()
            s = ours(kind, a.tokens, a.text_tokens, dtype, train_params, a.fp8)
            row[f"ours_{kind}_mib"] = round(s.total / MIB, 1)
            if a.by_op:
                print(f"ours {kind} {mode}: " + "\n  ".join(f"{k} {v / MIB:.1f}" for k, v in s.by_op()))
            if not a.no_diffusers:
                d = diffusers_block(kind, a.tokens, a.text_tokens, dtype, train_params)
                row[f"diffusers_{kind}_mib"] = round(d.total / MIB, 1)
                if a.by_op:
                    print(f"diffusers {kind} {mode}: " + "\n  ".join(f"{k} {v / MIB:.1f}" for k, v in d.by_op()))
            row[f"{kind}_seconds"] = round(time.perf_counter() - started, 1)
        row["ours_mib"] = round(row["ours_double_mib"] + row["ours_single_mib"], 1)
        if not a.no_diffusers:
            row["diffusers_mib"] = round(row["diffusers_double_mib"] + row["diffusers_single_mib"], 1)
        rows.append(row)
    meta = {"cpu": cpu_model(), "torch": torch.__version__, "tokens": a.tokens, "text_tokens": a.text_tokens,
            "dtype": a.dtype, "fp8": a.fp8}
    if a.json:
        print(json.dumps({"machine": meta, "rows": rows}))
        return
    print(meta)
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
