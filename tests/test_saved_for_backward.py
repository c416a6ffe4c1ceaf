"""What our blocks keep for backward (issue 19): no more than diffusers' blocks, and no upcast copies of fp8 weights.

bench/bench_saved_for_backward.py measures the same at FLUX.1-dev's width (docs/benchmarks.md); here the width is
small (head size 128 as in FLUX, 2 heads) so that the test takes a second.
"""

import pytest
import torch
import torch.nn.functional as F

from library.memory.fp8 import Fp8Linear, prepare_fp8
from library.models.flux_math import position_embedding
from library.models.transformer import DoubleStreamBlock, SingleStreamBlock
from library.planner.live_bytes import SavedBytes

DIM, HEADS, MLP, N_IMG, N_TXT = 256, 2, 1024, 64, 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _inputs(dtype):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*shape, generator=g).to(dtype).requires_grad_()
            for shape in ((1, N_IMG, DIM), (1, N_TXT, DIM), (1, DIM))]


def _ids():
    ids = torch.zeros(N_TXT + N_IMG, 3)
    ids[N_TXT:, 1] = torch.arange(N_IMG) // 8
    ids[N_TXT:, 2] = torch.arange(N_IMG) % 8
    return ids


def ours(kind, dtype, train_params, fp8=False):
    torch.manual_seed(0)
    block = DoubleStreamBlock(DIM, HEADS, MLP, True) if kind == "double" else SingleStreamBlock(DIM, HEADS, MLP)
    block = block.to(dtype)
    if fp8:
        prepare_fp8(block, torch.float8_e4m3fn, dtype)
    block.requires_grad_(train_params)
    img, txt, vec = _inputs(dtype)
    pe = position_embedding(_ids()[None], (16, 56, 56), 10_000)
    args = (img, txt, vec, pe) if kind == "double" else (torch.cat((txt, img), 1).detach().requires_grad_(), vec, pe)
    with SavedBytes([*block.parameters(), *args]) as saved:
        out = block(*args)
    saved.attribute(out if isinstance(out, tuple) else (out,))
    return saved, block, args, out


def theirs(kind, dtype, train_params):
    from diffusers.models.transformers.transformer_flux import (FluxPosEmbed, FluxSingleTransformerBlock,
                                                                FluxTransformerBlock)

    cls = FluxTransformerBlock if kind == "double" else FluxSingleTransformerBlock
    block = cls(dim=DIM, num_attention_heads=HEADS, attention_head_dim=DIM // HEADS).to(dtype)
    block.requires_grad_(train_params)
    img, txt, vec = _inputs(dtype)
    rotary = FluxPosEmbed(theta=10_000, axes_dim=[16, 56, 56])(_ids())
    with SavedBytes([*block.parameters(), img, txt, vec, *rotary]) as saved:
        block(hidden_states=img, encoder_hidden_states=txt, temb=vec, image_rotary_emb=rotary)
    return saved


@pytest.mark.parametrize("train_params", [True, False], ids=["all-parameters", "inputs-only"])
@pytest.mark.parametrize("kind", ["double", "single"])
def test_our_blocks_keep_no_more_than_diffusers(kind, train_params):
    """In bf16, the dtype of training on a GPU (in fp32 our QK norm keeps q and k as views of the fused qkv output,
    whose v part diffusers, with separate projections, does not keep: 1/3 of a stream's qkv more)."""
    pytest.importorskip("diffusers")
    mine, _, _, _ = ours(kind, torch.bfloat16, train_params)
    assert mine.total <= theirs(kind, torch.bfloat16, train_params).total


def test_qk_norm_keeps_one_fp32_copy():
    """RMSNorm's fp32 copy of q and of k is kept once, for both the square and the product (it was kept twice)."""
    saved, *_ = ours("double", torch.bfloat16, False)
    fp32_image_qk = [op for op, n in saved.by_op() if n == N_IMG * DIM * 4]
    assert len(fp32_image_qk) == 2, fp32_image_qk


def test_single_block_keeps_linear1_output_only_where_it_needs_all_of_it():
    linear1_out = (N_IMG + N_TXT) * (3 * DIM + MLP)
    saved, *_ = ours("single", torch.bfloat16, False)
    assert max(n for _, n in saved.by_op()) < linear1_out * 2  # bf16: v and the MLP input kept as their own copies
    saved, *_ = ours("single", torch.float32, False)
    # fp32: q and k (viewed by the norm), v and the MLP input are all of linear1's output: kept once, no copies
    assert sorted(n for _, n in saved.by_op())[-1] == linear1_out * 4
    assert not [op for op, n in saved.by_op() if n == (N_IMG + N_TXT) * MLP * 4]


def test_frozen_fp8_linear_keeps_the_fp8_weight_not_an_upcast_copy():
    layer = Fp8Linear(DIM, 3 * DIM)
    layer.weight.data = layer.weight.data.to(torch.float8_e4m3fn)
    layer.requires_grad_(False)
    layer.compute_dtype = torch.bfloat16
    x = torch.randn(1, 40, DIM, dtype=torch.bfloat16, requires_grad=True)
    with SavedBytes([x, *layer.parameters()]) as saved:
        out = layer(x)
    assert saved.total == 0  # only the fp8 weight (a parameter) is kept
    grad = torch.randn_like(out)
    out.backward(grad)
    # the same input gradient as F.linear on the upcast weight, bit for bit
    x2 = x.detach().clone().requires_grad_()
    F.linear(x2, layer.weight.to(torch.bfloat16), layer.bias.to(torch.bfloat16)).backward(grad)
    assert torch.equal(x.grad, x2.grad)


def test_fp8_block_keeps_what_the_bf16_block_keeps():
    """With fp8 weights a block keeps for backward exactly what it keeps with bf16 weights (frozen in both)."""
    fp8, *_ = ours("double", torch.bfloat16, False, fp8=True)
    bf16, *_ = ours("double", torch.bfloat16, False)
    assert fp8.total == bf16.total
