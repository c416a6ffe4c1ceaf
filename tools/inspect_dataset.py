"""Check a dataset before training: the config, every image, buckets, steps per epoch and captions.

    python tools/inspect_dataset.py --dataset_config dataset.toml [any training arguments]
    python tools/inspect_dataset.py --dataset_config dataset.toml --json > images.jsonl

Nothing is loaded but image headers (and, with --tokenizer_cache_dir, the tokenizers to count caption tokens);
--verify_images decodes every image in full, which finds data corrupted behind a valid header.
Exit status 0 when no problem was found, 1 otherwise; notes (a setting without effect, a value rounded) are
listed but never fail the check.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.data.arguments import add_dataset_arguments  # noqa: E402 (cheap: no torch)
from library.formats.command_line import ArgumentParser, non_negative_int, positive_int, seed_int  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Validate a dataset config and its images; show buckets and steps.")
    add_dataset_arguments(p, support_controlnet=True)
    g = p.add_argument_group("steps")
    g.add_argument("--max_train_steps", type=non_negative_int, default=1600,
                   help="as in training (default: %(default)s)")
    g.add_argument("--max_train_epochs", type=positive_int, default=None, help="overrides --max_train_steps")
    g.add_argument("--gradient_accumulation_steps", type=positive_int, default=1)
    g.add_argument("--num_processes", type=positive_int, default=1, help="GPUs that will share the batches")
    g.add_argument("--seed", type=seed_int, default=42)
    g.add_argument("--tokenizer_cache_dir", default=None,
                   help="tokenizers (sd-scripts layout) to count caption tokens against --t5xxl_max_token_length")
    g.add_argument("--t5xxl_max_token_length", type=positive_int, default=512)
    g.add_argument("--json", action="store_true", help="print one JSON record per image instead of the report")
    return p


class _Collect(logging.Handler):
    """Keeps the warnings the dataset code logs, so the report can list them once: those logged with
    `extra=library.data.NOTE` (a valid setting remarked on) as notes, the others as problems."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.notes: list[str] = []
        self.messages: list[str] = []

    def emit(self, record):
        (self.notes if getattr(record, "note", False) else self.messages).append(record.getMessage())


