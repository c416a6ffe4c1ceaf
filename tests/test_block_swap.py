"""Block swapping (library/memory/block_swap.py): the schedule on FLUX.1-dev block counts, and the swapper on CPU.

Storage and compute are both the CPU here, but they are separate memory: the swapped blocks' weights live in their
own storage buffers and run from a few shared slot buffers, so a block fetched late, into the wrong slot or not at
all runs with another block's weights and the outputs and trained weights below would differ. Placement-only checks
use the meta device for both sides (no data).
"""

import copy
import weakref

import pytest
import torch

from library.memory.block_swap import (BlockSwapper, enable_flux_block_swap, max_blocks_to_swap,
                                       move_to_device_except_swap_blocks, restore_moves, split_blocks_to_swap,
                                       swap_schedule)
from library.memory.checkpointing import enable_gradient_checkpointing
from library.models.transformer import Flux, params_with_overrides

DEV_DOUBLE, DEV_SINGLE = 19, 38


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_split_and_maximum_match_sd_scripts():
    assert max_blocks_to_swap(DEV_DOUBLE, DEV_SINGLE) == 35
    assert split_blocks_to_swap(35, DEV_DOUBLE, DEV_SINGLE) == (17, 36)
    assert split_blocks_to_swap(18, DEV_DOUBLE, DEV_SINGLE) == (9, 18)
    assert split_blocks_to_swap(1, DEV_DOUBLE, DEV_SINGLE) == (0, 2)
    assert split_blocks_to_swap(0, DEV_DOUBLE, DEV_SINGLE) == (0, 0)
    for n in (36, -1):
        with pytest.raises(ValueError, match=r"--blocks_to_swap .* can swap 1 to 35 blocks"):
            split_blocks_to_swap(n, DEV_DOUBLE, DEV_SINGLE)
    assert max_blocks_to_swap(2, 2) == 0  # the tiny test preset keeps every block


@pytest.mark.parametrize("n", range(0, 36))
def test_schedule_every_n_on_dev_block_counts(n):
    """No block runs (forward or backward) without its weights, each runs its backward in the slot of its forward,
    the layout is back to the initial one after forward+backward and after forward only, and every fetch is
    issued at least one block step before the block runs (so it can overlap compute)."""
    for blocks, swapped in zip((DEV_DOUBLE, DEV_SINGLE), split_blocks_to_swap(n, DEV_DOUBLE, DEV_SINGLE)):
        schedule = swap_schedule(blocks, swapped)
        assert schedule.initial == tuple(range(blocks - swapped))
        for first_trained in (0, None, blocks // 2):  # LoRA/full FT, inference, a partly frozen stack
            for nested in (False, True):  # with a no-grad pass before the backward (differential output pres.)
                log = schedule.simulate(first_trained, nested)
                assert [b for phase, b, _ in log if phase == "forward"] == list(range(blocks))
        steps = [("forward", i) for i in range(blocks)] + [("backward", b) for b in range(blocks - 1, -1, -1)]
        issued = {}
        for t, (phase, b) in enumerate(steps):
            moves = (schedule.after_forward(b, True) if phase == "forward"
                     else schedule.after_backward(b))
            for fetch, _ in moves:
                issued[fetch] = t
            if b in issued:
                assert t - issued.pop(b) >= 2 or swapped == 0, (phase, b)
        moved = sum(len(schedule.after_forward(i, True)) + len(schedule.after_backward(i)) for i in range(blocks))
        assert moved == 2 * swapped  # each swapped block in and out once per step
        forward_only = sum(len(schedule.after_forward(i, False)) for i in range(blocks))
        assert forward_only == min(2 * swapped, blocks) if swapped else forward_only == 0


def test_restore_moves_put_each_block_back_in_its_slot():
    schedule = swap_schedule(19, 17)
    assert restore_moves(schedule, [18, 17]) == ((0, 18), (1, 17))
    assert restore_moves(schedule, [0, 1]) == ()


# --- the swapper on a small FLUX -------------------------------------------------------------------------------------


PARAMS = params_with_overrides("tiny", depth=4, depth_single_blocks=8)  # up to 5 blocks to swap


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    b, n, l = 1, 16, 8
    ids = torch.zeros(b, n, 3)
    ids[..., 1] = torch.arange(n).div(4, rounding_mode="floor")
    ids[..., 2] = torch.arange(n) % 4
    return dict(img=torch.randn(b, n, 64, generator=g), img_ids=ids, txt=torch.randn(b, l, 64, generator=g),
                txt_ids=torch.zeros(b, l, 3), timesteps=torch.rand(b, generator=g), y=torch.randn(b, 64, generator=g),
                guidance=torch.full((b,), 3.5))


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return Flux(PARAMS).eval()


def _swapped(base, n, write_back, checkpointing=False, cpu_offload=False):
    model = copy.deepcopy(base)
    if checkpointing:
        enable_gradient_checkpointing(model, cpu_offload=cpu_offload)
    swappers = enable_flux_block_swap(model, n, "cpu", "cpu", host_to_device_only=not write_back)
    return model, swappers


@pytest.mark.parametrize("n", [1, 2, 5])
def test_forward_only_outputs_equal_and_layout_restored(base, n):
    model, swappers = _swapped(base, n, write_back=False)
    with torch.no_grad():
        ref = base(**_inputs())
        for _ in range(2):
            assert torch.equal(model(**_inputs()), ref)
    for s in swappers:
        assert s.resident() == s.schedule.initial
        assert s.stats.d2h_bytes == 0 and s.stats.restores == 0


@pytest.mark.parametrize("n,checkpointing", [(1, False), (3, True), (5, False), (5, True)])
def test_full_fine_tune_steps_equal_with_write_back(base, n, checkpointing):
    """A plain torch optimizer over the whole model: same losses and same trained weights, bit for bit."""
    ref, _ = copy.deepcopy(base).train(), None
    if checkpointing:
        enable_gradient_checkpointing(ref)
    model, swappers = _swapped(base, n, write_back=True, checkpointing=checkpointing)
    model.train()
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (ref, model)]
    for step in range(3):
        losses = []
        for m, opt in zip((ref, model), opts):
            loss = m(**_inputs(step)).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss)
        assert torch.equal(*losses), step
    want, got = ref.state_dict(), model.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert not all(torch.equal(want[k], base.state_dict()[k]) for k in want)  # it did train
    for s in swappers:
        assert s.resident() == s.schedule.initial and s.stats.restores == 0


