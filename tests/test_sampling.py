"""Sampling math: packing, ids, the BFL schedule and the Euler/CFG loop, checked against values by hand."""

import math

import pytest
import torch

from library.flow.sampling import (
                                   Conditioning,
                                   denoise,
                                   get_noise,
                                   get_schedule,
                                   pack_latents,
                                   packed_grid,
                                   prepare_img_ids,
                                   shift_mu,
                                   unpack_latents,
                                   )


def test_pack_unpack_round_trip_and_patch_order():
    x = torch.arange(2 * 16 * 4 * 6, dtype=torch.float32).view(2, 16, 4, 6)
    packed = pack_latents(x)
    assert packed.shape == (2, 2 * 3, 64)
    # token 0 is the top-left 2x2 patch, channel-major: (c0: (0,0),(0,1),(1,0),(1,1)), then c1 ...
    assert packed[0, 0, :4].tolist() == [x[0, 0, 0, 0], x[0, 0, 0, 1], x[0, 0, 1, 0], x[0, 0, 1, 1]]
    assert packed[0, 1, 0] == x[0, 0, 0, 2]  # next token moves right along the row
    assert torch.equal(unpack_latents(packed, 2, 3), x)


def test_grid_rounds_up_like_sd_scripts():
    assert packed_grid(768, 1360) == (48, 85)
    assert packed_grid(100, 1000) == (7, 63)


def test_img_ids():
    ids = prepare_img_ids(2, 2, 3)
    assert ids.shape == (2, 6, 3)
    assert ids[0].tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 1, 2]]


def test_schedule_values_by_hand():
    assert shift_mu(256) == pytest.approx(0.5)
    assert shift_mu(4096) == pytest.approx(1.15)
    assert shift_mu(2176) == pytest.approx(0.825)
    t = get_schedule(4, 256)
    e = math.exp(0.5)
    assert t == pytest.approx([1.0, e / (e + 1 / 3), e / (e + 1), e / (e + 3), 0.0])
    assert get_schedule(4, 4096, shift=False) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    big = get_schedule(4, 4096)
    assert big[2] == pytest.approx(math.exp(1.15) / (math.exp(1.15) + 1))


def test_noise_is_seeded_and_packed():
    a = get_noise(1, 100, 64, seed=42)
    assert a.shape == (1, 7 * 4, 64)
    assert torch.equal(a, get_noise(1, 100, 64, seed=42))
    assert not torch.equal(a, get_noise(1, 100, 64, seed=43))


def _cond(batch, value):
    return Conditioning(txt=torch.full((batch, 3, 4), value), y=torch.zeros(batch, 4), txt_ids=torch.zeros(batch, 3, 3))


def test_euler_with_constant_velocity():
    calls = []

    def model(img, img_ids, txt, txt_ids, timesteps, y, guidance, txt_attention_mask):
        calls.append((timesteps[0].item(), guidance[0].item()))
        return torch.ones_like(img)

    img = torch.zeros(1, 4, 64)
    out = denoise(model, img, prepare_img_ids(1, 2, 2), _cond(1, 0.0), [1.0, 0.6, 0.0], guidance=2.5)
    assert torch.allclose(out, torch.full_like(img, -1.0))  # x + sum(dt) * v = 0 - 1
    assert calls == [pytest.approx((1.0, 2.5)), pytest.approx((0.6, 2.5))]


def test_true_cfg_combines_negative_and_positive():
    def model(img, img_ids, txt, txt_ids, timesteps, y, guidance, txt_attention_mask):
        # velocity = the prompt's value: negative 1, positive 3
        return txt[:, :1, :1].expand(img.shape[0], img.shape[1], img.shape[2]).clone()

    img = torch.zeros(1, 4, 64)
    out = denoise(model, img, prepare_img_ids(1, 2, 2), _cond(1, 3.0), [1.0, 0.0], negative=_cond(1, 1.0),
                  cfg_scale=2.0)
    # pred = 1 + 2 * (3 - 1) = 5 ; x = 0 + (0 - 1) * 5
    assert torch.allclose(out, torch.full_like(img, -5.0))
    plain = denoise(model, img, prepare_img_ids(1, 2, 2), _cond(1, 3.0), [1.0, 0.0], negative=_cond(1, 1.0))
    assert torch.allclose(plain, torch.full_like(img, -3.0))  # cfg_scale 1 ignores the negative prompt