def image_records(group) -> list[dict]:
    from library.data.buckets import get_crop_ltrb  # numpy/cv2 after parsing: --help stays fast
    from library.data.captions import text_encoder_cache_caption

    records = []
    for ds in group.datasets:
        for item in ds.items:
            (bw, bh), (rw, rh) = item.bucket_reso, item.resized_size
            records.append({
                "path": str(item.absolute_path), "dataset": ds.config.index, "image_size": list(item.image_size),
                "bucket": [bw, bh], "resized_size": [rw, rh], "crop_left_top": [(rw - bw) // 2, (rh - bh) // 2],
                "crop_ltrb": [round(v, 2) for v in get_crop_ltrb(item.bucket_reso, item.image_size)],
                "repeats": item.num_repeats,
                "is_reg": item.is_reg, "random_crop": item.subset.random_crop,
                "caption": text_encoder_cache_caption(item.caption, item.caption_options)
                if not item.caption_options.enable_wildcard else item.caption,
            })
    return records


def caption_report(group, args) -> list[str]:
    from library.data.captions import tag_frequency

    captions = [i.caption for i in group.items]
    words = [len(c.split()) for c in captions] or [0]
    lines = [f"captions: {len(captions)} images, {sum(1 for c in captions if not c.strip())} empty, "
             f"words per caption min {min(words)} / mean {sum(words) / len(words):.1f} / max {max(words)}"]
    tags = Counter(tag_frequency(captions))
    if tags:
        top = ", ".join(f"{t} ({n})" for t, n in tags.most_common(10))
        lines.append(f"tags: {len(tags)} distinct; most common: {top}")
    if args.tokenizer_cache_dir:
        from library.models.tokenizers import load_t5_tokenizer  # only with --tokenizer_cache_dir

        t5 = load_t5_tokenizer(args.tokenizer_cache_dir)
        lengths = [len(t5(c)["input_ids"]) for c in captions]
        over = sum(1 for n in lengths if n > args.t5xxl_max_token_length)
        lines.append(f"T5 tokens per caption: max {max(lengths, default=0)}; {over} caption(s) longer than "
                     f"{args.t5xxl_max_token_length} are truncated")
    return lines


def report(group, args) -> list[str]:
    from library.data.datasets import max_train_steps_for, num_train_epochs, steps_per_epoch

    out = []
    for ds in group.datasets:
        c = ds.config
        out.append(f"dataset #{c.index} ({c.kind}): resolution {c.resolution[0]}x{c.resolution[1]}, batch size "
                   f"{c.batch_size}, " + ("buckets: FLUX.1 Kontext's preferred sizes" if c.bucket_sizes else
                                          f"bucketing {'on' if c.enable_bucket else 'off'}"
                                          f"{' (no upscale)' if c.enable_bucket and c.bucket_no_upscale else ''}"))
        for s in c.subsets:
            n = sum(1 for i in ds.items if i.subset is s)
            reps = sorted({i.num_repeats for i in ds.items if i.subset is s})
            out.append(f"  subset #{s.index}: {s.image_dir or s.metadata_file}: {n} images x {'/'.join(map(str, reps))}"
                       f" repeats{' (regularisation)' if s.is_reg else ''}"
                       f"{f', references from {s.reference_image_dir}' if s.reference_image_dir else ''}")
        out.append(f"  {'bucket':>11}  {'images':>6}  {'with repeats':>12}  {'batches':>7}")
        for (reso, refs), content in zip(ds.bucket_keys, ds.buckets):
            out.append(f"  {reso[0]:>5}x{reso[1]:<5}  {len(set(content)):>6}  {len(content):>12}  "
                       f"{-(-len(content) // c.batch_size):>7}{f'  {refs} reference(s) each' if refs else ''}")
        if ds.ar_errors:
            out.append(f"  mean aspect-ratio error {sum(ds.ar_errors) / len(ds.ar_errors):.4f}")
    batches = len(group)
    per_epoch = steps_per_epoch(batches, args.num_processes, args.gradient_accumulation_steps)
    total = max_train_steps_for(batches, args.max_train_steps, args.max_train_epochs, args.num_processes,
                                args.gradient_accumulation_steps)
    out.append(f"batches per epoch: {batches}; optimizer steps per epoch: {per_epoch} ({args.num_processes} "
               f"process(es), gradient accumulation {args.gradient_accumulation_steps}); max_train_steps {total} = "
               f"{num_train_epochs(total, per_epoch)} epoch(s)")
    return out + caption_report(group, args)


def main(argv: list[str] | None = None) -> int:
    args, unknown = setup_parser().parse_known_args(argv)
    root = logging.getLogger()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    levels = {h: h.level for h in root.handlers}
    for handler in root.handlers:
        handler.setLevel(logging.ERROR)  # warnings are collected and listed once, at the end
    collect = _Collect()
    root.addHandler(collect)
    try:
        return _inspect(args, unknown, collect)
    finally:
        root.removeHandler(collect)
        for handler, level in levels.items():
            handler.setLevel(level)


def _inspect(args, unknown: list[str], collect: _Collect) -> int:
    from library.data.config import DatasetConfigError, load_dataset_config  # after parsing: --help stays fast
    from library.data.datasets import build_datasets
    from library.data.images import BadImageError
    from library.models.kontext import PREFERRED_KONTEXT_RESOLUTIONS

    problems: list[str] = []
    group = None
    try:  # reference images (FLUX.1 Kontext) are checked with the buckets Kontext training gives them
        config = load_dataset_config(args, support_controlnet=True, support_reference=True,
                                     reference_buckets=PREFERRED_KONTEXT_RESOLUTIONS)
        group, _ = build_datasets(config, args.seed, skip_bad_images=True, verify_images=args.verify_images)
    except (DatasetConfigError, BadImageError, ValueError) as e:
        problems.append(str(e))
    problems += collect.messages
    if args.json and group is not None:
        for record in image_records(group):
            print(json.dumps(record))
    elif group is not None:
        print("\n".join(report(group, args)))
    if unknown:
        print(f"note: training arguments not used for inspection: {' '.join(unknown)}", file=sys.stderr)
    if collect.notes:  # informational: they never fail the check
        print(f"\n{len(collect.notes)} note(s):", file=sys.stderr)
        for note in collect.notes:
            print(f"- {note}", file=sys.stderr)
    if problems:
        print(f"\n{len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"- {p}", file=sys.stderr)
        return 1
    print("no problems found", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