def test_gradient_accumulation_with_write_back(base):
    ref = copy.deepcopy(base).train()
    model, _ = _swapped(base, 5, write_back=True)
    model.train()
    for m in (ref, model):
        for step in range(2):
            m(**_inputs(step)).square().mean().backward()
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_host_to_device_only_moves_nothing_back_and_frozen_weights_stay(base):
    model, swappers = _swapped(base, 5, write_back=False)
    model.requires_grad_(False)
    x = _inputs()
    x["img"].requires_grad_(True)  # something trainable upstream, so a backward runs through every block
    model(**x).square().mean().backward()
    ref_x = _inputs()
    ref_x["img"].requires_grad_(True)
    copy.deepcopy(base).requires_grad_(False)(**ref_x).square().mean().backward()
    assert torch.equal(x["img"].grad, ref_x["img"].grad)
    for s in swappers:
        assert s.stats.d2h_bytes == 0 and s.stats.h2d_bytes == 2 * s.schedule.num_swapped * s.block_bytes * 1
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), model.state_dict().values()))


def test_forward_without_backward_is_recovered(base):
    """A forward with gradients whose backward never runs (an exception, a skipped step) must not leave the layout
    shifted: the next forward restores it."""
    model, swappers = _swapped(base, 5, write_back=False)
    model.train()
    x = _inputs()
    x["img"].requires_grad_(True)
    model(**x)  # no backward
    assert swappers[1].resident() != swappers[1].schedule.initial
    with torch.no_grad():  # a no-grad pass in between works from, and keeps, the shifted layout
        assert torch.equal(model(**_inputs()), base(**_inputs()))
    assert swappers[1].stats.restores == 0
    x = _inputs(2)
    x["img"].requires_grad_(True)
    model(**x).square().mean().backward()  # the next pass with gradients starts from the initial layout
    ref_x = _inputs(2)
    ref_x["img"].requires_grad_(True)
    copy.deepcopy(base).train()(**ref_x).square().mean().backward()
    assert torch.equal(x["img"].grad, ref_x["img"].grad)
    assert swappers[1].stats.restores == 1 and swappers[1].resident() == swappers[1].schedule.initial


