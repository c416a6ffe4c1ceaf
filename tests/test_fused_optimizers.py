"""Optimizer steps inside backward: same updates as a plain step, and only one parameter's (fused backward) or one
block's (blockwise) gradients alive at any time; the streaming model writer."""

import json
import struct
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers.optimization import Adafactor

from library.models.transformer import FLUX_PRESETS, Flux
from library.training.fused_optimizers import (BlockwiseOptimizers, FusedBackward, HookSettings, block_key,
                                               group_by_block, step_param, stochastic_round_)
from library.planner.live_bytes import track_live_gradient_peak
from library.formats.model_saving import save_model

# a small preset: more blocks than the tiny one, so "one block" and "the whole model" are far apart
SMALL = replace(FLUX_PRESETS["tiny"], depth=3, depth_single_blocks=6)


def inputs(params, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(img=r(1, 16, params.in_channels), img_ids=torch.zeros(1, 16, 3), txt=r(1, 8, params.context_in_dim),
                txt_ids=torch.zeros(1, 8, 3), timesteps=torch.tensor([0.5]), y=r(1, params.vec_in_dim),
                guidance=torch.tensor([3.5]))


def loss_of(model, seed=0):
    return model(**inputs(model.params, seed)).square().mean()


def twin_models():
    torch.manual_seed(0)
    a = Flux(FLUX_PRESETS["tiny"])
    b = Flux(FLUX_PRESETS["tiny"])
    b.load_state_dict(a.state_dict())
    return a, b


def assert_same_weights(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def test_block_grouping():
    assert block_key("double_blocks.12.img_attn.qkv.weight") == ("double", 12)
    assert block_key("single_blocks.3.linear1.bias") == ("single", 3)
    assert block_key("img_in.weight") == ("img_in", -1)
    assert block_key("final_layer.linear.weight") == ("final_layer", -1)
    groups = group_by_block(Flux(SMALL).named_parameters())
    assert [k for k, _ in groups] == [(m, -1) for m in ("img_in", "time_in", "vector_in", "guidance_in", "txt_in")] + \
        [("double", i) for i in range(3)] + [("single", i) for i in range(6)] + [("final_layer", -1)]


def test_fused_backward_gives_exactly_the_plain_adafactor_update():
    plain, fused = twin_models()
    opt_plain = Adafactor(plain.parameters(), lr=1e-3, relative_step=False, scale_parameter=False)
    opt_fused = Adafactor(fused.parameters(), lr=1e-3, relative_step=False, scale_parameter=False)
    FusedBackward(opt_fused, list(fused.parameters()), HookSettings())
    for step in range(2):
        loss_of(plain, step).backward()
        opt_plain.step()
        opt_plain.zero_grad(set_to_none=True)
        loss_of(fused, step).backward()
        assert all(p.grad is None for p in fused.parameters())  # stepped and freed inside backward
    assert_same_weights(plain, fused)
    assert not torch.equal(plain.img_in.weight, twin_models()[0].img_in.weight)


def test_blockwise_optimizers_give_exactly_the_plain_adamw_update():
    plain, blockwise = twin_models()
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=1e-3)
    blocks = [params for _, params in group_by_block(blockwise.named_parameters())]
    fused = BlockwiseOptimizers([torch.optim.AdamW(ps, lr=1e-3) for ps in blocks], blocks, HookSettings())
    for step in range(2):
        loss_of(plain, step).backward()
        opt_plain.step()
        opt_plain.zero_grad(set_to_none=True)
        loss_of(blockwise, step).backward()
        assert all(p.grad is None for p in blockwise.parameters())
        fused.step()  # what the training loop calls: nothing left to do
        fused.zero_grad()
    assert_same_weights(plain, blockwise)


def test_blockwise_steps_blocks_left_without_gradients_when_the_loop_steps():
    model = Flux(SMALL)
    blocks = [params for _, params in group_by_block(model.named_parameters())]
    fused = BlockwiseOptimizers([torch.optim.SGD(ps, lr=0.1) for ps in blocks], blocks, HookSettings())
    model.double_blocks[0].img_mod.lin.bias.requires_grad_(False)  # double block 0 never completes in backward
    weight = model.double_blocks[0].img_attn.qkv.weight
    before = weight.detach().clone()
    loss_of(model).backward()
    assert weight.grad is not None and torch.equal(weight, before)
    assert model.double_blocks[1].img_attn.qkv.weight.grad is None  # complete blocks were stepped and freed
    fused.step()
    assert weight.grad is None and not torch.equal(weight, before)


def live_gradient_peak(model, install):
    """Largest number of gradient bytes alive at once during one backward. The tracking hooks are registered
    before the fused ones, so they see each gradient before it is stepped and freed."""
    peak = track_live_gradient_peak(model.parameters())
    install(model)
    loss_of(model).backward()
    return peak()


def test_memory_proof_live_gradients_are_one_block_not_the_whole_model():
    torch.manual_seed(0)
    nbytes = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    groups = group_by_block(Flux(SMALL).named_parameters())
    whole = nbytes(p for _, ps in groups for p in ps)
    largest_block = max(nbytes(ps) for key, ps in groups if key[1] >= 0)
    largest_tensor = max(nbytes([p]) for _, ps in groups for p in ps)

    plain = live_gradient_peak(Flux(SMALL), lambda m: None)
    fused = live_gradient_peak(Flux(SMALL), lambda m: FusedBackward(
        torch.optim.SGD(m.parameters(), lr=0.1), list(m.parameters()), HookSettings()))

    def blockwise_install(m):
        blocks = [ps for _, ps in group_by_block(m.named_parameters())]
        BlockwiseOptimizers([torch.optim.SGD(ps, lr=0.1) for ps in blocks], blocks, HookSettings())

    blockwise = live_gradient_peak(Flux(SMALL), blockwise_install)
    assert plain == whole  # without fusion every gradient is alive at the end of backward
    assert fused == largest_tensor <= largest_block  # one tensor at a time
    assert blockwise <= largest_block  # one block at a time
    assert blockwise < whole / 4 and fused < whole / 10


def test_gradient_accumulation_keeps_gradients_until_the_syncing_micro_batch():
    plain, fused_model = twin_models()
    sync = [False]
    opt = torch.optim.SGD(fused_model.parameters(), lr=0.1)
    FusedBackward(opt, list(fused_model.parameters()), HookSettings(should_step=lambda: sync[0]))
    loss_of(fused_model, 0).backward()  # accumulating micro-batch: nothing stepped, gradients kept
    assert all(p.grad is not None for p in fused_model.parameters())
    sync[0] = True
    loss_of(fused_model, 1).backward()
    (loss_of(plain, 0) + loss_of(plain, 1)).backward()
    torch.optim.SGD(plain.parameters(), lr=0.1).step()
    for p, q in zip(plain.parameters(), fused_model.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_stochastic_rounding_is_unbiased_and_moves_bf16_weights_by_tiny_updates():
    lo = torch.tensor(1.0, dtype=torch.bfloat16)
    step = 2.0 ** -7  # bf16 spacing at 1.0
    value = torch.full((20000,), 1.0 + 0.25 * step)
    out = torch.empty(20000, dtype=torch.bfloat16)
    torch.manual_seed(0)
    stochastic_round_(out, value)
    assert set(out.float().unique().tolist()) == {1.0, 1.0 + step}
    assert abs(out.float().mean().item() - value[0].item()) < 0.02 * step
    assert lo.item() == 1.0
    # an SGD update 1/8 of the bf16 spacing: round-to-nearest would never move the weight
    p = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
    opt = torch.optim.SGD([p], lr=1.0)
    p.grad = torch.full_like(p, -step / 8)
    step_param(opt, p, opt.param_groups[0])
    assert p.dtype == torch.bfloat16 and abs(p.float().mean().item() - (1 + step / 8)) < 0.1 * step


def test_streaming_writer_matches_safetensors_and_aligns_data(tmp_path):
    tensors = {"a.weight": torch.randn(3, 5), "b.bias": torch.randn(7).to(torch.bfloat16), "scalar": torch.tensor(2.0),
               "ids": torch.arange(4), "empty": torch.zeros(0, 3), "flag": torch.tensor([True, False])}
    metadata = {"modelspec.architecture": "flux-1-dev", "note": "ü"}
    for dtype in (None, torch.float16):
        save_model(tensors, tmp_path / "plain.safetensors", metadata, dtype)
        save_model(tensors, tmp_path / "stream.safetensors", metadata, dtype, streaming=True)
        a, b = load_file(tmp_path / "plain.safetensors"), load_file(tmp_path / "stream.safetensors")
        assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
        assert b["ids"].dtype == torch.int64 and b["a.weight"].dtype == (dtype or torch.float32)
        with safe_open(tmp_path / "stream.safetensors", "pt") as f:
            assert f.metadata() == metadata
    raw = (tmp_path / "stream.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 256 == 0 and json.loads(raw[8:8 + n])["__metadata__"]["note"] == "ü"


def test_streaming_writer_refuses_unstorable_dtypes(tmp_path):
    with pytest.raises(ValueError, match="c.weight"):
        save_model({"c.weight": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "x.safetensors", streaming=True)
    assert not (tmp_path / "x.safetensors").exists()


def test_only_trainers_with_the_full_training_options_fuse():
    """The LoRA trainer's parser has --fused_backward_pass too (sd-scripts' optimizer group) and warns that it has no
    effect there: it must then really have none."""
    import flux_train
    import flux_train_network
    from library.training.fused_optimizers import prepare_optimizer
    from library.training.setup import make_accelerator

    for parser, fused in ((flux_train.setup_parser(), True), (flux_train_network.setup_parser(), False)):
        args = parser.parse_args(["--fused_backward_pass", "--optimizer_type", "adafactor", "--max_train_steps", "1"])
        model = torch.nn.Linear(2, 2)
        *_, hooks = prepare_optimizer(args, make_accelerator(args), [{"params": list(model.parameters())}],
                                      list(model.named_parameters()))
        assert isinstance(hooks, FusedBackward) if fused else hooks is None
