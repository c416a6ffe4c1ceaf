#!/usr/bin/env python
"""Merge FLUX.1 LoRAs (any layout) into checkpoints, or into one LoRA (sd-scripts' arguments; docs/lora_formats.md).

Into models -- the transformer is written with BFL names, one tensor at a time (peak RAM about one tensor plus the
LoRAs, whatever the model size):

    python networks/flux_merge_lora.py --flux_model flux1-dev.safetensors --save_to merged.safetensors \
        --models a.safetensors b.safetensors --ratios 1.0 0.5 --save_precision bf16

Into one LoRA (no model given): ranks concatenated (exact), or re-factorised to --new_rank by SVD:

    python networks/flux_merge_lora.py --save_to ab.safetensors --models a.safetensors b.safetensors --ratios 1 0.5
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.cli.main import tool_main  # noqa: E402 (imports follow the path set-up: runs as a script)
from library.formats.command_line import ArgumentParser, positive_int  # noqa: E402
from library.formats.dtypes import str_to_dtype  # noqa: E402
from library.formats.lora_formats import CLIP, FORMATS, T5, UNET, LoRAWeights, load_lora, save_lora  # noqa: E402
from library.formats.lycoris_weights import is_lycoris, read_lycoris  # noqa: E402
from library.formats.safetensors_io import load_tensors, read_header  # noqa: E402
from library.lora.merge import (WeightedLoRA, concat_loras, merge_into_file, merged_lora_metadata,  # noqa: E402
                                svd_merge_loras)

logger = logging.getLogger(__name__)
PRECISIONS = ["float", "fp32", "fp16", "bf16"]


def setup_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flux_model", default=None, help="FLUX transformer to merge into (BFL, ComfyUI or diffusers)")
    p.add_argument("--clip_l", default=None, help="CLIP-L file to merge lora_te1 modules into")
    p.add_argument("--t5xxl", default=None, help="T5-XXL file to merge lora_te3 modules into")
    p.add_argument("--save_to", required=True,
                   help="output: the merged transformer (with --flux_model) or the merged LoRA (no model given)")
    p.add_argument("--clip_l_save_to", default=None, help="output for the merged CLIP-L (needed with --clip_l)")
    p.add_argument("--t5xxl_save_to", default=None, help="output for the merged T5-XXL (needed with --t5xxl)")
    p.add_argument("--models", nargs="+", required=True, help="LoRA files, any supported layout")
    p.add_argument("--ratios", nargs="+", type=float, default=None, help="one multiplier per LoRA (default 1.0)")
    p.add_argument("--precision", default="float", choices=PRECISIONS,
                   help="dtype the updates are computed and added in (default float = fp32)")
    p.add_argument("--save_precision", default=None, choices=PRECISIONS + ["fp8", "fp8_e4m3fn", "fp8_e5m2"],
                   help="dtype of the written weights (default: each model tensor's stored dtype; LoRA: fp32)")
    p.add_argument("--fp8_scaled", default=None, choices=["tensor", "channel"],
                   help="write the merged transformer as scaled fp8 (ComfyUI's layout: float8_e4m3fn weights with a "
                        "float32 scale per tensor or per output channel); its other tensors in --save_precision")
    p.add_argument("--loading_device", default="cpu", help="accepted for sd-scripts compatibility (reads go to cpu)")
    p.add_argument("--working_device", default="cpu", help="device the updates are computed on")
    p.add_argument("--mem_eff_load_save", action="store_true",
                   help="accepted for sd-scripts compatibility: merging always streams tensor by tensor")
    p.add_argument("--diffusers", action="store_true",
                   help="accepted for sd-scripts compatibility: every LoRA layout is detected automatically")
    p.add_argument("--concat", action="store_true",
                   help="LoRA + LoRA: concatenate ranks (exact; the default here -- sd-scripts' summing of the "
                        "factors is not an exact merge and is not offered)")
    p.add_argument("--shuffle", action="store_true", help="with --concat: permute the rank order (no effect on the "
                   "update)")
    p.add_argument("--new_rank", type=positive_int, default=None,
                   help="LoRA + LoRA: re-factorise each module's summed update to this rank by SVD")
    p.add_argument("--clamp_quantile", type=float, default=1.0,
                   help="with --new_rank: clamp factors to this quantile of their absolute values (1 = off)")
    p.add_argument("--format", default="sd-scripts", choices=FORMATS, help="layout of a merged LoRA")
    p.add_argument("--no_metadata", action="store_true", help="write no metadata")
    return p


def _loras(args):
    ratios = args.ratios or [1.0] * len(args.models)
    if len(ratios) != len(args.models):
        raise ValueError(f"--ratios has {len(ratios)} values for {len(args.models)} --models")
    loras, first_meta = [], None
    for path, ratio in zip(args.models, ratios):
        if is_lycoris(read_header(path).keys):  # LoKr / LoHa / DoRA in kohya names
            modules, metadata, layout = read_lycoris(load_tensors(path)), read_header(path).metadata, "LyCORIS"
        else:
            modules, metadata, layout = load_lora(path)
        logger.info("%s: %s layout, %d modules, ratio %s", path, layout, len(modules), ratio)
        loras.append(WeightedLoRA(Path(path).name, modules, ratio))
        first_meta = metadata if first_meta is None else first_meta
    return loras, first_meta


def merge_into_models(args, loras) -> None:
    save_dtype = str_to_dtype(args.save_precision)
    compute = str_to_dtype(args.precision)
    jobs = [(args.flux_model, args.save_to, UNET), (args.clip_l, args.clip_l_save_to, CLIP),
            (args.t5xxl, args.t5xxl_save_to, T5)]
    for src, dst, prefix in jobs:
        if src is not None and dst is None:
            raise ValueError(f"--{'clip_l' if prefix == CLIP else 't5xxl'} needs "
                             f"--{'clip_l' if prefix == CLIP else 't5xxl'}_save_to")
    given = {prefix for src, _, prefix in jobs if src is not None}
    for lora in loras:
        left = {n.split("_")[0] + "_" + n.split("_")[1] for n in lora.modules} - given
        if left:
            logger.warning("%s: its %s modules are not merged (no model given for them)", lora.name,
                           "/".join(sorted(left)))
    for src, dst, prefix in jobs:
        if src is None:
            continue
        meta = None
        if prefix == UNET and not args.no_metadata:
            meta = {"modelspec.merged_from": ", ".join(f"{lora.name}:{lora.ratio}" for lora in loras)}
        merge_into_file(src, dst, loras, prefix, save_dtype, compute, args.working_device, meta,
                        args.fp8_scaled if prefix == UNET else None)
        logger.info("saved %s", dst)


def merge_to_lora(args, loras, first_meta) -> None:
    import torch


    if args.new_rank is not None:
        modules, errors = svd_merge_loras(loras, args.new_rank, args.clamp_quantile, args.working_device)
        worst = max(errors, key=errors.get)
        logger.info("SVD to rank %d: relative error mean %.3e, max %.3e (%s)", args.new_rank,
                    sum(errors.values()) / len(errors), errors[worst], worst)
    else:
        modules = concat_loras(loras)
        if args.shuffle:
            g = torch.Generator().manual_seed(0)
            for name, w in modules.items():
                perm = torch.randperm(w.rank, generator=g)
                modules[name] = LoRAWeights(w.down[perm], w.up[:, perm], w.alpha)
    meta = None if args.no_metadata else merged_lora_metadata(loras, modules, first_meta or {})
    save_lora(args.save_to, modules, args.format, meta, str_to_dtype(args.save_precision),
              hashes=meta is not None)
    logger.info("saved %s (%d modules)", args.save_to, len(modules))


def run(args) -> int:
    if Path(args.save_to).suffix.lower() != ".safetensors":
        raise ValueError(f"--save_to {args.save_to}: files are written as .safetensors only")
    if args.fp8_scaled and not args.flux_model:
        raise ValueError("--fp8_scaled writes a merged transformer: give --flux_model")
    if args.fp8_scaled and args.save_precision and args.save_precision.startswith("fp8"):
        raise ValueError(f"--fp8_scaled quantises the Linear weights itself; --save_precision {args.save_precision} "
                         "would store the other tensors in fp8: use bf16, fp16 or float")
    loras, first_meta = _loras(args)
    if args.flux_model or args.clip_l or args.t5xxl:
        if args.new_rank is not None or args.concat:
            raise ValueError("--new_rank/--concat merge LoRAs into one LoRA; they do not apply with a model")
        if not args.flux_model:
            raise ValueError("--save_to is the merged transformer: give --flux_model too, or leave out "
                             "--clip_l/--t5xxl to merge the LoRAs into one LoRA")
        merge_into_models(args, loras)
    else:
        merge_to_lora(args, loras, first_meta)
    return 0


def main(argv: list[str] | None = None) -> int:
    return tool_main(setup_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
