"""Chroma under the memory features: block swapping (forward, backward, trained weights) and gradient
checkpointing give the same numbers as the plain model, on CPU (separate storage and slot memory, as in
tests/test_block_swap.py)."""

import copy

import pytest
import torch

from library.memory.block_swap import enable_flux_block_swap
from library.memory.checkpointing import enable_gradient_checkpointing, is_gradient_checkpointing
from library.models.chroma import Chroma, params_with_overrides

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PARAMS = params_with_overrides("tiny", depth=4, depth_single_blocks=8)  # up to 5 blocks to swap


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    b, n, l = 2, 16, 8
    ids = torch.zeros(b, n, 3)
    ids[..., 1] = torch.arange(n).div(4, rounding_mode="floor")
    ids[..., 2] = torch.arange(n) % 4
    mask = torch.zeros(b, l, dtype=torch.long)
    mask[0, :3], mask[1, :6] = 1, 1
    return dict(img=torch.randn(b, n, 64, generator=g), img_ids=ids, txt=torch.randn(b, l, 64, generator=g),
                txt_ids=torch.zeros(b, l, 3), timesteps=torch.rand(b, generator=g), y=None,
                guidance=torch.zeros(b), txt_attention_mask=mask)


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return Chroma(PARAMS).eval()


@pytest.mark.parametrize("n,checkpointing", [(1, False), (5, False), (3, True)])
def test_full_fine_tune_steps_equal_with_block_swap(base, n, checkpointing):
    ref = copy.deepcopy(base).train()
    model = copy.deepcopy(base)
    if checkpointing:
        enable_gradient_checkpointing(model)
        assert is_gradient_checkpointing(model) and is_gradient_checkpointing(model.distilled_guidance_layer)
    swappers = enable_flux_block_swap(model, n, "cpu", "cpu", host_to_device_only=False)
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
    assert not all(torch.equal(want[k], base.state_dict()[k]) for k in want)
    for s in swappers:
        assert s.resident() == s.schedule.initial


@pytest.mark.parametrize("n", [2, 5])
def test_frozen_swapped_forward_and_input_gradients_equal(base, n):
    """A frozen base (LoRA's case): host-to-device-only swapping, outputs and input gradients unchanged."""
    model = copy.deepcopy(base)
    enable_flux_block_swap(model, n, "cpu", "cpu")
    grads = []
    for m in (base, model):
        m.requires_grad_(False)
        inputs = _inputs()
        inputs["img"].requires_grad_(True)
        out = m(**inputs)
        out.square().mean().backward()
        grads.append((out.detach(), inputs["img"].grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
