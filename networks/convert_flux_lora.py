#!/usr/bin/env python
"""Convert a FLUX.1 LoRA between layouts, any to any (sd-scripts' arguments; docs/lora_formats.md).

    python networks/convert_flux_lora.py --src ai-toolkit --dst sd-scripts --src_path in.safetensors \
        --dst_path out.safetensors

--src is checked against the file (any readable layout is accepted with --src auto); --dst is one of sd-scripts,
ai-toolkit, diffusers, comfyui. Updates are kept exactly (alpha / rank semantics; a file without alpha means
alpha = rank) and the source metadata is carried over.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.cli.main import tool_main  # noqa: E402 (imports follow the path set-up: runs as a script)
from library.formats.command_line import ArgumentParser  # noqa: E402
from library.formats.dtypes import str_to_dtype  # noqa: E402
from library.formats.lora_formats import FORMATS, load_lora, save_lora  # noqa: E402

logger = logging.getLogger(__name__)
# What --src names may be detected as (ai-toolkit and diffusers share one tensor layout).
SRC_LAYOUTS = {"sd-scripts": {"sd-scripts"}, "ai-toolkit": {"diffusers"}, "diffusers": {"diffusers"},
               "comfyui": {"comfyui", "bfl"}}


def setup_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", default="ai-toolkit", choices=[*FORMATS, "auto"],
                   help="layout of --src_path (default ai-toolkit, as sd-scripts); 'auto' accepts any readable "
                        "layout (also OneTrainer, LyCORIS-LoRA, BFL-named files)")
    p.add_argument("--dst", default="sd-scripts", choices=FORMATS, help="layout to write (default sd-scripts)")
    p.add_argument("--src_path", required=True, help="LoRA file to read (.safetensors)")
    p.add_argument("--dst_path", required=True, help="LoRA file to write (.safetensors)")
    p.add_argument("--save_precision", default=None, choices=["float", "fp16", "bf16"],
                   help="dtype of the written weights (default: as read); alpha stays float32")
    return p


def run(args) -> int:
    if Path(args.dst_path).suffix.lower() != ".safetensors":
        raise ValueError(f"--dst_path {args.dst_path}: LoRA files are written as .safetensors only")
    modules, metadata, layout = load_lora(args.src_path)
    if args.src != "auto" and layout not in SRC_LAYOUTS[args.src]:
        raise ValueError(f"--src_path {args.src_path}: this is a {layout} layout LoRA, not {args.src}; pass "
                         f"--src auto (or the right --src) to convert it")
    save_lora(args.dst_path, modules, args.dst, metadata, str_to_dtype(args.save_precision))
    logger.info("%s (%s, %d modules) -> %s (%s)", args.src_path, layout, len(modules), args.dst_path, args.dst)
    return 0


def main(argv: list[str] | None = None) -> int:
    return tool_main(setup_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
