"""Write random-initialised tiny FLUX.1 components in the real file formats, plus tokenizers, for offline runs.

    python tools/make_tiny_models.py --out tiny_models

writes tiny_models/flux.safetensors (BFL keys), ae.safetensors, clip_l.safetensors, t5xxl.safetensors and
tokenizers/ in the --tokenizer_cache_dir layout, so every CLI runs through the real loading code:

    python flux_minimal_inference.py --ckpt_path tiny_models/flux.safetensors --ae tiny_models/ae.safetensors \
        --clip_l tiny_models/clip_l.safetensors --t5xxl tiny_models/t5xxl.safetensors \
        --tokenizer_cache_dir tiny_models/tokenizers --dtype fp32 --width 64 --height 64 --steps 4

`--gguf_type Q8_0` (or Q6_K, Q5_K, Q5_1, Q5_0, Q4_K, Q4_1, Q4_0, Q3_K, Q2_K, BF16, F16, F32) also writes the
transformer as tiny_models/flux-Q8_0.gguf, laid out as ComfyUI-GGUF's FLUX conversions are: BFL names, architecture
"flux", the block Linear weights quantized and everything else in F32 (see `gguf_tensors`). The gguf package
quantizes the simple types; the K-quants use tools/gguf_kquants.py (K-quants need a width of a multiple of 256,
`--hidden_size 256`: narrower rows stay F32).

`--model_type kontext` (or krea) writes the dev-keyed transformer with that model's ModelSpec architecture
(`modelspec.architecture: flux-1-kontext-dev`), so tests can show a variant recognised from the file's metadata;
`canny` / `depth` also widen img_in to the variant's 128 input features.
`--model_type flex2` writes a tiny Flex.2-like transformer: img_in taking Flex.2's 196 features (64 noisy + 132
condition features, library/models/flex2.py) and `flex-2-preview` as its architecture.
`--model_type chroma` writes tiny_models/flux.safetensors as a Chroma transformer instead, in lodestones' layout
(`distilled_guidance_layer.*`, no modulation Linears, no time/vector/guidance embedders); the other files are the same
(Chroma needs no CLIP-L, which is still written for the FLUX tests).

`--init trained-like` (with e.g. `--hidden_size 128`) writes models that behave structurally like trained ones, for
tests that check that training *learns* (see `init_trained_like_flux` and `init_trained_like_ae`); the default
`--init random` is plain PyTorch initialisation. `--fit_ae_steps N` (with trained-like) also trains the tiny AE as an
autoencoder on synthetic shapes (see `fit_ae`), so that decoded images are pictures rather than coloured noise.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

INITS = ("random", "trained-like")


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Write tiny random FLUX.1 model files and tokenizers for tests.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--preset", default="tiny", choices=["tiny", "tiny-schnell"],
                   help="transformer preset: tiny (dev-like, guidance embedder) or tiny-schnell")
    p.add_argument("--model_type", default=None,
                   choices=["dev", "krea", "kontext", "fill", "canny", "depth", "flex2", "chroma"],
                   help="with the tiny (dev-like) preset: the model named in the file's modelspec.architecture "
                        "(default: flux-1-dev, or flux-1-schnell for tiny-schnell); the weights are the same, "
                        "except the img_in of fill, canny/depth and flex2, which take 384, 128 and 196 features. "
                        "chroma: a tiny Chroma transformer instead (--preset is not used)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: %(default)s)")
    p.add_argument("--dtype", default="fp32", help="dtype of the stored weights (default: %(default)s)")
    p.add_argument("--init", default="random", choices=INITS,
                   help="random: PyTorch's default initialisation; trained-like: a transformer that passes the noisy "
                        "latent through to its output and an AE with a narrow posterior and unit-variance latents, "
                        "as trained models have (default: %(default)s)")
    p.add_argument("--hidden_size", type=int, default=None,
                   help="transformer width instead of the preset's (a multiple of its head size, 32); the number "
                        "of heads follows")
    p.add_argument("--fit_ae_steps", type=int, default=0,
                   help="with --init trained-like: train the AE (encoder and decoder) on synthetic flat-colour "
                        "shapes for this many steps first, so that it reconstructs images (800: recognisable shapes "
                        "and colours, ~2 min on 2 CPU cores; default: %(default)s, a random decoder)")
    p.add_argument("--gguf_type", default=None,
                   help="also write the transformer as flux-<TYPE>.gguf with its block weights in this GGUF type "
                        "(Q8_0, Q6_K, Q5_K, Q5_1, Q5_0, Q4_K, Q4_1, Q4_0, Q3_K, Q2_K, BF16, F16 or F32)")
    p.add_argument("--fp8_scaled", default=None, choices=["tensor", "channel"],
                   help="write the transformer as scaled fp8 (ComfyUI's layout) with a scale per tensor or per "
                        "output channel; its other tensors, and the other files, in --dtype")
    return p


GGUF_BLOCKS = ("double_blocks.", "single_blocks.")


def gguf_tensors(state_dict: dict, qtype: str) -> dict:
    """{name: (tensor, GGUF type)} as ComfyUI-GGUF converts FLUX: 2-D block weights in `qtype` when their rows hold
    whole blocks of it, every other tensor (biases, norm scales, embedders, final layer) in F32."""
    from library.formats.gguf_quants import gguf_type

    block = gguf_type(qtype).block_size
    def kept(key, v):  # keys may carry a prefix (model.diffusion_model.)
        return not (any(b in key for b in GGUF_BLOCKS) and v.dim() == 2 and v.shape[-1] % block == 0)

    return {k: (v, "F32" if kept(k, v) else qtype) for k, v in state_dict.items()}


def write_flux_gguf(state_dict: dict, path: str | Path, qtype: str, model_type: str) -> Path:
    """The transformer's `state_dict` as a .gguf file of `qtype` (gguf_tensors)."""
    from library.formats.gguf_io import write_gguf
    from tools.gguf_kquants import K_QUANTS, quantize_k

    tensors = {k: (quantize_k(t, ty), ty) if ty in K_QUANTS else (t, ty)  # the gguf package has no K encoders
               for k, (t, ty) in gguf_tensors(state_dict, qtype).items()}
    write_gguf(path, tensors, arch="flux", metadata={"modelspec.architecture": model_type})
    return Path(path)


