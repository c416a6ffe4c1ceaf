"""Output error of one real-width FLUX.1 block under each fp8 and GGUF storage, beside the bytes each saves (issue 18).

    python bench/bench_fp8_quality.py [--tokens 256] [--text_tokens 64] [--json]

One double and one single block of FLUX.1-dev's width (3072, 24 heads, MLP 12288), random bf16 weights (PyTorch's
default initialisation; trained weights have more outliers, which favours the scaled formats further), run forward
on the CPU in bf16; then the same blocks with their Linear weights stored as plain float8_e4m3fn (a cast, what
`--fp8_base` does to a bf16 file), fp8_scaled per tensor and fp8_scaled per output channel, each computed in bf16 with
the weight dequantised; and GGUF Q8_0 / Q5_0 / Q4_0, quantized by the gguf package (the types it can write), and
Q6_K / Q5_K / Q4_K by tools/gguf_kquants.py (min/max scales, no search: more error than llama.cpp's quantizer), all
dequantized by ours (bench/bench_quantized_quality.py covers bitsandbytes' nf4 and int8). Reported: the output's
rel-L2 error ||out - out_bf16|| / ||out_bf16|| per block and format,
and the bytes per parameter of FLUX.1-dev's whole transformer stored that way (non-Linear tensors in bf16).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from library.formats import fp8_scaled  # noqa: E402
from machine import cpu_model  # noqa: E402

FORMATS = ("fp8", "fp8_scaled tensor", "fp8_scaled channel", "gguf Q8_0", "gguf Q5_0", "gguf Q4_0", "gguf Q6_K",
           "gguf Q5_K", "gguf Q4_K")
K_QUANTS = ("Q6_K", "Q5_K", "Q4_K")  # encoded by tools/gguf_kquants.py: min/max scales, an upper bound on the error


def _ids(n_img: int, n_txt: int) -> torch.Tensor:
    side = max(1, int(n_img**0.5))
    img = torch.zeros(n_img, 3)
    img[:, 1] = torch.arange(n_img) // side
    img[:, 2] = torch.arange(n_img) % side
    return torch.cat((torch.zeros(n_txt, 3), img))[None]


def _block(kind: str):
    from library.models.transformer import DoubleStreamBlock, SingleStreamBlock

    block = DoubleStreamBlock(3072, 24, 12288, True) if kind == "double" else SingleStreamBlock(3072, 24, 12288)
    return block.to(torch.bfloat16).requires_grad_(False)


def _stored(block, fmt: str) -> None:
    from library.memory.fp8 import prepare_fp8, prepare_fp8_scaled

    if fmt == "fp8":
        prepare_fp8(block, torch.float8_e4m3fn, torch.bfloat16)
    elif fmt.startswith("gguf"):
        _gguf_round_trip(block, fmt.split()[1])
    else:
        prepare_fp8_scaled(block, fmt.split()[1], torch.bfloat16)


def _gguf_round_trip(block, qtype: str) -> None:
    """Each Linear weight quantized by the gguf package (the types it can write; the K-quants come from llama.cpp's
    own quantizer, not run here) and dequantized by ours, which tests/test_gguf.py shows equal to gguf's."""
    import gguf

    from library.formats.gguf_quants import dequantize

    from tools.gguf_kquants import quantize_k

    for m in block.modules():
        if isinstance(m, torch.nn.Linear):
            w = m.weight.float().numpy()
            raw = (quantize_k(m.weight.float(), qtype) if qtype in K_QUANTS
                   else torch.from_numpy(gguf.quants.quantize(w, gguf.GGMLQuantizationType[qtype])))
            m.weight = torch.nn.Parameter(dequantize(raw, qtype, w.shape).to(torch.bfloat16), requires_grad=False)


def block_errors(kind: str, n_img: int, n_txt: int) -> dict[str, float]:
    from library.models.flux_math import position_embedding

    g = torch.Generator().manual_seed(0)
    img, txt = (torch.randn(1, n, 3072, generator=g).to(torch.bfloat16) for n in (n_img, n_txt))
    vec = torch.randn(1, 3072, generator=g).to(torch.bfloat16)
    pe = position_embedding(_ids(n_img, n_txt), (16, 56, 56), 10_000)
    args = (img, txt, vec, pe) if kind == "double" else (torch.cat((txt, img), 1), vec, pe)

    def run(block):
        out = block(*args)
        return torch.cat(out, 1).float() if isinstance(out, tuple) else out.float()

    torch.manual_seed(0)
    weights = _block(kind).state_dict()
    with torch.device("meta"):
        block = _block(kind)
    block.load_state_dict(weights, assign=True)
    reference = run(block)
    errors = {}
    for fmt in FORMATS:
        block.load_state_dict(weights, assign=True)  # the bf16 weights again (storing rebinds, never writes them)
        for m in block.modules():
            m._buffers.pop(fp8_scaled.SCALE, None)
        _stored(block, fmt)
        errors[fmt] = float((run(block) - reference).norm() / reference.norm())
    return errors


def bytes_per_param() -> dict[str, float]:
    """Bytes per parameter of FLUX.1-dev's transformer: Linear weights in each format, everything else bf16."""
    from library.models.transformer import FLUX_PRESETS, Flux

    with torch.device("meta"):
        sd = Flux(FLUX_PRESETS["dev"]).state_dict()
    total = sum(t.numel() for t in sd.values())
    linear = {k: t.shape for k, t in sd.items() if fp8_scaled.is_quantizable(k, tuple(t.shape), torch.bfloat16)}
    n_linear = sum(s.numel() for s in linear.values())
    other = 2 * (total - n_linear)
    from library.formats.gguf_quants import GGUF_BYTES_PER_PARAM

    sizes = {"bf16": 2 * total, "fp8": n_linear + other,
             "fp8_scaled tensor": n_linear + other + 4 * len(linear) + 2,
             "fp8_scaled channel": n_linear + other + 4 * sum(s[0] for s in linear.values()) + 2,
             # GGUF conversions keep the non-block tensors in F32/F16; counted in bf16 here like the others
             **{f"gguf {t}": int(n_linear * GGUF_BYTES_PER_PARAM[t]) + other
                for t in ("Q8_0", "Q5_0", "Q4_0", *K_QUANTS)}}
    return {"params": total, "linear_params": n_linear,
            **{f: {"bytes": b, "bytes_per_param": round(b / total, 4)} for f, b in sizes.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=256, help="image tokens")
    p.add_argument("--text_tokens", type=int, default=64)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()
    errors = {kind: block_errors(kind, a.tokens, a.text_tokens) for kind in ("double", "single")}
    result = {"machine": {"cpu": cpu_model(), "torch": torch.__version__, "tokens": a.tokens,
                          "text_tokens": a.text_tokens, "seconds": round(time.perf_counter() - started, 1)},
              "rel_l2": errors, "flux1_dev": bytes_per_param()}
    if a.json:
        print(json.dumps(result))
        return
    print(result["machine"])
    sizes = result["flux1_dev"]
    print("| format | bytes/param | FLUX.1-dev transformer (GiB) | rel-L2 double | rel-L2 single |")
    print("|---|---|---|---|---|")
    print(f"| bf16 | 2 | {sizes['bf16']['bytes'] / 2**30:.2f} | 0 | 0 |")
    for fmt in FORMATS:
        print(f"| {fmt} | {sizes[fmt]['bytes_per_param']} | {sizes[fmt]['bytes'] / 2**30:.2f} | "
              f"{errors['double'][fmt]:.4f} | {errors['single'][fmt]:.4f} |")


if __name__ == "__main__":
    main()
