#!/usr/bin/env python
"""Extract a LoRA from a fine-tuned FLUX.1 transformer and its base by SVD (sd-scripts' arguments).

    python networks/flux_extract_lora.py --model_org flux1-dev.safetensors --model_tuned tuned.safetensors \
        --save_to extracted.safetensors --dim 16

Every double/single-block Linear whose weight differs becomes a module (up = U S, down = Vh, alpha = rank, so
scale 1); the relative reconstruction error ||dW - up @ down|| / ||dW|| of each module is logged (and written as
JSON with --error_report).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.cli.main import tool_main  # noqa: E402 (imports follow the path set-up: runs as a script)
from library.formats.command_line import ArgumentParser, positive_int  # noqa: E402
from library.formats.atomic_io import atomic_write  # noqa: E402
from library.formats.dtypes import str_to_dtype  # noqa: E402
from library.formats.lora_formats import FORMATS, save_lora  # noqa: E402
from library.lora.extract import extract_lora  # noqa: E402

logger = logging.getLogger(__name__)


def setup_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_org", required=True, help="base transformer (BFL, ComfyUI-prefixed or diffusers)")
    p.add_argument("--model_tuned", required=True, help="fine-tuned transformer of the same architecture")
    p.add_argument("--save_to", required=True, help="LoRA file to write (.safetensors)")
    p.add_argument("--dim", type=positive_int, default=4, help="rank of every module (capped at the weight's size)")
    p.add_argument("--clamp_quantile", type=float, default=0.99,
                   help="clamp up/down entries to this quantile of their absolute values (1 = no clamping)")
    p.add_argument("--device", default=None, help="device for the SVDs (cuda is much faster; default cpu)")
    p.add_argument("--save_precision", default=None, choices=[None, "float", "fp16", "bf16"],
                   help="dtype of the written weights (default float)")
    p.add_argument("--mem_eff_safe_open", action="store_true",
                   help="accepted for sd-scripts compatibility: files are always read one tensor at a time")
    p.add_argument("--no_metadata", action="store_true", help="write no ss_*/modelspec metadata")
    p.add_argument("--format", default="sd-scripts", choices=FORMATS, help="layout of the written LoRA")
    p.add_argument("--error_report", default=None, help="also write the per-module errors to this JSON file")
    return p


def run(args) -> int:
    if not 0 < args.clamp_quantile <= 1:
        raise ValueError(f"--clamp_quantile {args.clamp_quantile}: must be in (0, 1]")
    result = extract_lora(args.model_org, args.model_tuned, args.dim, args.clamp_quantile, args.device or "cpu")
    if not result.modules:
        raise ValueError(f"{args.model_tuned}: no block weight differs from {args.model_org}; nothing to extract")
    for name, err in result.errors.items():
        logger.info("  %s: rank %d, relative error %.3e", name, result.modules[name].rank, err)
    errs = list(result.errors.values())
    logger.info("extracted %d modules (%d unchanged skipped); relative error mean %.3e, max %.3e",
                len(errs), len(result.unchanged), sum(errs) / len(errs), max(errs))
    metadata = None
    if not args.no_metadata:
        base_version = "chroma" if result.variant.family == "chroma" else "flux1"  # sd-scripts' two values
        metadata = {"ss_v2": "False", "ss_base_model_version": base_version, "ss_network_module": "networks.lora_flux",
                    "ss_network_dim": str(args.dim), "ss_network_alpha": str(float(args.dim)),
                    "ss_network_args": "{}",
                    "modelspec.sai_model_spec": "1.0.1",
                    "modelspec.architecture": result.variant.modelspec_architecture(lora=True),
                    "modelspec.title": Path(args.save_to).stem}
    save_lora(args.save_to, result.modules, args.format, metadata, str_to_dtype(args.save_precision),
              hashes=metadata is not None)
    if args.error_report:
        text = json.dumps({"relative_error": result.errors, "unchanged": result.unchanged}, indent=1)
        atomic_write(args.error_report, lambda tmp: Path(tmp).write_text(text))
    logger.info("saved %s", args.save_to)
    return 0


def main(argv: list[str] | None = None) -> int:
    return tool_main(setup_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