@pytest.mark.parametrize("cpu_offload", [False, True])
def test_no_grad_forward_between_forward_and_backward(base, cpu_offload):
    """Differential output preservation runs the model under no_grad after the training forward and before its
    backward: the swapped layout must survive it, and the gradients must not change (also when the training
    forward ran its blocks without a graph, in offloaded checkpoints)."""
    ref = copy.deepcopy(base).train()
    if cpu_offload:
        enable_gradient_checkpointing(ref, cpu_offload=True)
    model, swappers = _swapped(base, 5, write_back=True, checkpointing=cpu_offload, cpu_offload=cpu_offload)
    model.train()
    for m in (ref, model):
        out = m(**_inputs(1))
        with torch.no_grad():
            target = m(**_inputs(2))
        (out - target).square().mean().backward()
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        assert torch.equal(p.grad, q.grad), name
    for s in swappers:
        assert s.resident() == s.schedule.initial and s.stats.restores == 0


def test_offloaded_block_tells_its_forward_and_calls_back_before_its_backward():
    """The protocol block swapping uses inside an offloaded checkpoint (library/memory/offload_checkpoint.py)."""
    from library.memory import offload_checkpoint as oc

    events = []

    def block(x):
        if torch._C._current_graph_task_id() == -1:  # the forward, not the recomputation
            assert oc.recording_for_backward() and not torch.is_grad_enabled()
            oc.call_before_backward(lambda: events.append("before backward"))
        else:
            events.append("recomputed")
        return x * 2

    x = torch.ones(3, requires_grad=True)
    out = oc.offloaded_checkpoint(block, (x,), (0,))
    assert not oc.recording_for_backward() and events == []
    out.sum().backward()
    assert events == ["before backward", "recomputed"] and torch.equal(x.grad, torch.full((3,), 2.0))
    with pytest.raises(RuntimeError, match="outside the forward of an offloaded block"):
        oc.call_before_backward(lambda: None)


def _record_moves(swapper) -> list:
    moves, move = [], swapper._move

    def recorded(fetch, evict):
        moves.append((fetch, evict))
        move(fetch, evict)
    swapper._move = recorded
    return moves


@pytest.mark.parametrize("n", [1, 5])
def test_offloaded_checkpointing_swaps_on_the_training_schedule(base, n):
    """--cpu_offload_checkpointing runs each block forward without a graph (grad mode off) and recomputes it in
    backward: the swappers must still make the training schedule's moves, as with plain checkpointing (not the
    forward-only ones), and the blocks' image/text inputs must leave for CPU copies, the device tensors freed."""
    runs = {}
    for offload in (False, True):
        model, swappers = _swapped(base, n, write_back=True, checkpointing=True, cpu_offload=offload)
        model.train()
        moves = [_record_moves(s) for s in swappers]
        inputs = []  # (weakref to a block's first input, a copy of its value) in forward, not in recomputation
        for block in (*model.double_blocks, *model.single_blocks):
            block.register_forward_pre_hook(lambda m, args: None if torch._C._current_graph_task_id() != -1 else
                                            inputs.append((weakref.ref(args[0]), args[0].clone())))
        out = model(**_inputs())
        alive = [ref() is not None for ref, _ in inputs]
        assert len(inputs) == len(model.double_blocks) + len(model.single_blocks)
        if offload:
            nodes = _offloaded_nodes(out.grad_fn)
            host = [t for node in nodes for t in node.host_inputs.host]
            assert len(nodes) == len(inputs) and len(host) == 2 * len(model.double_blocks) + len(model.single_blocks)
            assert all(t.device.type == "cpu" for t in host)
            firsts = [node.host_inputs.host[0] for node in nodes]  # img of a double block, x of a single one
            assert all(torch.equal(t, value) for t, (_, value) in zip(firsts, inputs))
        out.square().mean().backward()
        runs[offload] = moves, alive, {name: p.grad for name, p in model.named_parameters()}
    (plain_moves, plain_alive, plain_grads), (moves, alive, grads) = runs[False], runs[True]
    for s, plain, got in zip(swappers, plain_moves, moves):
        sch = s.schedule
        want = ([m for i in range(sch.num_blocks) for m in sch.after_forward(i, True)]
                + [m for b in range(sch.num_blocks - 1, 0, -1) for m in sch.after_backward(b)])
        assert got == plain == want and len(want) == 2 * sch.num_swapped
        assert s.resident() == sch.initial and s.stats.restores == 0
    assert not any(alive) and all(plain_alive)  # offloaded: no device input kept; plain: all saved for backward
    for name, g in plain_grads.items():  # vec's upstream sums its gradient in another order (test_block_swap_training)
        if name.startswith(("time_in.", "vector_in.", "guidance_in.")):
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7)
        else:
            assert torch.equal(grads[name], g), name


