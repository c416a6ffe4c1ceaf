"""Flow-matching training math checked against values computed by hand (reference §6)."""

import argparse
import math

import pytest
import torch

from library.flow.matching import (
                                   FlowMatchingSettings,
                                   apply_model_prediction_type,
                                   compute_loss_weighting,
                                   conditional_loss,
                                   discrete_sigma_table,
                                   flow_target,
                                   guidance_vector,
                                   huber_c_for,
                                   noisy_input,
                                   packed_seq_len,
                                   reduce_loss,
                                   sample_sigmas,
                                   timestep_density,
                                   )


def gen(seed=0):
    return torch.Generator("cpu").manual_seed(seed)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def settings(**kw):
    return FlowMatchingSettings(**kw)


# --- settings ---------------------------------------------------------------------------------------------------

def test_defaults_match_sd_scripts_and_from_args():
    s = FlowMatchingSettings.from_args(argparse.Namespace())
    assert (s.timestep_sampling, s.sigmoid_scale, s.discrete_flow_shift) == ("sigma", 1.0, 3.0)
    assert (s.weighting_scheme, s.logit_mean, s.logit_std, s.mode_scale) == ("uniform", 0.0, 1.0, 1.29)
    assert (s.model_prediction_type, s.guidance_scale, s.loss_type) == ("sigma_scaled", 3.5, "l2")
    assert (s.huber_schedule, s.huber_c, s.huber_scale) == ("snr", 0.1, 1.0)
    assert s.ip_noise_gamma is None and s.ip_noise_gamma_random_strength is False
    s = FlowMatchingSettings.from_args(argparse.Namespace(timestep_sampling="shift", huber_c=0.3, unrelated=1))
    assert s.timestep_sampling == "shift" and s.huber_c == 0.3 and s.loss_type == "l2"
    with pytest.raises(ValueError, match="timestep_sampling"):
        FlowMatchingSettings(timestep_sampling="logsnr")


# --- σ sampling -------------------------------------------------------------------------------------------------

def test_sigma_table_endpoints():
    table = discrete_sigma_table(3.0)
    assert table.shape == (1000,) and table.dtype == torch.float32
    # index 0: t = 1000 -> 3·1 / (1 + 2·1) = 1 (pure noise)
    assert table[0].item() == pytest.approx(1.0)
    # index 999: t = 1 -> 3·0.001 / (1 + 2·0.001) = 0.003 / 1.002
    assert table[999].item() == pytest.approx(0.003 / 1.002, rel=1e-6)
    # index 499: t = 501 -> 1.503 / 2.002
    assert table[499].item() == pytest.approx(1.503 / 2.002, rel=1e-6)
    # shift 1 is the identity: σ = t/1000
    assert discrete_sigma_table(1.0)[250].item() == pytest.approx(0.75)


def test_sigma_mode_uniform_density_by_hand():
    u = torch.rand(5, generator=gen(1)).tolist()  # the draws sample_sigmas will see
    got = sample_sigmas(settings(), 5, generator=gen(1)).tolist()
    for ui, g in zip(u, got):
        t = 1000 - math.floor(ui * 1000)  # idx = floor(1000u), t_idx = 1000 - idx
        x = t / 1000
        assert g == pytest.approx(3 * x / (1 + 2 * x), rel=1e-6)


def test_sigma_mode_logit_normal_and_mode_density_by_hand():
    z = torch.randn(4, generator=gen(2)).tolist()
    u = timestep_density(settings(weighting_scheme="logit_normal", logit_mean=0.5, logit_std=2.0), 4, gen(2))
    assert u.tolist() == pytest.approx([sigmoid(0.5 + 2.0 * zi) for zi in z], rel=1e-6)
    u0 = torch.rand(4, generator=gen(3)).tolist()
    u = timestep_density(settings(weighting_scheme="mode"), 4, gen(3))
    # u = 1 - u0 - 1.29·(cos²(π·u0/2) - 1 + u0)
    assert u.tolist() == pytest.approx(
        [1 - a - 1.29 * (math.cos(math.pi * a / 2) ** 2 - 1 + a) for a in u0], rel=1e-5, abs=1e-6)
    # the table lookup follows u: σ = table[floor(1000u)]
    got = sample_sigmas(settings(weighting_scheme="mode"), 4, generator=gen(3))
    assert torch.equal(got, discrete_sigma_table(3.0)[(u * 1000).long()])


