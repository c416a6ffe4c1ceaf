"""Render images with FLUX.1 (dev, Krea, schnell, Kontext) from the real model files, with sd-scripts' arguments.

    python flux_minimal_inference.py --ckpt_path flux1-dev.safetensors --clip_l clip_l.safetensors \
        --t5xxl t5xxl_fp16.safetensors --ae ae.safetensors --prompt "a cat" --seed 1 --output_dir out

Kontext edits reference images: `--model_type kontext --reference_image photo.png --prompt "make it winter"`
(library/flow/references.py: BFL's preferred sizes, the AE mean, the target at the reference's size).
ControlNets (sd-scripts or diffusers layout, several at once): `--controlnet CN --control_image edges.png`
(library/cli/controlnet_options.py, library/flow/control.py).
Canny/Depth (full models, or a BFL control LoRA in --lora_weights) take `--control_image` as their map, or compute it
with `--control_preprocessor canny|depth` (library/flow/canny_depth.py, library/cli/control_options.py).
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from library.formats.atomic_io import remove_stale_temporaries
from library.cli.controlnet_options import add_controlnet_arguments, control_specs
from library.cli.control_options import add_control_arguments, check_control_arguments
from library.cli.flex2_options import add_flex2_arguments, check_flex2_arguments
from library.cli.inpaint_options import add_inpaint_arguments, check_inpaint_arguments
from library.formats.command_line import ArgumentParser, non_negative_int, positive_int, seed_int

logger = logging.getLogger("flux_minimal_inference")
DTYPE_HELP = "bf16, fp16, fp32 or an fp8 type (fp8, fp8_e4m3fn, fp8_e5m2)"
# library/models/variants.py (no torch import here)
MODEL_TYPES = ["flux", "dev", "krea", "schnell", "kontext", "fill", "canny", "depth", "flex2", "chroma"]


def aspect_ratio(value: str) -> float:
    """`W:H` or a number (width / height) -> width / height."""
    try:
        w, _, h = value.partition(":")
        ratio = float(w) / float(h) if h else float(w)
    except (ValueError, ZeroDivisionError):
        ratio = 0.0
    if not 0.1 <= ratio <= 10:
        raise argparse.ArgumentTypeError(f"expected W:H or a ratio between 0.1 and 10, got {value!r}")
    return ratio


def setup_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="FLUX.1 text-to-image inference (sd-scripts compatible arguments).")
    p.add_argument("--ckpt_path", required=True,
                    help="FLUX.1 or Chroma transformer: BFL .safetensors (flux1-dev.safetensors), ComfyUI-prefixed, "
                         "fp8 or scaled fp8, a diffusers folder/file, or a .gguf file (pip install gguf)")
    p.add_argument("--clip_l", default=None, help="CLIP-L text encoder (clip_l.safetensors); not for Chroma")
    p.add_argument("--t5xxl", required=True, help="T5-XXL encoder (t5xxl_fp16.safetensors or an fp8 variant)")
    p.add_argument("--ae", required=True, help="autoencoder (ae.safetensors)")
    p.add_argument("--prompt", default="A photo of a cat", help="prompt (default: %(default)s)")
    p.add_argument("--negative_prompt", default=None,
                   help="negative prompt; used only with --cfg_scale other than 1 (true classifier-free guidance)")
    p.add_argument("--cfg_scale", type=float, default=None,
                   help="classifier-free guidance scale; 1 disables it (default: the model's: 1 for FLUX.1, 5.0 for "
                        "Chroma, whose negative prompt is then empty unless given)")
    p.add_argument("--model_type", default="flux", choices=MODEL_TYPES,
                   help="which model the file is: flux (default) recognises dev, schnell or Chroma from the keys and "
                        "Kontext/Krea from the file's ModelSpec metadata; name krea or kontext for a file without it")
    p.add_argument("--guidance", type=float, default=None,
                   help="embedded guidance scale (default: the model's: 3.5 dev, 4.5 Krea, 2.5 Kontext; schnell has "
                        "none)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="Euler steps (default: the model's: 50 dev and Krea, 30 Kontext, 4 schnell)")
    p.add_argument("--seed", type=seed_int, default=None, help="random seed (default: a random one, printed)")
    p.add_argument("--width", type=positive_int, default=None,
                   help="image width, rounded up to a multiple of 16 (default: the first reference image's size "
                        "with Kontext, else 1360; only --height given: the reference's aspect ratio)")
    p.add_argument("--height", type=positive_int, default=None,
                   help="image height, rounded up to a multiple of 16 (default: the first reference image's size "
                        "with Kontext, else 768)")
    p.add_argument("--aspect_ratio", type=aspect_ratio, default=None, metavar="W:H",
                   help="Kontext (BFL's option): a target of about 1 megapixel at this aspect ratio (e.g. 16:9 or "
                        "1.5), instead of the reference's size; --width/--height win over it")
    p.add_argument("--reference_image", nargs="+", default=[], metavar="IMG",
                   help="Kontext: reference image(s) to edit or take from, in order (needs a Kontext model: "
                        "--model_type kontext or a file whose metadata says so)")
    p.add_argument("--reference_resize", default="preferred", choices=["preferred", "none"],
                   help="preferred (default, BFL): resize each reference to the Kontext training size nearest its "
                        "aspect ratio (17 sizes of ~1 MP); none: keep its size, floored to multiples of 16")
    p.add_argument("--reference_layout", default="overlap", choices=["overlap", "columns"],
                   help="several references (Kontext was trained with one, so both are off-distribution): overlap "
                        "(default, DiffSynth) puts each at positions (1, 0, 0) onwards; columns places each one's "
                        "columns after the previous one's")
    p.add_argument("--dtype", default="bfloat16", help=f"dtype of every component unless set below: {DTYPE_HELP}")
    for part in ("flux", "clip_l", "t5xxl", "ae"):
        p.add_argument(f"--{part}_dtype", default=None, help=f"dtype of the {part} component (default: --dtype)")
    p.add_argument("--base_quantization", default=None, choices=["nf4", "int8", "fp8", "fp8_scaled"],
                   help="store the transformer's block weights quantized: nf4 or int8 (bitsandbytes, quantized while "
                        "loading, computing in --flux_dtype), fp8 (= --flux_dtype fp8)")
    p.add_argument("--apply_t5_attn_mask", action="store_true", help="mask T5 padding tokens in T5 and attention")
    p.add_argument("--t5xxl_max_token_length", type=positive_int, default=None,
                   help="T5 tokens (default: the model's: 256 for schnell, 512 otherwise)")
    p.add_argument("--tokenizer_cache_dir", default=None,
                   help="folder with tokenizers in sd-scripts' layout (openai_clip-vit-large-patch14, "
                        "google_t5-v1_1-xxl); hub downloads are saved there")
    p.add_argument("--clip_l_tokenizer", default=None,
                   help="CLIP tokenizer folder or hub id (default: openai/clip-vit-large-patch14)")
    p.add_argument("--t5xxl_tokenizer", default=None,
                   help="T5 tokenizer folder or hub id (default: google/t5-v1_1-xxl)")
    p.add_argument("--lora_weights", nargs="*", default=[],
                   help="LoRA files to apply, each `path` or `path;multiplier` (kohya/sd-scripts, diffusers/PEFT, "
                        "ai-toolkit, ComfyUI, ...: auto-detected, docs/lora_formats.md)")
    p.add_argument("--merge_lora_weights", action="store_true",
                   help="merge the LoRAs into the weights (faster steps; multipliers fixed) instead of hooking them")
    p.add_argument("--dequantize_merged_layers", action="store_true",
                   help="with --base_quantization nf4/int8 and --merge_lora_weights: dequantize the layers the LoRAs "
                        "change to --flux_dtype and merge into them (otherwise the merge is refused)")
    p.add_argument("--offload", action="store_true",
                   help="keep models on the CPU and move each to the GPU only while it runs")
    p.add_argument("--blocks_to_swap", type=non_negative_int, default=0,
                   help="keep the weights of N transformer blocks in CPU memory and stream them to the device as "
                        "they are needed (1 to 35 for FLUX.1: N // 2 double and (N - N // 2) * 2 single blocks); "
                        "combines with --offload for the text encoders and autoencoder")
    p.add_argument("--fp8_matmul", action="store_true",
                   help="with an fp8 --flux_dtype: compute its Linears with torch._scaled_mm on GPUs of compute "
                        "capability 8.9+ (activations quantised to fp8; faster, slightly less exact); elsewhere the "
                        "weights are upcast as without it (the log says which)")
    p.add_argument("--tiled_ae", action="store_true", help="decode in tiles to cap memory for large images")
    p.add_argument("--device", default=None, help="compute device (default: cuda if available, else cpu)")
    p.add_argument("--output_dir", default=".", help="folder for the PNG files (default: current folder)")
    p.add_argument("--output_latents", action="store_true",
                   help="also write the final latents (16 x H/8 x W/8, before decoding) beside each PNG as "
                        "<name>_latents.safetensors")
    p.add_argument("--interactive", action="store_true",
                   help="read prompts from standard input, one per line, with options --w --h --s --d --g --n --c, "
                        "--m m1,m2 (LoRA multipliers) and --ri a.png;b.png (Kontext references; --ri - clears them)")
    add_inpaint_arguments(p)
    add_controlnet_arguments(p)
    add_flex2_arguments(p)
    add_control_arguments(p)
    return p


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


_floats.__name__ = "comma-separated list of numbers"


def _paths(text: str) -> tuple[str, ...]:
    paths = tuple(p.strip() for p in text.split(";") if p.strip())
    if not paths:
        raise ValueError(text)
    return paths


_paths.__name__ = "path or ;-separated paths (- for none)"
INTERACTIVE_OPTIONS = {"w": ("width", positive_int), "h": ("height", positive_int), "s": ("steps", positive_int),
                       "d": ("seed", seed_int), "g": ("guidance", float), "n": ("negative_prompt", str),
                       "c": ("cfg_scale", float), "m": ("lora_multipliers", _floats),
                       "ri": ("reference_images", _paths)}


def parse_interactive_line(line: str, settings):
    """Apply `prompt --w 1024 --h 768 --s 20 --d 42 --g 3.5 --n negative --c 2.0 --ri a.png` to `settings` (a
    GenerationSettings); width, height, steps, guidance, cfg and reference images persist, seed and negative prompt
    reset unless given (`--n -` clears the negative prompt, `--ri -` the references). Returns the new settings or
    raises ValueError."""
    from dataclasses import replace

    parts = line.split("--")
    updates = {"prompt": parts[0].strip(), "seed": None, "negative_prompt": None}
    for part in parts[1:]:
        letter, _, value = part.strip().partition(" ")
        if letter not in INTERACTIVE_OPTIONS:
            raise ValueError(f"unknown option --{letter}; use --w --h --s --d --g --n --c --m --ri")
        name, kind = INTERACTIVE_OPTIONS[letter]
        value = value.strip()
        try:
            if value == "-" and name in ("negative_prompt", "reference_images"):
                updates[name] = None if name == "negative_prompt" else ()
            else:
                updates[name] = kind(value)
        except argparse.ArgumentTypeError as e:  # the command line's checks: "must be 1 or more, got 0"
            raise ValueError(f"--{letter} {e}") from None
        except ValueError:
            raise ValueError(f"--{letter} needs a {kind.__name__}, got {value!r}") from None
    if not updates["prompt"]:
        raise ValueError("empty prompt")
    return replace(settings, **updates)


def base_quantization(args, flux_dtype) -> str | None:
    """--base_quantization checked against --flux_dtype: None, "nf4", "int8", "fp8" or "fp8_scaled"."""
    from library.formats.dtypes import is_fp8  # imports torch: after parsing

    quant = args.base_quantization
    if quant in ("fp8", "fp8_scaled") and args.flux_dtype is not None and not is_fp8(flux_dtype):
        raise ValueError(f"--base_quantization {quant} and --flux_dtype {args.flux_dtype} contradict each other")
    if quant in ("nf4", "int8") and is_fp8(flux_dtype):
        raise ValueError(f"--base_quantization {quant} computes in --flux_dtype, which cannot be fp8 "
                         f"({args.flux_dtype or args.dtype}); give bf16, fp16 or fp32")
    return quant


def fill_canvas(args, variant):
    """FLUX.1 Fill's canvas from --image, --mask_image and --outpaint, with the one-line refusals."""
    from library.flow.fill import check_fill_arguments, load_fill_canvas

    check_fill_arguments(args, variant)
    return load_fill_canvas(args.image, args.mask_image, args.outpaint)


