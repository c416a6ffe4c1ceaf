"""Flow-matching training math for FLUX.1: σ sampling, the forward process, prediction types, losses, reduction.

Plain functions over tensors, following sd-scripts' FLUX training (reference §6) with one deliberate fix: the Huber
schedules `snr` (sd-scripts' default) and `exponential` are defined for flow matching instead of raising.

Conventions: `x0` are latents (B, C, h, w), `noise` is ε ~ N(0, I), σ ∈ [0, 1] is the noise level (σ = 1 is pure
noise), `x_t = (1 − σ)·x0 + σ·ε`, the model predicts the velocity `ε − x0`, and the DiT's timestep input is σ itself
(sd-scripts' `timesteps / 1000`). All randomness comes from an explicit `torch.Generator` when one is given.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from library.flow.sampling import shift_mu, time_shift

NUM_TRAIN_TIMESTEPS = 1000

TIMESTEP_SAMPLINGS = ("sigma", "uniform", "sigmoid", "shift", "flux_shift")
WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none", "uniform")
MODEL_PREDICTION_TYPES = ("raw", "additive", "sigma_scaled")
LOSS_TYPES = ("l1", "l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")


@dataclass
class FlowMatchingSettings:
    """The training-math options, named as sd-scripts' command-line arguments (defaults are sd-scripts' defaults)."""

    timestep_sampling: str = "sigma"
    sigmoid_scale: float = 1.0
    discrete_flow_shift: float = 3.0
    weighting_scheme: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    model_prediction_type: str = "sigma_scaled"
    guidance_scale: float = 3.5
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False

    def __post_init__(self):
        for name, allowed in (("timestep_sampling", TIMESTEP_SAMPLINGS), ("weighting_scheme", WEIGHTING_SCHEMES),
                              ("model_prediction_type", MODEL_PREDICTION_TYPES), ("loss_type", LOSS_TYPES),
                              ("huber_schedule", HUBER_SCHEDULES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} {getattr(self, name)!r} is not one of {', '.join(allowed)}")

    @classmethod
    def from_args(cls, args) -> "FlowMatchingSettings":
        """Read the options from an argparse namespace (or any object); missing or None values take the defaults."""
        values = {}
        for field in dataclasses.fields(cls):
            value = getattr(args, field.name, None)
            values[field.name] = field.default if value is None else value
        return cls(**values)


# ---------------------------------------------------------------------------------------------------------------
# σ sampling (§6.1 - §6.3)


def seeded_generator(*parts) -> torch.Generator:
    """A CPU generator seeded by a hash of `parts` (joined with ':'). Hashing matters: generators seeded with
    consecutive integers give measurably correlated draws (a test LoRA learned worse), a hashed seed does not."""
    text = ":".join(str(p) for p in parts)
    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1)

def _draw(kind: str, batch_size: int, device, generator: torch.Generator | None) -> torch.Tensor:
    """`rand`/`randn` of shape (B,) in float32, drawn on the generator's device (else `device`), moved to `device`."""
    fn = torch.rand if kind == "rand" else torch.randn
    draw_device = generator.device if generator is not None else device
    return fn(batch_size, generator=generator, device=draw_device, dtype=torch.float32).to(device)