def test_uniform_sigmoid_shift_by_hand():
    u = torch.rand(4, generator=gen(4)).tolist()
    assert sample_sigmas(settings(timestep_sampling="uniform"), 4, generator=gen(4)).tolist() == pytest.approx(u)
    z = torch.randn(4, generator=gen(5)).tolist()
    got = sample_sigmas(settings(timestep_sampling="sigmoid", sigmoid_scale=1.5), 4, generator=gen(5))
    assert got.tolist() == pytest.approx([sigmoid(1.5 * zi) for zi in z], rel=1e-6)
    got = sample_sigmas(settings(timestep_sampling="shift", sigmoid_scale=2.0, discrete_flow_shift=3.1), 4,
                        generator=gen(5))
    p = [sigmoid(2.0 * zi) for zi in z]
    assert got.tolist() == pytest.approx([3.1 * pi / (1 + 2.1 * pi) for pi in p], rel=1e-6)


@pytest.mark.parametrize("seq_len,mu", [(256, 0.5), (4096, 1.15), (2176, 0.825)])
def test_flux_shift_by_hand(seq_len, mu):
    # mu = 0.5 + 0.65·(N - 256)/3840: 256 -> 0.5, 4096 -> 1.15, 2176 -> 0.5 + 0.65·0.5 = 0.825
    z = torch.randn(3, generator=gen(6)).tolist()
    got = sample_sigmas(settings(timestep_sampling="flux_shift"), 3, generator=gen(6), image_seq_len=seq_len)
    expected = [math.exp(mu) / (math.exp(mu) + (1 / sigmoid(zi) - 1)) for zi in z]
    assert got.dtype == torch.float32 and got.tolist() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="image_seq_len"):
        sample_sigmas(settings(timestep_sampling="flux_shift"), 3)


def test_packed_seq_len():
    assert packed_seq_len(128, 128) == 4096 and packed_seq_len(64, 68) == 1088


def _mean_over_normal(f, n=200001):
    """E[f(z)] for z ~ N(0,1) by the trapezoid rule on [-8, 8]."""
    z = torch.linspace(-8, 8, n, dtype=torch.float64)
    return torch.trapezoid(f(z) * torch.exp(-z * z / 2) / math.sqrt(2 * math.pi), z).item()


def test_distribution_means():
    n = 10000
    assert sample_sigmas(settings(timestep_sampling="uniform"), n, generator=gen(7)).mean().item() == \
        pytest.approx(0.5, abs=0.01)
    assert sample_sigmas(settings(timestep_sampling="sigmoid"), n, generator=gen(8)).mean().item() == \
        pytest.approx(0.5, abs=0.01)
    shift = sample_sigmas(settings(timestep_sampling="shift"), n, generator=gen(9)).mean().item()
    expected = _mean_over_normal(lambda z: 3 * torch.sigmoid(z) / (1 + 2 * torch.sigmoid(z)))
    assert shift == pytest.approx(expected, abs=0.01) and expected > 0.6  # shifted toward noise
    # σ mode with the uniform density: every table entry equally likely -> the table mean
    sig = sample_sigmas(settings(), n, generator=gen(10)).mean().item()
    assert sig == pytest.approx(discrete_sigma_table(3.0).double().mean().item(), abs=0.01)
    # logit-normal with mean 0 is symmetric around u = 0.5
    u = timestep_density(settings(weighting_scheme="logit_normal"), n, gen(11))
    assert u.mean().item() == pytest.approx(0.5, abs=0.01)
    assert 0.0 <= u.min().item() and u.max().item() <= 1.0