def _offloaded_nodes(root) -> list:
    """The offloaded blocks' backward nodes of a graph, in forward order."""
    seen, stack, found = set(), [root], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "host_inputs"):
            found.append(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return sorted(found, key=lambda node: node._sequence_nr())


def test_placement_and_sizes_on_meta():
    with torch.device("meta"):
        model = Flux(PARAMS)
    double, single = enable_flux_block_swap(model, 5, "meta", "meta")
    assert (double.schedule.num_swapped, single.schedule.num_swapped) == (2, 6)
    block = double.block_bytes
    assert block >= sum(p.numel() * 4 for p in model.double_blocks[0].parameters())
    assert double.buffer_bytes == 2 * block and double.resident_bytes == 0
    assert single.buffer_bytes == 2 * single.block_bytes
    assert all(p.device.type == "meta" for p in model.parameters())
    with pytest.raises(RuntimeError, match="move_to_device_except_swap_blocks"):
        model.to("meta")
    move_to_device_except_swap_blocks(model, "meta")  # allowed: the blocks are skipped


def test_fewer_swapped_than_resident_keeps_the_middle_blocks_fixed(base):
    model, (double, single) = _swapped(base, 1, write_back=False)
    assert single.schedule.num_swapped == 2 and single.schedule.num_slots == 6
    assert single.buffer_bytes == 2 * single.block_bytes and single.resident_bytes == 4 * single.block_bytes
    assert set(single.schedule.swapped_blocks) == {0, 1, 6, 7}


def test_swapper_refuses_unlike_blocks_and_device_pairs():
    blocks = [torch.nn.Linear(4, 4), torch.nn.Linear(4, 5), torch.nn.Linear(4, 4)]
    with pytest.raises(ValueError, match="block 1 differs from block 0"):
        BlockSwapper(blocks, 1, "cpu", "cpu", host_to_device_only=True)
    with pytest.raises(ValueError, match="cannot swap between cpu and meta"):
        BlockSwapper([torch.nn.Linear(4, 4) for _ in range(3)], 1, "cpu", "meta", host_to_device_only=True)
    with pytest.raises(ValueError, match="at most 2"):
        BlockSwapper([torch.nn.Linear(4, 4) for _ in range(3)], 3, "cpu", "cpu", host_to_device_only=True)


# --- fp8 weights ----------------------------------------------------------------------------------------------------

FP8_REL_TOLERANCE = 0.1  # relative L2 error of fp8 (e4m3fn, 3 mantissa bits) outputs against bf16 ones


def _rel_error(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _bf16_inputs(device="cpu", seed=1):
    return {k: v.to(device, torch.bfloat16) if v.is_floating_point() else v.to(device)
            for k, v in _inputs(seed).items()}


def test_fp8_weights_swap_exactly_and_stay_close_to_bf16(base):
    from library.memory.fp8 import prepare_fp8

    bf16 = copy.deepcopy(base).to(torch.bfloat16)
    fp8 = prepare_fp8(copy.deepcopy(base), torch.float8_e4m3fn, torch.bfloat16)
    swapped = prepare_fp8(copy.deepcopy(base), torch.float8_e4m3fn, torch.bfloat16)
    double, _ = enable_flux_block_swap(swapped, 5, "cpu", "cpu")
    assert {d for d in double.layout.dtypes} == {torch.float8_e4m3fn, torch.bfloat16}  # fp8 weights, bf16 rest
    with torch.no_grad():
        want, got, ref = fp8(**_bf16_inputs()), swapped(**_bf16_inputs()), bf16(**_bf16_inputs())
    assert torch.equal(got, want)
    assert 0 < _rel_error(want, ref) < FP8_REL_TOLERANCE


# --- CUDA: the real transfer path (pinned memory, side stream, events) -----------------------------------------------


def _lora_model(base, device, n, cpu_offload=False):
    from networks import lora_flux

    model = copy.deepcopy(base).to(torch.bfloat16)
    model.requires_grad_(False)
    torch.manual_seed(0)
    network = lora_flux.create_network(1.0, 4, 1.0, None, [None, None], model)
    network.apply_to([None, None], model, apply_text_encoder=False, apply_unet=True)
    for p in network.parameters():  # non-zero up weights, so every LoRA gets a gradient and changes outputs
        torch.nn.init.normal_(p, std=0.02)
    network.to(device)
    if n:
        move_to_device_except_swap_blocks(model, device)
        enable_flux_block_swap(model, n, device, "cpu")
    else:
        model.to(device)
    enable_gradient_checkpointing(model, cpu_offload=cpu_offload)
    model.train()
    return model, network


@pytest.mark.gpu
@pytest.mark.parametrize("n, cpu_offload", [(1, False), (3, False), (5, False), (3, True), (5, True)])
def test_cuda_outputs_and_lora_gradients_equal_without_swap(base, n, cpu_offload):
    """Also with --cpu_offload_checkpointing: its inputs travel on a side stream of their own, next to the swap's."""
    (ref, ref_net), (model, net) = _lora_model(base, "cuda", 0), _lora_model(base, "cuda", n, cpu_offload)
    for step in range(2):
        outs = []
        for m in (ref, model):
            out = m(**_bf16_inputs("cuda", step))
            out.float().square().mean().backward()
            outs.append(out)
        torch.cuda.synchronize()
        # not bit for bit: attention backward kernels may accumulate with atomics; a block run with another
        # block's weights would be off by O(1)
        assert _rel_error(outs[1], outs[0]) < 1e-3
        for (name, p), q in zip(ref_net.named_parameters(), net.parameters()):
            assert _rel_error(q.grad, p.grad) < 2e-2, name
    for s in model.block_swappers:
        assert s.resident() == s.schedule.initial and s.stats.d2h_bytes == 0
        assert all(t.is_pinned() for t in s._store.values())


@pytest.mark.gpu
def test_cuda_swap_buffers_are_reused_and_memory_is_lower(base):
    torch.cuda.empty_cache()
    model, _ = _lora_model(base, "cuda", 5)
    allocated = []
    for step in range(3):
        model(**_bf16_inputs("cuda", step)).float().square().mean().backward()
        torch.cuda.synchronize()
        allocated.append(torch.cuda.memory_allocated())
    assert allocated[1] == allocated[2]  # no per-step allocation left behind (LoRA grads exist from step 1)
    on_device = sum(p.numel() * p.element_size() for b in (*model.double_blocks, *model.single_blocks)
                    for p in b.parameters() if p.device.type == "cuda")
    total = sum(p.numel() * p.element_size() for b in (*model.double_blocks, *model.single_blocks)
                for p in b.parameters())
    assert on_device <= sum(s.buffer_bytes + s.resident_bytes for s in model.block_swappers) < total


@pytest.mark.gpu
def test_cuda_fp8_outputs_within_tolerance_of_bf16(base):
    from library.memory.fp8 import prepare_fp8

    bf16 = copy.deepcopy(base).to("cuda", torch.bfloat16)
    fp8 = prepare_fp8(copy.deepcopy(base), torch.float8_e4m3fn, torch.bfloat16)
    move_to_device_except_swap_blocks(fp8, "cuda")
    enable_flux_block_swap(fp8, 3, "cuda", "cpu")
    with torch.no_grad():
        err = _rel_error(fp8(**_bf16_inputs("cuda")), bf16(**_bf16_inputs("cuda")))
    assert err < FP8_REL_TOLERANCE


@pytest.mark.gpu
def test_cuda_full_fine_tune_with_accumulation_and_write_back(base):
    """fp32 on CUDA: gradients accumulated over two micro-batches travel with their weights (pinned storage and
    back) and an optimizer after backward updates the same weights as without swapping."""
    ref = copy.deepcopy(base).cuda().train()
    model = copy.deepcopy(base)
    move_to_device_except_swap_blocks(model, "cuda")
    swappers = enable_flux_block_swap(model, 5, "cuda", "cpu", host_to_device_only=False)
    model.train()
    cuda_inputs = lambda s: {k: v.cuda() for k, v in _inputs(s).items()}  # noqa: E731
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref, model)]
    for step in range(2):
        for m, opt in zip((ref, model), opts):
            for micro in range(2):
                m(**cuda_inputs(2 * step + micro)).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    want, got = ref.state_dict(), model.state_dict()
    for k in want:
        torch.testing.assert_close(got[k].cpu(), want[k].cpu(), rtol=1e-4, atol=1e-5)
    assert all(s.stats.d2h_bytes > 0 for s in swappers)