def discrete_sigma_table(shift: float = 3.0, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """The σ table of sd-scripts' `FlowMatchEulerDiscreteScheduler(1000, shift)`, float32, from σ=1 down.

    t_i = 1000, 999, ..., 1;  σ_i = s·(t_i/1000) / (1 + (s − 1)·(t_i/1000)).
    """
    t = torch.linspace(1, num_train_timesteps, num_train_timesteps, dtype=torch.float32).flip(0)
    s = t / num_train_timesteps
    return shift * s / (1 + (shift - 1) * s)


def timestep_density(settings: FlowMatchingSettings, batch_size: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """u ∈ [0, 1] per sample (CPU) from the --weighting_scheme density used by `sigma` sampling (§6.3).

    logit_normal: u = sigmoid(logit_mean + logit_std·z);  mode: u = 1 − u0 − mode_scale·(cos²(π·u0/2) − 1 + u0);
    anything else: u = u0 ~ U(0, 1).
    """
    if settings.weighting_scheme == "logit_normal":
        z = _draw("randn", batch_size, "cpu", generator).cpu()
        return torch.sigmoid(settings.logit_mean + settings.logit_std * z)
    u0 = _draw("rand", batch_size, "cpu", generator).cpu()
    if settings.weighting_scheme == "mode":
        return 1 - u0 - settings.mode_scale * (torch.cos(math.pi * u0 / 2) ** 2 - 1 + u0)
    return u0


def sample_sigmas(settings: FlowMatchingSettings, batch_size: int, device="cpu",
                  generator: torch.Generator | None = None, image_seq_len: int | None = None) -> torch.Tensor:
    """σ per sample (B,) float32 on `device`, for --timestep_sampling (§6.2).

    uniform: u;  sigmoid: sigmoid(k·z);  shift: p = sigmoid(k·z), σ = s·p / (1 + (s − 1)·p);
    flux_shift: σ = e^μ / (e^μ + 1/p − 1) with μ from `image_seq_len` (packed token count, (h//2)·(w//2));
    sigma: σ = table[floor(1000·u)] with u from `timestep_density` (clamped to the table; u = 1 can occur).
    The model's timestep input is σ (sd-scripts passes timesteps/1000 with timesteps = 1000·σ).
    """
    mode, k, s = settings.timestep_sampling, settings.sigmoid_scale, settings.discrete_flow_shift
    if mode == "sigma":
        u = timestep_density(settings, batch_size, generator)
        idx = (u * NUM_TRAIN_TIMESTEPS).long().clamp(0, NUM_TRAIN_TIMESTEPS - 1)
        return discrete_sigma_table(s)[idx].to(device)
    if mode == "uniform":
        return _draw("rand", batch_size, device, generator)
    p = torch.sigmoid(k * _draw("randn", batch_size, device, generator))
    if mode == "sigmoid":
        return p
    if mode == "shift":
        return s * p / (1 + (s - 1) * p)
    if image_seq_len is None:
        raise ValueError("--timestep_sampling flux_shift needs the image token count (image_seq_len)")
    return time_shift(shift_mu(image_seq_len), 1.0, p).float()


def packed_seq_len(latent_height: int, latent_width: int) -> int:
    """Packed image token count of a latent (h, w), as flux_shift uses it: (h // 2)·(w // 2)."""
    return (latent_height // 2) * (latent_width // 2)


# ---------------------------------------------------------------------------------------------------------------
# Forward process and model output (§6.4 - §6.6)

def _per_sample(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """σ (B,) or (B,1,1,1) -> (B, 1, ..., 1) to broadcast against `like`."""
    return sigmas.reshape(-1, *([1] * (like.ndim - 1)))


def noisy_input(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, settings: FlowMatchingSettings,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """x_t = (1 − σ)·x0 + σ·(ε + γ'·ξ) (§6.4); without --ip_noise_gamma, γ'·ξ is absent.

    ξ ~ N(0, I) like the latents; γ' = U(0,1)·γ (one scalar per batch) with --ip_noise_gamma_random_strength,
    else γ. ξ is drawn before the strength. Computed in the promoted dtype of the inputs (float32 for float32 σ);
    the caller casts to the weight dtype. The target stays ε − x0 (ξ is not part of it).
    """
    sig = _per_sample(sigmas, latents)
    if settings.ip_noise_gamma:
        draw_device = generator.device if generator is not None else latents.device
        xi = torch.randn(latents.shape, generator=generator, device=draw_device, dtype=torch.float32)
        xi = xi.to(device=latents.device, dtype=noise.dtype)
        gamma = settings.ip_noise_gamma
        if settings.ip_noise_gamma_random_strength:
            gamma = _draw("rand", 1, latents.device, generator).to(noise.dtype) * gamma
        noise = noise + gamma * xi
    return (1 - sig) * latents + sig * noise


def flow_target(noise: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """The velocity target ε − x0 (all prediction types)."""
    return noise - latents


def compute_loss_weighting(weighting_scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Loss weight per sample (§6.6): sigma_sqrt σ⁻²; cosmap 2 / (π·(1 − 2σ + 2σ²)); anything else 1."""
    if weighting_scheme == "sigma_sqrt":
        return (sigmas ** -2.0).float()
    if weighting_scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas ** 2))
    return torch.ones_like(sigmas)


def apply_model_prediction_type(model_pred: torch.Tensor, noisy_model_input: torch.Tensor, sigmas: torch.Tensor,
                                settings: FlowMatchingSettings) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prediction, weighting or None) for --model_prediction_type (§6.5).

    raw: pred; additive: pred + x_t; sigma_scaled: pred·(−σ) + x_t with the --weighting_scheme weighting (B,1,1,1).
    sigma_scaled (sd-scripts' default, kept for compatibility) compares an x0 estimate with the velocity target;
    sd-scripts' docs recommend raw.
    """
    mode = settings.model_prediction_type
    if mode == "raw":
        return model_pred, None
    if mode == "additive":
        return model_pred + noisy_model_input, None
    sig = _per_sample(sigmas, model_pred)
    return model_pred * (-sig) + noisy_model_input, compute_loss_weighting(settings.weighting_scheme, sig)


def guidance_vector(settings: FlowMatchingSettings, batch_size: int, device="cpu",
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The embedded-guidance input (B,) = --guidance_scale (schnell ignores it)."""
    return torch.full((batch_size,), float(settings.guidance_scale), device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# Loss (§6.7, §6.8)

def huber_c_for(settings: FlowMatchingSettings, sigmas: torch.Tensor) -> torch.Tensor:
    """Huber threshold c per sample (B, 1, 1, 1) float32 for --huber_schedule, defined for flow matching.

    With c0 = --huber_c and m = --huber_scale:
    * constant:    c = c0·m.
    * exponential: sd-scripts' c = exp(−α·t)·m with α = −ln(c0)/1000 and timestep t = 1000·σ, i.e. c = m·c0^σ:
                   m at σ = 0 (clean, L2-like), m·c0 at σ = 1 (pure noise, most robust).
    * snr:         sd-scripts' SD formula c = (1 − c0)/(1 + r)² + c0 with r = sqrt(1/snr) the noise-to-signal
                   ratio. For flow matching alpha_t = 1 − σ, sigma_t = σ, snr = (1 − σ)²/σ², so r = σ/(1 − σ),
                   1/(1 + r)² = (1 − σ)², and c = m·(c0 + (1 − c0)·(1 − σ)²): m at σ = 0, m·c0 at σ = 1
                   (the closed form needs no division, so σ = 0 and σ = 1 are fine).
    """
    sig = sigmas.reshape(-1, 1, 1, 1).float()
    c0, m = settings.huber_c, settings.huber_scale
    if settings.huber_schedule == "constant":
        return torch.full_like(sig, c0 * m)
    if settings.huber_schedule == "exponential":
        return m * torch.pow(torch.full_like(sig, c0), sig)
    if settings.huber_schedule == "snr":
        return m * (c0 + (1 - c0) * (1 - sig) ** 2)
    raise ValueError(f"unknown --huber_schedule {settings.huber_schedule!r}")


def conditional_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2",
                     huber_c: torch.Tensor | float | None = None, reduction: str = "none") -> torch.Tensor:
    """Element-wise loss in float32 (§6.7), then reduced ("none", "mean" or "sum").

    l2: d²;  l1: |d|;  huber: 2c·(sqrt(d² + c²) − c);  smooth_l1: 2·(sqrt(d² + c²) − c), with d = pred − target and
    c a float or a per-sample tensor that broadcasts (see `huber_c_for`).
    """
    diff = pred.float() - target.float()
    if loss_type == "l2":
        loss = diff ** 2
    elif loss_type == "l1":
        loss = diff.abs()
    elif loss_type in ("huber", "smooth_l1"):
        if huber_c is None:
            raise ValueError(f"--loss_type {loss_type} needs a Huber c (see huber_c_for)")
        c = torch.as_tensor(huber_c, dtype=torch.float32, device=diff.device)
        loss = 2 * (torch.sqrt(diff ** 2 + c ** 2) - c)
        if loss_type == "huber":
            loss = c * loss
    else:
        raise ValueError(f"unknown --loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction != "none":
        raise ValueError(f"unknown reduction {reduction!r}")
    return loss


def reduce_loss(loss: torch.Tensor, weighting: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                loss_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Scalar loss from the element-wise loss (B, C, h, w) (§6.8).

    loss × weighting (broadcast, e.g. (B,1,1,1)) × mask, where a mask (B, H, W) or (B, 1, H, W) is area-interpolated
    to (B, 1, h, w); then the mean over all non-batch dims, × per-sample `loss_weights` (B,), mean over the batch.
    """
    loss = loss.float()
    if weighting is not None:
        loss = loss * weighting.float()
    if mask is not None:
        mask = mask.float()
        if mask.ndim == loss.ndim - 1:
            mask = mask.unsqueeze(1)
        loss = loss * F.interpolate(mask.to(loss.device), size=loss.shape[2:], mode="area")
    loss = loss.mean(dim=tuple(range(1, loss.ndim)))
    if loss_weights is not None:
        loss = loss * loss_weights.to(device=loss.device, dtype=loss.dtype)
    return loss.mean()