def test_sigmas_land_on_requested_device_and_dtype():
    s = sample_sigmas(settings(timestep_sampling="sigmoid"), 3, device="cpu")
    assert s.shape == (3,) and s.dtype == torch.float32


# --- forward process and prediction types -----------------------------------------------------------------------

def test_noisy_input_endpoints_and_midpoint():
    x0, eps = torch.full((2, 16, 2, 2), 3.0), torch.full((2, 16, 2, 2), -1.0)
    xt = noisy_input(x0, eps, torch.tensor([0.0, 1.0]), settings())
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[1], eps[1])  # σ=0 -> x0, σ=1 -> ε
    xt = noisy_input(x0, eps, torch.tensor([0.25, 0.5]), settings())
    assert xt[0, 0, 0, 0].item() == pytest.approx(0.75 * 3 + 0.25 * -1)  # 2.0
    assert xt[1, 0, 0, 0].item() == pytest.approx(0.5 * 3 + 0.5 * -1)  # 1.0


def test_ip_noise_fixed_and_random_strength():
    x0, eps, sig = torch.ones(1, 2, 2, 2), torch.zeros(1, 2, 2, 2), torch.tensor([0.5])
    g = gen(12)
    xi = torch.randn(1, 2, 2, 2, generator=g)
    strength = torch.rand(1, generator=g).item()
    # fixed γ = 0.2: x_t = 0.5·1 + 0.5·(0 + 0.2·ξ)
    got = noisy_input(x0, eps, sig, settings(ip_noise_gamma=0.2), generator=gen(12))
    assert torch.allclose(got, 0.5 + 0.5 * 0.2 * xi)
    # random strength: γ' = U·0.2 (drawn after ξ)
    got = noisy_input(x0, eps, sig, settings(ip_noise_gamma=0.2, ip_noise_gamma_random_strength=True),
                      generator=gen(12))
    assert torch.allclose(got, 0.5 + 0.5 * strength * 0.2 * xi)
    # γ = 0 is off: no draw, plain interpolation
    assert torch.equal(noisy_input(x0, eps, sig, settings(ip_noise_gamma=0.0)), torch.full((1, 2, 2, 2), 0.5))


def test_flow_target():
    assert flow_target(torch.tensor([1.0, 2.0]), torch.tensor([0.5, 3.0])).tolist() == [0.5, -1.0]


def test_prediction_types():
    pred, xt, sig = torch.full((2, 1, 1, 1), 2.0), torch.full((2, 1, 1, 1), 5.0), torch.tensor([0.25, 0.5])
    out, w = apply_model_prediction_type(pred, xt, sig, settings(model_prediction_type="raw"))
    assert torch.equal(out, pred) and w is None
    out, w = apply_model_prediction_type(pred, xt, sig, settings(model_prediction_type="additive"))
    assert out.flatten().tolist() == [7.0, 7.0] and w is None
    # sigma_scaled: 2·(−σ) + 5 -> 4.5, 4.0; uniform weighting -> ones
    out, w = apply_model_prediction_type(pred, xt, sig, settings())
    assert out.flatten().tolist() == [4.5, 4.0] and w.shape == (2, 1, 1, 1) and w.flatten().tolist() == [1.0, 1.0]
    # sigma_sqrt weighting through sigma_scaled: σ⁻² = 16, 4
    _, w = apply_model_prediction_type(pred, xt, sig, settings(weighting_scheme="sigma_sqrt"))
    assert w.flatten().tolist() == pytest.approx([16.0, 4.0])


