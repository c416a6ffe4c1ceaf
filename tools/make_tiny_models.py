"""Write random-initialised tiny FLUX.1 components in the real file formats, plus tokenizers, for offline runs.

    python tools/make_tiny_models.py --out tiny_models

writes tiny_models/flux.safetensors (BFL keys), ae.safetensors, clip_l.safetensors, t5xxl.safetensors and
tokenizers/ in the --tokenizer_cache_dir layout, so every CLI runs through the real loading code:

    python flux_minimal_inference.py --ckpt_path tiny_models/flux.safetensors --ae tiny_models/ae.safetensors \
        --clip_l tiny_models/clip_l.safetensors --t5xxl tiny_models/t5xxl.safetensors \
        --tokenizer_cache_dir tiny_models/tokenizers --dtype fp32 --width 64 --height 64 --steps 4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Write tiny random FLUX.1 model files and tokenizers for tests.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--preset", default="tiny", choices=["tiny", "tiny-schnell"],
                   help="transformer preset: tiny (dev-like, guidance embedder) or tiny-schnell")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: %(default)s)")
    p.add_argument("--dtype", default="fp32", help="dtype of the stored weights (default: %(default)s)")
    return p


def make_tiny_models(out: str | Path, preset: str = "tiny", seed: int = 0, dtype: str = "fp32") -> dict[str, Path]:
    """Write the tiny components into `out`; returns their paths by role."""
    from dataclasses import replace

    import torch
    from transformers import CLIPTextModel, T5EncoderModel

    from library.dtypes import str_to_dtype
    from library.flux_ae import AE_PRESETS, AutoEncoder
    from library.flux_models import FLUX_PRESETS, Flux
    from library.safetensors_io import save_file_atomic
    from library.text_encoders import save_clip_l, save_t5xxl, tiny_clip_config, tiny_t5_config
    from library.tokenizer_loading import write_tiny_tokenizers

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = str_to_dtype(dtype)
    torch.manual_seed(seed)
    vocab = write_tiny_tokenizers(out / "tokenizers")
    clip = CLIPTextModel(tiny_clip_config(vocab_size=vocab["clip"])).eval()
    t5 = T5EncoderModel(tiny_t5_config(vocab_size=vocab["t5"])).eval()
    params = replace(FLUX_PRESETS[preset], vec_in_dim=clip.config.hidden_size, context_in_dim=t5.config.d_model)
    flux = Flux(params)
    ae = AutoEncoder(AE_PRESETS["tiny"])
    paths = {part: out / f"{part}.safetensors" for part in ("flux", "ae", "clip_l", "t5xxl")}

    def cast(module):
        return {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in module.state_dict().items()}

    model_type = "flux-1-schnell" if params.guidance_embed is False else "flux-1-dev"
    save_file_atomic(cast(flux), paths["flux"], {"modelspec.architecture": model_type, "tiny": "true"})
    save_file_atomic(cast(ae), paths["ae"], {"tiny": "true"})
    save_clip_l(clip.to(torch_dtype), paths["clip_l"])
    save_t5xxl(t5.to(torch_dtype), paths["t5xxl"])
    paths["tokenizers"] = out / "tokenizers"
    return paths


def main(argv: list[str] | None = None) -> int:
    args = setup_parser().parse_args(argv)
    for role, path in make_tiny_models(args.out, args.preset, args.seed, args.dtype).items():
        print(f"{role:10s} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