def make_tiny_models(out: str | Path, preset: str = "tiny", seed: int = 0, dtype: str = "fp32",
                     init: str = "random", hidden_size: int | None = None, fit_ae_steps: int = 0,
                     gguf_type: str | None = None, fp8_scaled: str | None = None,
                     model_type: str | None = None) -> dict[str, Path]:
    """Write the tiny components into `out`; returns their paths by role (`flux_gguf` with `gguf_type`).

    `init` and `hidden_size` are for learning tests (see the module docstring); the defaults write exactly the files
    earlier versions wrote for the same seed. `model_type` ("dev", "krea", "kontext") names the variant in the
    transformer's metadata; the weights do not change. "chroma" writes a tiny Chroma transformer instead."""
    from dataclasses import replace

    import torch
    from transformers import CLIPTextModel, T5EncoderModel

    from library.formats.dtypes import is_fp8, str_to_dtype  # torch and transformers after parsing: fast --help
    from library.formats.fp8_scaled import quantize_state_dict_fp8_scaled
    from library.models.autoencoder import AE_PRESETS, AutoEncoder
    from library.models.chroma import CHROMA_PRESETS, Chroma
    from library.models.transformer import FLUX_PRESETS, Flux
    from library.formats.safetensors_io import save_file_atomic
    from library.models.text_encoders import save_clip_l, save_t5xxl, tiny_clip_config, tiny_t5_config
    from library.models.tokenizers import write_tiny_tokenizers
    from library.models.variants import VARIANTS

    if init not in INITS:
        raise ValueError(f"init {init!r} is not one of {', '.join(INITS)}")
    if fit_ae_steps and init != "trained-like":
        raise ValueError("fit_ae_steps needs init='trained-like'")
    if model_type not in (None, "chroma") and (model_type not in VARIANTS or VARIANTS[model_type].family != "flux"
                                               or not VARIANTS[model_type].has_guidance_input
                                               or preset == "tiny-schnell"):
        raise ValueError(f"model_type {model_type!r}: expected dev, krea or kontext with the tiny (dev-like) preset, "
                         "or fill, canny, depth, flex2, chroma")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = str_to_dtype(dtype)
    if fp8_scaled is not None and is_fp8(torch_dtype):
        raise ValueError(f"fp8_scaled quantises the transformer itself; --dtype {dtype} must be a float type")
    torch.manual_seed(seed)
    vocab = write_tiny_tokenizers(out / "tokenizers")
    clip = CLIPTextModel(tiny_clip_config(vocab_size=vocab["clip"])).eval()
    t5 = T5EncoderModel(tiny_t5_config(vocab_size=vocab["t5"])).eval()
    if model_type == "chroma":
        params = replace(CHROMA_PRESETS["tiny"], context_in_dim=t5.config.d_model)
    else:
        params = replace(FLUX_PRESETS[preset], vec_in_dim=clip.config.hidden_size, context_in_dim=t5.config.d_model)
    if hidden_size is not None:
        head_dim = params.head_dim
        if hidden_size <= 0 or hidden_size % head_dim:
            raise ValueError(f"hidden_size {hidden_size} is not a positive multiple of the head size {head_dim}")
        params = replace(params, hidden_size=hidden_size, num_heads=hidden_size // head_dim)
    if model_type not in (None, "chroma"):  # Fill, Canny/Depth, Flex.2: img_in's wider input (noisy + condition)
        params = replace(params, in_channels=VARIANTS[model_type].in_channels)
    flux = Chroma(params) if model_type == "chroma" else Flux(params)
    ae = AutoEncoder(AE_PRESETS["tiny"])
    if init == "trained-like":
        init_trained_like_flux(flux)
        if fit_ae_steps:
            fit_ae(ae, fit_ae_steps, seed)
        init_trained_like_ae(ae, seed, keep_decoding=bool(fit_ae_steps))
    paths = {part: out / f"{part}.safetensors" for part in ("flux", "ae", "clip_l", "t5xxl")}

    def cast(module):
        return {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in module.state_dict().items()}

    architecture = (VARIANTS[model_type].architecture if model_type is not None
                    else "flux-1-schnell" if params.guidance_embed is False else "flux-1-dev")
    flux_sd = (cast(flux) if fp8_scaled is None
               else quantize_state_dict_fp8_scaled(flux.state_dict(), fp8_scaled, other_dtype=torch_dtype))
    save_file_atomic(flux_sd, paths["flux"], {"modelspec.architecture": architecture, "tiny": "true"})
    if gguf_type:
        paths["flux_gguf"] = write_flux_gguf(cast(flux), out / f"flux-{gguf_type}.gguf", gguf_type, architecture)
    save_file_atomic(cast(ae), paths["ae"], {"tiny": "true"})
    save_clip_l(clip.to(torch_dtype), paths["clip_l"])
    save_t5xxl(t5.to(torch_dtype), paths["t5xxl"])
    paths["tokenizers"] = out / "tokenizers"
    return paths


CONDITION_GAIN = 0.5  # trained-like img_in: gain of the columns reading a model's condition features (beyond 64)


def init_trained_like_flux(flux) -> None:
    """Give the transformer the input/output structure of a trained flow model; the blocks keep their random init.

    A trained FLUX predicts the velocity v = ε − x0 from x_t = (1 − σ)·x0 + σ·ε, so at σ = 1 its output is the
    input noise minus the expected image: the noisy latent passes through the residual stream to the output. A LoRA
    (which cannot touch `img_in` or `final_layer`) only has to change *what* is generated, not learn that mechanism.
    With PyTorch's default init that path is missing and cannot be learnt by a LoRA: `final_layer.linear` is a random
    square matrix (64 -> 64 at the tiny width) with singular values down to ~0.01 and an RMS gain of ~0.58 behind a
    LayerNorm that fixes the norm of its input, so most velocities are unreachable whatever the blocks do (a LoRA
    then plateaus at a training loss of ~0.6-0.9 and samples only ~2x closer to its training image).

    Here `img_in` is Q (orthonormal columns, hidden x 64; a model with condition features reads them through further
    random orthogonal columns of gain CONDITION_GAIN) and `final_layer.linear` is Qᵀ (zero biases), and
    the final adaLN modulation is zero as in DiT's adaLN-zero (shift = scale = 0): with blocks contributing little,
    the output is Qᵀ·LayerNorm(Q·x_t) ≈ x_t / rms(x_t), the velocity of a model whose images sit at the origin
    (exact at σ = 1: v = ε). Use a hidden size above the 64 latent channels (e.g. 128): like FLUX's 3072 -> 64, the
    final projection then reads a subspace of a wider residual stream, so the LayerNorm does not pin the output norm,
    and 4 heads instead of 2 give the LoRA more position-dependent attention (RoPE) to place content with.
    """
    import torch

    with torch.no_grad():
        hidden, in_channels = flux.img_in.weight.shape
        out_channels = flux.final_layer.linear.weight.shape[0]
        q = torch.empty(hidden, out_channels)
        torch.nn.init.orthogonal_(q)
        flux.img_in.weight[:, :out_channels].copy_(q)
        if in_channels > out_channels:  # condition features (Fill, Canny/Depth, Flex.2): weaker random directions
            extra = torch.empty(hidden, in_channels - out_channels)
            torch.nn.init.orthogonal_(extra, gain=CONDITION_GAIN)
            flux.img_in.weight[:, out_channels:].copy_(extra)
        flux.img_in.bias.zero_()
        flux.final_layer.linear.weight.copy_(q[:, :out_channels].T)
        flux.final_layer.linear.bias.zero_()
        if isinstance(flux.final_layer.adaLN_modulation, torch.nn.Sequential):  # Chroma's comes from its approximator
            modulation = flux.final_layer.adaLN_modulation[-1]
            modulation.weight.zero_()
            modulation.bias.zero_()


# Relative width of the trained-like AE's posterior: std of a latent sample around its mean, in units of the
# latents' spread (scaled latents have unit variance). Trained AEs encode an image almost deterministically.
POSTERIOR_STD = 0.02


def init_trained_like_ae(ae, seed: int = 0, calibration_images: int = 8, keep_decoding: bool = False) -> None:
    """Give the AE a narrow posterior and zero-mean, unit-variance scaled latents, as the trained FLUX AE has.

    A trained AE encodes an image almost deterministically, and FLUX's fixed `scale_factor`/`shift_factor` were
    chosen so that its latents have zero mean and unit variance. The randomly initialised tiny encoder instead puts
    out log-variance ~0 (posterior std ~1 against means of std ~0.3): a sampled latent (what `--cache_latents_to_disk`
    stores) is then ~93% sampling noise, ~0.4 RMS after scaling, and "the training latents" would be a noise tensor
    rather than the image. Here the log-variance output is a constant giving a posterior std of POSTERIOR_STD in
    scaled units, and the mean output is rescaled and shifted, per channel, so that the scaled latents of a seeded
    batch of synthetic flat-colour images have mean 0 and variance 1 (calibrating the encoder to the fixed factors,
    the converse of how those factors are computed for a trained AE). The decoder is left as it is, unless
    `keep_decoding` (for a fitted AE): then `decoder.conv_in` absorbs the inverse of the per-channel affine change, so
    decode(encode(x)) stays what it was (up to the zero padding of `conv_in` at the borders), and the calibration
    images are `synthetic_shapes`, what it was fitted on (calibrated on the blocky images, the demo images' latents
    had std ~1.5 and a LoRA got only ~2x closer to them instead of 10-15x).
    """
    import torch

    p = ae.params
    conv = ae.encoder.conv_out
    z = conv.out_channels // 2
    g = torch.Generator().manual_seed(seed)
    n, size = calibration_images, 64
    if keep_decoding:  # a fitted AE: the kind of images it was fitted on
        images = synthetic_shapes(4 * n, size, g)
    else:  # blocky flat-colour images: random colours on a random coarse grid, upsampled without smoothing
        cells = torch.randint(2, 9, (n,), generator=g)
        images = torch.stack([
            torch.nn.functional.interpolate(torch.rand(1, 3, int(c), int(c), generator=g) * 2 - 1,
                                            size=(size, size), mode="nearest")[0] for c in cells])
    with torch.no_grad():
        mean = ae.encoder(images.to(ae.dtype))[:, :z].float()
        mu, std = mean.mean(dim=(0, 2, 3)), mean.std(dim=(0, 2, 3))
        # scaled = scale_factor * (gain * (mean - mu) + shift_factor - shift_factor): zero mean, unit variance
        gain = 1.0 / (p.scale_factor * std)
        conv.weight[:z] *= gain[:, None, None, None].to(conv.weight.dtype)
        conv.bias[:z] = (gain * (conv.bias[:z].float() - mu) + p.shift_factor).to(conv.bias.dtype)
        conv.weight[z:].zero_()
        conv.bias[z:] = 2 * math.log(POSTERIOR_STD / p.scale_factor)
        if keep_decoding:  # the decoder sees new = gain * (old - mu) + shift_factor; give it back old
            offset = p.shift_factor - gain * mu
            dec_in = ae.decoder.conv_in
            w = dec_in.weight.float()
            dec_in.bias += -(w * (offset / gain)[None, :, None, None]).sum(dim=(1, 2, 3)).to(dec_in.bias.dtype)
            dec_in.weight.copy_((w / gain[None, :, None, None]).to(dec_in.weight.dtype))


# Colours of tools/make_demo_dataset.py (and its background), among the random colours `fit_ae` draws shapes in
DEMO_COLOURS = ((220, 40, 40), (40, 180, 60), (40, 70, 220), (230, 200, 40), (245, 245, 240))


def synthetic_shapes(n: int, size: int, generator):
    """n images in [-1, 1]: a flat background with up to three circles or squares (random centres, radii 0.1-0.5 of
    the side); every colour is the demo dataset's palette or a uniformly random one, half and half."""
    import torch

    palette = torch.tensor(DEMO_COLOURS, dtype=torch.float32) / 127.5 - 1
    y, x = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")

    def colours():
        mixed = torch.where(torch.rand(n, 1, generator=generator) < 0.5,
                            palette[torch.randint(len(palette), (n,), generator=generator)],
                            torch.rand(n, 3, generator=generator) * 2 - 1)
        return mixed[:, :, None, None]

    images = colours().expand(n, 3, size, size).clone()
    for _ in range(3):
        colour = colours()
        cx, cy = torch.rand(2, n, 1, 1, generator=generator) * size
        r = (torch.rand(n, 1, 1, generator=generator) * 0.4 + 0.1) * size
        kind = torch.randint(3, (n, 1, 1), generator=generator)  # circle, square, none
        circle = (x - cx) ** 2 + (y - cy) ** 2 < r ** 2
        square = ((x - cx).abs() < r) & ((y - cy).abs() < r)
        mask = torch.where(kind == 0, circle, square & (kind == 1))
        images = torch.where(mask[:, None], colour, images)
    return images


def fit_ae(ae, steps: int, seed: int = 0, size: int = 32, batch: int = 8, lr: float = 2e-3) -> list[float]:
    """Train the whole tiny AE (encoder mean -> decoder, MSE) on `synthetic_shapes`, Adam with a one-cycle schedule;
    returns the losses. The demo images themselves are never shown to it.

    Fitting the decoder alone to the random encoder does not work in minutes (measured: no progress over 400 steps;
    the random encoder scrambles colour, and `decoder.norm_out` normalises each of its 32 channels on its own).
    Trained together, 800 steps at 32x32 (~140 s on 2 busy CPU cores) reconstruct the 64x64 demo images with MSE
    ~0.05-0.08 (in [-1, 1]): blurred edges, right shapes and colours."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    z = ae.params.z_channels
    opt = torch.optim.Adam(ae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    losses = []
    for _ in range(steps):
        images = synthetic_shapes(batch, size, g).to(ae.dtype)
        loss = torch.nn.functional.mse_loss(ae.decoder(ae.encoder(images)[:, :z]), images)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    ae.zero_grad(set_to_none=True)
    return losses


def main(argv: list[str] | None = None) -> int:
    args = setup_parser().parse_args(argv)
    for role, path in make_tiny_models(args.out, args.preset, args.seed, args.dtype, args.init,
                                       args.hidden_size, args.fit_ae_steps, args.gguf_type,
                                       args.fp8_scaled, args.model_type).items():
        print(f"{role:10s} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