@pytest.mark.parametrize("scheme,sigma,expected", [
    ("sigma_sqrt", 0.5, 4.0),                                  # 0.5⁻²
    ("sigma_sqrt", 0.1, 100.0),                                # 0.1⁻²
    ("cosmap", 0.5, 2 / (math.pi * 0.5)),                      # 1 - 1 + 0.5 = 0.5 -> 4/π
    ("cosmap", 0.0, 2 / math.pi),                              # 1 - 0 + 0 = 1
    ("cosmap", 0.25, 2 / (math.pi * 0.625)),                   # 1 - 0.5 + 0.125 = 0.625
    ("uniform", 0.3, 1.0), ("none", 0.3, 1.0), ("logit_normal", 0.3, 1.0), ("mode", 0.3, 1.0),
])
def test_loss_weighting_values(scheme, sigma, expected):
    assert compute_loss_weighting(scheme, torch.tensor([sigma])).item() == pytest.approx(expected, rel=1e-6)


def test_guidance_vector():
    g = guidance_vector(settings(guidance_scale=1.0), 3, "cpu", torch.bfloat16)
    assert g.dtype == torch.bfloat16 and g.tolist() == [1.0, 1.0, 1.0]


# --- losses -----------------------------------------------------------------------------------------------------

def test_l1_l2_and_reductions():
    pred, target = torch.tensor([1.0, -2.0], dtype=torch.bfloat16), torch.tensor([0.0, 1.0])
    l2 = conditional_loss(pred, target, "l2")
    assert l2.dtype == torch.float32 and l2.tolist() == [1.0, 9.0]
    assert conditional_loss(pred, target, "l1").tolist() == [1.0, 3.0]
    assert conditional_loss(pred, target, "l2", reduction="mean").item() == 5.0
    assert conditional_loss(pred, target, "l2", reduction="sum").item() == 10.0
    with pytest.raises(ValueError):
        conditional_loss(pred, target, "l3")


@pytest.mark.parametrize("c", [0.1, 0.5, 1.0, 2.0])
def test_huber_and_smooth_l1_closed_form(c):
    d = [0.0, 0.3, -1.0, 4.0]
    pred, target = torch.tensor(d), torch.zeros(4)
    smooth = [2 * (math.sqrt(x * x + c * c) - c) for x in d]  # 2(√(d²+c²) − c)
    assert conditional_loss(pred, target, "smooth_l1", c).tolist() == pytest.approx(smooth, rel=1e-5, abs=1e-7)
    assert conditional_loss(pred, target, "huber", c).tolist() == pytest.approx([c * v for v in smooth],
                                                                                rel=1e-5, abs=1e-7)
    # the pseudo-Huber shape: ≈ d² near 0 (huber ≈ c·d²/c = d²) and ≈ 2c|d| far away
    if c >= 1.0:
        assert conditional_loss(torch.tensor([0.01]), torch.zeros(1), "huber", c).item() == \
            pytest.approx(1e-4, rel=1e-2)


def test_huber_needs_c_and_broadcasts_per_sample():
    with pytest.raises(ValueError, match="Huber c"):
        conditional_loss(torch.ones(1), torch.zeros(1), "huber")
    c = torch.tensor([0.5, 2.0]).view(2, 1, 1, 1)
    loss = conditional_loss(torch.ones(2, 1, 1, 2), torch.zeros(2, 1, 1, 2), "huber", c)
    # d = 1: 2c(√(1+c²) − c): c=0.5 -> 1.0·(√1.25 − 0.5); c=2 -> 4·(√5 − 2)
    assert loss[:, 0, 0, 0].tolist() == pytest.approx([math.sqrt(1.25) - 0.5, 4 * (math.sqrt(5) - 2)], rel=1e-6)