def main(argv: list[str] | None = None) -> int:
    from library.cli.main import tool_main  # after the parser is built: --help never imports torch

    return tool_main(setup_parser(), run, argv)


def run(args) -> int:
    import torch

    # the ControlNet passes (library/cli/controlnet_options.py); a --control_image without --controlnet is
    # Flex.2's own control picture, checked once the model is known (check_flex2_arguments)
    specs = control_specs(args) if args.controlnet or not args.control_image else []
    for path in args.reference_image:  # before anything loads
        if not Path(path).is_file():
            raise ValueError(f"--reference_image {path}: file not found")

    from library import flux_utils  # the heavy modules (torch) load after parsing: --help stays fast
    from library.formats.dtypes import is_fp8, str_to_dtype
    from library.memory.block_swap import (enable_flux_block_swap, move_to_device_except_swap_blocks,
                                           split_blocks_to_swap)
    from library.flow.generation import FluxModels, GenerationSettings, Placement, generate, png_text, save_png, \
        unique_path
    from library.models.variants import resolve_variant
    from library.lora.control import find_control_lora

    remove_stale_temporaries(args.output_dir)  # PNGs of a run killed while writing (not its subfolders: maybe ".")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    base = str_to_dtype(args.dtype)
    compute = torch.bfloat16 if is_fp8(base) else base
    dtypes = {part: str_to_dtype(getattr(args, f"{part}_dtype"), base) for part in ("flux", "clip_l", "t5xxl", "ae")}
    quant = base_quantization(args, dtypes["flux"])
    if quant in ("fp8", "fp8_scaled"):
        dtypes["flux"] = torch.float8_e4m3fn
    load_device = "cpu" if args.offload else device

    info = flux_utils.analyze_checkpoint(args.ckpt_path)  # checks the file before anything heavy
    logger.info(f"transformer: {info.layout} layout, {info.model_type}, {info.params.depth} double + "
                f"{info.params.depth_single_blocks} single blocks, stored as {', '.join(sorted(info.dtypes))}")
    control_lora = find_control_lora(args.lora_weights)  # a BFL Canny/Depth LoRA makes dev a 128-feature model
    if control_lora and (info.family, info.params.in_channels, info.params.guidance_embed) != ("flux", 64, True):
        raise ValueError(f"{control_lora[0]} is a control LoRA for FLUX.1-dev; {args.ckpt_path} is not dev-like")
    variant = resolve_variant(args.model_type, has_guidance_input=info.params.guidance_embed, family=info.family,
                              in_channels=128 if control_lora else info.params.in_channels,
                              metadata=control_lora[1] if control_lora else info.metadata,
                              source=f"{args.ckpt_path} + {control_lora[0]}" if control_lora else args.ckpt_path)
    if variant.family == "flux" and not args.clip_l:
        raise ValueError(f"--clip_l is required for {variant.name} (only Chroma has no CLIP-L input)")
    apply_t5_attn_mask = args.apply_t5_attn_mask or variant.t5_attn_mask
    if apply_t5_attn_mask and not args.apply_t5_attn_mask:
        logger.info(f"{variant.name}: T5 padding is masked (--apply_t5_attn_mask is implied for it)")
    logger.info(f"model: {variant.name} ({variant.architecture}); defaults: {variant.steps} steps, guidance "
                f"{variant.guidance}, {'shifted' if variant.shift else 'unshifted'} schedule")
    from library.flow.control import control_png_text, controlled_flux, inpainting_controlnet, picture_size

    inpaint_cn = not variant.inpaint and inpainting_controlnet(args.controlnet)  # alimama's: inside --image only
    check_inpaint_arguments(args, f"{args.ckpt_path} ({variant.name})", variant.inpaint or inpaint_cn)
    flex2 = variant.name == "flex2"  # Flex.2 reads --control_image and --image/--mask_image itself
    if not flex2 and not variant.control and args.control_image and not args.controlnet:
        control_specs(args)  # its one-line error: --control_image needs --controlnet
    check_flex2_arguments(args, f"{args.ckpt_path} ({variant.name})", flex2, flex2 or bool(variant.control))
    check_control_arguments(args, variant.control, f"{args.ckpt_path} ({variant.name})")
    canvas = fill_canvas(args, variant) if variant.inpaint and not flex2 else None  # files checked early
    flex_inputs = None
    if flex2:  # library/flow/flex2.py: the files loaded before the models
        from library.flow.flex2 import Flex2Inputs, bind_with_defaults

        flex_inputs = Flex2Inputs.load(args.control_image[0] if args.control_image else None, args.image,
                                       args.mask_image, args.outpaint)
    if inpaint_cn and args.outpaint is not None:
        raise ValueError("--outpaint needs a FLUX.1 Fill model: an inpainting ControlNet repaints inside --image")
    if args.reference_image and not variant.reference_images:
        raise ValueError(f"--reference_image needs a Kontext model, but {args.ckpt_path} is {variant.name} (keys and "
                         f"metadata); give --model_type kontext if it is FLUX.1 Kontext")
    if variant.reference_images and not args.reference_image:
        logger.info("Kontext without --reference_image: plain text-to-image (give reference images to edit them)")
    if args.blocks_to_swap:
        from library.memory.gguf_linear import check_swappable_gguf

        split_blocks_to_swap(args.blocks_to_swap, info.params.depth, info.params.depth_single_blocks)
        check_swappable_gguf(info)
    tokenizer = flux_utils.load_tokenizer(args.tokenizer_cache_dir, info.is_schnell,
                                          args.t5xxl_max_token_length or variant.t5_max_length,
                                          args.clip_l_tokenizer, args.t5xxl_tokenizer)
    loaded = {}
    if variant.family == "chroma":  # T5 only: a weightless stand-in gives the zeros the encoding passes along
        from library.models.chroma import NoCLIP

        loaded["clip_l"] = NoCLIP(compute).to(load_device)
    parts = [("clip_l", args.clip_l)] if "clip_l" not in loaded else []
    for part, path in (*parts, ("t5xxl", args.t5xxl), ("ae", args.ae), ("flux", args.ckpt_path)):
        logger.info(f"loading {part} from {path} as {dtypes[part]}")
        swapped = part == "flux" and args.blocks_to_swap
        flux_part = part == "flux"
        loaded[part] = flux_utils.load_for_compute(part, path, dtypes[part], "cpu" if swapped else load_device,
                                                   compute, info=info if flux_part else None,
                                                   fp8_matmul=args.fp8_matmul,
                                                   quantization=quant if flux_part and quant != "fp8" else None,
                                                   quantize_device=device if device.type == "cuda" else "cpu")
    models = FluxModels(loaded["flux"], loaded["ae"], loaded["clip_l"], loaded["t5xxl"], tokenizer,
                        variant, compute if is_fp8(dtypes["flux"]) else dtypes["flux"])
    placement = Placement(device, args.offload)
    from library.lora.loading import apply_loras

    # hooked LoRAs live on the compute device (they are small and never offloaded)
    networks = apply_loras(args.lora_weights, loaded["flux"], loaded["clip_l"], loaded["t5xxl"],
                           args.merge_lora_weights, device, args.dequantize_merged_layers)
    if args.blocks_to_swap:  # after merging: the swapped weights' CPU copies are their masters
        move_to_device_except_swap_blocks(loaded["flux"], device)
        enable_flux_block_swap(loaded["flux"], args.blocks_to_swap, device, "cpu", host_to_device_only=True)
    from library.flow.references import ReferenceEncoder, bind_references, target_size
    from library.flow.canny_depth import bind_control, bind_control_image, control_encoder_for

    if variant.control:  # Canny/Depth: the control latents are bound per render (library/flow/canny_depth.py)
        models.flux = bind_control(models.flux, None)
        control = control_encoder_for(args.control_preprocessor, args.depth_model, loaded["ae"], placement)

    if canvas is not None:  # FLUX.1 Fill: the picture's condition features, encoded once
        from library.flow.fill import encode_fill

        models.flux = encode_fill(models.flux, loaded["ae"], canvas, placement, args.tiled_ae)
    if variant.reference_images:
        models.flux = bind_references(models.flux, None)  # bound to each render's references
    kontext = models.flux  # bound below (with ControlNets, inside them: they steer the target tokens only)
    if specs:
        # beside a block-swapped transformer (never moved by --offload) the ControlNets live on the device too
        models.flux, lines = controlled_flux(models.flux, specs, info.params, models.compute_dtype,
                                             device if args.blocks_to_swap else load_device, loaded["ae"], placement,
                                             args.mask_image)
        for line in lines:
            logger.info(line)
    size = picture_size(args.image) if inpaint_cn and args.image and not (args.width or args.height) else (None,) * 2
    settings = GenerationSettings(prompt=args.prompt, width=args.width or size[0], height=args.height or size[1],
                                  steps=args.steps,
                                  guidance=args.guidance, seed=0, negative_prompt=args.negative_prompt,
                                  cfg_scale=args.cfg_scale if args.cfg_scale is not None else variant.cfg_scale,
                                  reference_images=tuple(args.reference_image))
    references = ReferenceEncoder(loaded["ae"], args.reference_resize, args.reference_layout, placement)

    def with_references(s: GenerationSettings):
        """Bind the references of `s` (Kontext) and give it its target size; returns (settings, text records)."""
        if s.reference_images and not variant.reference_images:
            raise ValueError(f"--ri needs a Kontext model, but {args.ckpt_path} is {variant.name}")
        refs = references(s.reference_images)
        if variant.reference_images:
            bind_references(kontext, refs)
        if flex_inputs is not None:  # Flex.2: the condition of this size and schedule bound
            return bind_with_defaults(models, s, flex_inputs, placement, args.control_strength, args.control_stop,
                                      args.bypass_guidance_embedding)
        if canvas is not None:  # Fill renders at its canvas's size
            return replace(s, width=canvas.size[0], height=canvas.size[1]), canvas.png_text()
        width, height = target_size(s.width, s.height, refs, args.aspect_ratio)
        return replace(s, width=width, height=height), refs.png_text() if refs else {}

    def render(s: GenerationSettings) -> Path:
        if s.lora_multipliers is not None:
            if len(s.lora_multipliers) != len(networks):
                raise ValueError(f"--m needs one multiplier per hooked LoRA ({len(networks)})")
            for network, m in zip(networks, s.lora_multipliers):
                network.set_multiplier(m)
        if s.seed is None:
            s.seed = random.randint(0, 2**32 - 1)
        if variant.control:  # before the references' rule: the output takes the control picture's size
            s = replace(s, **dict(zip(("width", "height"), bind_control_image(
                models.flux, control, args.control_image[0], s.width, s.height))))
        s, reference_text = with_references(s)
        width, height = s.output_size()
        if (width, height) != (s.width, s.height):
            logger.info(f"{s.width}x{s.height} is not a multiple of 16: the image will be {width}x{height}")
        logger.info(f"generating {width}x{height}, {s.resolved_steps(variant)} steps, seed {s.seed}")
        image, latents = generate(models, s, placement, apply_t5_attn_mask, args.tiled_ae, return_latents=True)
        path = unique_path(args.output_dir, datetime.now().strftime("%Y%m%d_%H%M%S"))
        resolved = replace(s, steps=s.resolved_steps(variant), guidance=s.resolved_guidance(variant))
        text = png_text(resolved, Path(args.ckpt_path).name)
        text.update(reference_text)
        if args.lora_weights:
            text["lora_weights"] = " ".join(args.lora_weights) + (" (merged)" if args.merge_lora_weights else "")
        text.update(control_png_text(specs))
        if variant.control:
            text.update(control_image=args.control_image[0], control_preprocessor=args.control_preprocessor)
        save_png(image, path, text)
        if args.output_latents:
            from library.formats.safetensors_io import save_file_atomic  # only with --output_latents

            save_file_atomic({"latents": latents[0].float().cpu()}, path.with_name(path.stem + "_latents.safetensors"),
                             {k: v for k, v in text.items() if k != "parameters"})
        logger.info(f"saved {path}")
        return path

    if not args.interactive:
        settings.seed = args.seed
        render(settings)
        return 0
    print("Enter a prompt with options --w --h --s --d --g --n --c --m --ri; an empty line quits.")
    for line in sys.stdin:
        if not line.strip():
            break
        try:
            settings = parse_interactive_line(line.strip(), settings)
            render(settings)
        except ValueError as e:
            print(f"error: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