def test_huber_schedules():
    sig = torch.tensor([0.0, 0.25, 0.5, 1.0])
    c = huber_c_for(settings(huber_schedule="constant", huber_c=0.1, huber_scale=2.0), sig)
    assert c.shape == (4, 1, 1, 1) and c.flatten().tolist() == pytest.approx([0.2] * 4)
    # exponential: m·c0^σ = 2·0.1^σ -> 2, 2·0.1^0.25 = 1.12468, 2·0.1^0.5 = 0.63246, 0.2
    c = huber_c_for(settings(huber_schedule="exponential", huber_c=0.1, huber_scale=2.0), sig)
    assert c.flatten().tolist() == pytest.approx([2.0, 2 * 0.1 ** 0.25, 2 * 0.1 ** 0.5, 0.2], rel=1e-6)
    # same as sd-scripts' exp(−α·t)·m with α = −ln(0.1)/1000 and t = 1000σ
    assert c[2].item() == pytest.approx(math.exp(math.log(0.1) / 1000 * 500) * 2.0, rel=1e-6)
    # snr: m·(c0 + (1 − c0)(1 − σ)²) = 0.1 + 0.9(1 − σ)²: 1.0, 0.1 + 0.9·0.5625 = 0.60625, 0.325, 0.1
    c = huber_c_for(settings(), sig)
    assert c.flatten().tolist() == pytest.approx([1.0, 0.60625, 0.325, 0.1], rel=1e-6)
    # equals the SD form (1 − c0)/(1 + r)² + c0 with r = √(1/snr) = σ/(1 − σ), snr = (1 − σ)²/σ², at σ = 0.25
    r = math.sqrt(1 / ((0.75 ** 2) / (0.25 ** 2)))
    assert c[1].item() == pytest.approx(0.9 / (1 + r) ** 2 + 0.1, rel=1e-6)


# --- reduction --------------------------------------------------------------------------------------------------

def test_reduce_loss_plain_and_weighted():
    loss = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 20.0, 30.0, 40.0]).view(2, 1, 2, 2)
    assert reduce_loss(loss).item() == pytest.approx((2.5 + 25.0) / 2)  # per-sample means 2.5 and 25
    w = torch.tensor([2.0, 0.5]).view(2, 1, 1, 1)
    # 2.5·2 = 5, 25·0.5 = 12.5; × loss_weights (1, 2) -> 5, 25 -> mean 15
    assert reduce_loss(loss, weighting=w, loss_weights=torch.tensor([1.0, 2.0])).item() == pytest.approx(15.0)


def test_reduce_loss_with_mask_area_interpolated():
    loss = torch.ones(2, 2, 2, 2)
    loss[1] = 4.0
    # a 4x4 mask per sample, area-averaged onto the 2x2 latent: each latent cell is the mean of a 2x2 block
    mask = torch.zeros(2, 4, 4)
    mask[0, :2, :2] = 1.0  # top-left block only -> cells (1, 0, 0, 0) -> mean 0.25
    mask[1, :, :2] = 0.5  # left half at 0.5 -> cells (0.5, 0, 0.5, 0) -> mean 0.25, × loss 4 -> 1.0
    # sample 0: 0.25 × weight 2 = 0.5; sample 1: 1.0 × weight 1 = 1.0; batch mean 0.75
    got = reduce_loss(loss, mask=mask, loss_weights=torch.tensor([2.0, 1.0]))
    assert got.item() == pytest.approx(0.75)
    # a (B,1,H,W) mask gives the same
    assert reduce_loss(loss, mask=mask[:, None], loss_weights=torch.tensor([2.0, 1.0])).item() == pytest.approx(0.75)


def test_end_to_end_step_math():
    """One training step's math on a tiny batch: perfect velocity prediction has zero loss with raw."""
    s = settings(model_prediction_type="raw", timestep_sampling="shift", loss_type="huber")
    x0, eps = torch.randn(2, 16, 4, 4, generator=gen(13)), torch.randn(2, 16, 4, 4, generator=gen(14))
    sig = sample_sigmas(s, 2, generator=gen(15))
    xt = noisy_input(x0, eps, sig, s)
    target = flow_target(eps, x0)
    pred, w = apply_model_prediction_type(target.clone(), xt, sig, s)
    loss = reduce_loss(conditional_loss(pred, target, s.loss_type, huber_c_for(s, sig)), w)
    assert loss.item() == 0.0
    # x_t − σ·v recovers x0
    assert torch.allclose(xt - sig.view(-1, 1, 1, 1) * target, x0, atol=1e-5)
