#!/usr/bin/env python
"""Peak RSS while loading a FLUX transformer checkpoint with the suite's loader.

What it checks: the loader builds the model on `meta` and assigns each tensor once, so loading should need about
one copy of the weights in RAM -- peak RSS within `--limit` (1.2) times the loaded weight bytes above the
interpreter baseline.

How:
  1. It writes a FLUX checkpoint of real width (hidden 3072, the block shapes of FLUX.1-dev) with fewer blocks,
     as many as come nearest --size-gb (at least one double and one single block: about 1.1 GB in bf16), in each
     requested layout (BFL, ComfyUI-prefixed BFL, diffusers folder). The file is streamed tensor by tensor from a
     small pool of random values, so writing it needs no model in RAM, and it is written by this (parent) process,
     never by the one measured.
  2. Each measurement runs in a fresh Python process: it imports torch and library.models.checkpoint, records its
     RSS (the baseline), calls load_transformer (what flux_utils.load_flow_model runs), then reads one element of
     every 4 KiB page of every weight, as a first forward pass would (weights that still alias the file's memory
     map are only paged in then). It reports VmHWM (the kernel's peak RSS of the process) after the load and after
     that read, the RSS left, and the bytes of the loaded tensors. The parent also samples the child's RssAnon and
     RssFile every few milliseconds, to tell private memory from file pages mapped by safetensors.
  3. ratio = (VmHWM after the read - baseline) / loaded weight bytes, for the file's dtype as stored (dtype=None)
     and for a cast while loading (--cast-to: fp32 for a bf16/fp16 file, whose weights are then twice the file;
     bf16 for an fp32 or fp8 file).

`--layout gguf` measures a quantized load instead: a .gguf file of the same shapes (block Linear weights in
`--gguf-type`, tiled from random valid blocks; everything else F32, as ComfyUI-GGUF's FLUX conversions) loaded
with library.memory.gguf_linear.load_gguf_transformer, which keeps the quantized bytes and loads the rest in bf16.
`--quantize nf4 int8` adds a quantized load of the same file (library.memory.quantized_base, block Linears in
nf4 / int8 through bitsandbytes, the rest in bf16): the loaded bytes are then the quantized model's, and the ratio
shows that the file is never held in a float type beside them.

The process exits 1 when any ratio exceeds --limit. `--reader` swaps what the library gets from
safetensors.safe_open, to compare the stock reader ("library", the default and the one that counts) with a reader
that fills each tensor from the file with readinto() and maps nothing ("readinto"), or with safetensors' own
`backend="pread"` (safetensors >= 0.8).

    python bench/bench_load_memory.py                          # 3 GB bf16 checkpoint, all layouts (~1 min)
    python bench/bench_load_memory.py --layout bfl --dtype fp32 --reader readinto
    python bench/bench_load_memory.py --layout gguf --gguf-type Q4_K
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = ("bfl", "comfyui", "diffusers")
COMFY_PREFIX = "model.diffusion_model."
READERS = ("library", "readinto", "pread")
QUANTIZED = ("nf4", "int8")  # --quantize: loads through library.memory.quantized_base
DTYPE_NAMES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32", "fp8": "F8_E4M3"}
ELEMENT_SIZE = {"BF16": 2, "F16": 2, "F32": 4, "F8_E4M3": 1}
POOL_ELEMENTS = 4 << 20  # random values the checkpoint is tiled from (8 MiB in bf16)
GB = 1e9
MiB = 1 << 20


# ----------------------------------------------------------------------------------------------------------------
# /proc readings


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of a process, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[name] = int(rest.split()[0]) * 1024
    return out


class Sampler(threading.Thread):
    """Polls another process's /proc status and keeps the largest RssAnon, RssFile and VmRSS seen."""

    def __init__(self, pid: int, interval: float = 0.003):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                s = proc_status(self.pid)
            except (FileNotFoundError, ProcessLookupError, ValueError):
                return
            self.samples += 1
            for k in self.peak:
                self.peak[k] = max(self.peak[k], s.get(k, 0))
            time.sleep(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


# ----------------------------------------------------------------------------------------------------------------
# Generating the checkpoint


def plan_params(size_gb: float, element_size: int):
    """FLUX.1-dev's FluxParams with the block counts whose checkpoint comes nearest `size_gb` (about 1 double block
    per 2 single blocks, as in the real model; at least one of each)."""
    import torch
    from dataclasses import replace

    from library.models.transformer import FLUX_PRESETS, Flux

    dev = FLUX_PRESETS["dev"]

    def count(depth: int, single: int) -> int:
        with torch.device("meta"):
            model = Flux(replace(dev, depth=depth, depth_single_blocks=single))
        return sum(p.numel() for p in model.parameters())

    base = count(1, 1)
    per_double, per_single = count(2, 1) - base, count(1, 2) - base
    outer = base - per_double - per_single
    target = size_gb * GB / element_size
    best = None
    for n in range(2, 19 + 38 + 1):
        depth = max(1, round(n / 3))
        single = max(1, n - depth)
        numel = outer + depth * per_double + single * per_single
        if best is None or abs(numel - target) < abs(best[0] - target):
            best = (numel, depth, single)
    return replace(dev, depth=best[1], depth_single_blocks=best[2])


def checkpoint_entries(params, layout: str) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) of every tensor of the checkpoint, in file order, from a model built on `meta`."""
    import torch

    from library.formats.diffusers_keys import bfl_to_diffusers
    from library.models.transformer import Flux

    with torch.device("meta"):
        state = Flux(params).state_dict()
    if layout == "diffusers":
        state = bfl_to_diffusers(state, params.hidden_size)
    prefix = COMFY_PREFIX if layout == "comfyui" else ""
    return [(prefix + k, tuple(v.shape)) for k, v in state.items()]


def random_pool(st_dtype: str) -> memoryview:
    import torch

    from library.formats.dtypes import SAFETENSORS_DTYPES

    g = torch.Generator().manual_seed(0)
    values = (torch.randn(POOL_ELEMENTS, generator=g) * 0.02).to(SAFETENSORS_DTYPES[st_dtype])
    return memoryview(values.view(torch.uint8).numpy().tobytes())


def write_checkpoint(path: Path, entries, st_dtype: str, metadata: dict[str, str]) -> int:
    """Stream a safetensors file: header, then each tensor's bytes tiled from a small random pool (no model in RAM).
    Returns the file size."""
    esize = ELEMENT_SIZE[st_dtype]
    header, offset = {}, 0
    for key, shape in entries:
        n = esize
        for s in shape:
            n *= s
        header[key] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    pool = random_pool(st_dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    start = 0
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for key, _ in entries:
            begin, end = header[key]["data_offsets"]
            left = end - begin
            while left:
                chunk = pool[start:start + left]
                f.write(chunk)
                left -= len(chunk)
                start = (start + len(chunk)) % len(pool)
            start = (start + 7919 * esize) % len(pool)  # tensors do not all start on the same values
    os.replace(tmp, path)
    return path.stat().st_size


def write_gguf_checkpoint(path: Path, entries, qtype: str) -> int:
    """Stream a .gguf file of `entries` (BFL names): 2-D block weights as `qtype` bytes tiled from a pool of random
    valid blocks (finite scales), every other tensor F32; written tensor by tensor through gguf.GGUFWriter."""
    import gguf
    import numpy as np

    from library.formats.gguf_quants import GGUF_TYPES, random_blocks

    t = GGUF_TYPES[qtype]
    rng = np.random.default_rng(0)  # the F32 tensors' values
    pool = random_blocks(qtype, POOL_ELEMENTS // t.block_size, scale_std=1e-3).numpy().reshape(-1)
    f32 = (rng.standard_normal(POOL_ELEMENTS) * 0.02).astype(np.float32)

    def plan(key, shape):
        """(ggml type, bytes) of one tensor."""
        n = 1
        for d in shape:
            n *= d
        if key.startswith(("double_blocks.", "single_blocks.")) and len(shape) == 2 and shape[-1] % t.block_size == 0:
            return gguf.GGMLQuantizationType[qtype], n // t.block_size * t.type_size
        return gguf.GGMLQuantizationType.F32, 4 * n

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch="flux")
    for key, shape in entries:  # the header first, then the data tensor by tensor: no model in RAM
        ggml, nbytes = plan(key, shape)
        writer.add_tensor_info(key, shape, np.dtype(np.float32), nbytes, raw_dtype=ggml)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for key, shape in entries:
        ggml, nbytes = plan(key, shape)
        writer.write_tensor_data(np.resize(pool, nbytes) if ggml != gguf.GGMLQuantizationType.F32
                                 else np.resize(f32, nbytes // 4))
    writer.close()
    os.replace(tmp, path)
    return path.stat().st_size


def checkpoint_path(workdir: Path, layout: str) -> Path:
    if layout == "gguf":
        return workdir / "flux.gguf"
    if layout == "diffusers":  # a diffusers pipeline folder; the loader is given the folder
        return workdir / "diffusers" / "transformer" / "diffusion_pytorch_model.safetensors"
    return workdir / f"flux_{layout}.safetensors"


def load_target(workdir: Path, layout: str) -> Path:
    return workdir / "diffusers" if layout == "diffusers" else checkpoint_path(workdir, layout)


# ----------------------------------------------------------------------------------------------------------------
# Alternative readers (what-if: the library itself always calls safetensors.safe_open)


class ReadintoSafeOpen:
    """A drop-in for safetensors.safe_open(path, framework="pt", device="cpu") on CPU that maps nothing: each
    get_tensor allocates the tensor and fills it with one readinto() at the offsets of the header. Only the tensor's
    own pages are touched; the page cache holds the file but is not counted in this process's RSS."""

    def __init__(self, filename, framework="pt", device="cpu", **_):
        from library.formats.safetensors_io import read_header

        self._header = read_header(filename)
        self._file = open(filename, "rb")
        with open(filename, "rb") as f:
            self._data_start = 8 + int.from_bytes(f.read(8), "little")

    def keys(self):
        return list(self._header.tensors)

    def metadata(self):
        return self._header.metadata

    def get_tensor(self, key):
        import torch

        info = self._header.tensors[key]
        buf = torch.empty(info.end - info.begin, dtype=torch.uint8)
        self._file.seek(self._data_start + info.begin)
        view = memoryview(buf.numpy())
        got = 0
        while got < len(view):
            n = self._file.readinto(view[got:])
            if not n:
                raise OSError(f"{self._header.path}: unexpected end of file in {key}")
            got += n
        return buf.view(info.torch_dtype).reshape(info.shape)

    def close(self):
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if not self._file.closed:
            self._file.close()


def install_reader(reader: str) -> None:
    import safetensors

    if reader == "readinto":
        safetensors.safe_open = ReadintoSafeOpen
    elif reader == "pread":
        stock = safetensors.safe_open

        def safe_open_pread(*args, **kwargs):
            kwargs.setdefault("backend", "pread")
            return stock(*args, **kwargs)

        safetensors.safe_open = safe_open_pread


# ----------------------------------------------------------------------------------------------------------------
# One measurement (child process)


def measure_child(path: str, load_dtype: str, reader: str) -> None:
    import gc

    import torch

    from library.formats.dtypes import str_to_dtype
    from library.models import checkpoint as flux_checkpoint

    # the transformer loader: load_transformer (flux_utils.load_flow_model wraps it), load_flow_model before
    load = getattr(flux_checkpoint, "load_transformer", None) or flux_checkpoint.load_flow_model
    if path.endswith(".gguf"):  # quantized blocks kept, the rest in bf16 (inference's and the LoRA trainer's load)
        from library.memory.gguf_linear import load_gguf_transformer

        def load(path, dtype):
            return load_gguf_transformer(path, torch.bfloat16)
    elif load_dtype in QUANTIZED:
        from functools import partial

        import bitsandbytes.functional  # noqa: F401 (its import, ~130 MB of RSS, is code: before the baseline)

        from library.memory.quantized_base import load_quantized_transformer

        quantized = partial(load_quantized_transformer, quant_type=load_dtype, compute_dtype=torch.bfloat16)
        load = lambda path, dtype: quantized(path)  # noqa: E731
        load.__module__, load.__name__ = "library.memory.quantized_base", "load_quantized_transformer"
    install_reader(reader)
    gc.collect()
    before = proc_status()
    t0 = time.perf_counter()
    model = load(path, dtype=None if load_dtype in ("stored", *QUANTIZED) else str_to_dtype(load_dtype))
    load_s = time.perf_counter() - t0
    after_load = proc_status()
    tensors = [*model.parameters(), *model.buffers()]
    assert not any(t.is_meta for t in tensors)
    # Read one element of every 4 KiB page of every weight, as a first forward pass (or .to("cuda")) would: a tensor
    # that still aliases the file's mapping is only paged in now, so this is when it shows in RSS.
    t0 = time.perf_counter()
    with torch.no_grad():
        for t in tensors:
            flat = t.detach().reshape(-1)
            flat[:: max(1, 4096 // t.element_size())].float().sum()
    touch_s = time.perf_counter() - t0
    after = proc_status()
    print(json.dumps({
        "baseline": before["VmRSS"],
        "baseline_anon": before["RssAnon"],
        "hwm_before": before["VmHWM"],
        "hwm_load": after_load["VmHWM"],
        "rss_load": after_load["VmRSS"],
        "file_load": after_load["RssFile"],
        "hwm": after["VmHWM"],
        "rss_after": after["VmRSS"],
        "anon_after": after["RssAnon"],
        "file_after": after["RssFile"],
        "weights": sum(t.nbytes for t in tensors),
        "dtypes": sorted({str(t.dtype).replace("torch.", "") for t in tensors}),
        "load_s": load_s,
        "touch_s": touch_s,
        "loader": f"{load.__module__}.{load.__name__}",
    }))


def measure(path: Path, load_dtype: str, reader: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_measure", str(path), "--_load-dtype", load_dtype,
           "--reader", reader]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    sampler = Sampler(proc.pid)
    sampler.start()
    out, err = proc.communicate()
    sampler.stop()
    if proc.returncode:
        raise RuntimeError(f"measurement of {path} ({load_dtype}) failed:\n{err.strip()[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result.update(peak_anon=sampler.peak["RssAnon"], peak_file=sampler.peak["RssFile"], samples=sampler.samples)
    result["ratio"] = (result["hwm"] - result["baseline"]) / result["weights"]
    result["ratio_load"] = (result["hwm_load"] - result["baseline"]) / result["weights"]
    result["ratio_anon"] = (result["peak_anon"] - result["baseline_anon"]) / result["weights"]
    return result


# ----------------------------------------------------------------------------------------------------------------
# Report


def machine_line() -> str:
    import platform

    from machine import cpu_model

    cpu = cpu_model()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    import safetensors
    import torch

    return (f"{cpu}, {os.cpu_count()} cores, {mem:.1f} GiB RAM; Python {platform.python_version()}, "
            f"torch {torch.__version__}, safetensors {safetensors.__version__}")


def table(rows: list[dict], limit: float) -> str:
    head = ("| layout | file | load as | file GB | weights GB | baseline GB | peak RSS GB, load "
            "| peak RSS GB, load + use | peak anon GB | peak file-mapped GB | RSS after GB | ratio, load | **ratio** "
            "| load s | ok |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['layout']} | {r['file_dtype']} | {r['load_dtype']} | {r['file_bytes'] / GB:.2f} "
            f"| {r['weights'] / GB:.2f} | {r['baseline'] / GB:.2f} | {r['hwm_load'] / GB:.2f} | {r['hwm'] / GB:.2f} "
            f"| {r['peak_anon'] / GB:.2f} | {r['peak_file'] / GB:.2f} | {r['rss_after'] / GB:.2f} "
            f"| {r['ratio_load']:.2f} | **{r['ratio']:.2f}** | {r['load_s']:.1f} "
            f"| {'yes' if r['ratio'] <= limit else 'NO'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--size-gb", type=float, default=3.0, help="checkpoint size to aim at, in GB (1e9 bytes)")
    ap.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="bf16", help="dtype stored in the file")
    ap.add_argument("--cast-to", choices=sorted(DTYPE_NAMES), default=None,
                    help="dtype of the cast-while-loading case (default fp32, or bf16 for an fp32 or fp8 file)")
    ap.add_argument("--layout", choices=(*LAYOUTS, "gguf", "all"), default="all",
                    help="all: the three safetensors layouts; gguf: a quantized .gguf load (--gguf-type)")
    ap.add_argument("--gguf-type", default="Q8_0", help="block weights' type of the gguf layout (default Q8_0)")
    ap.add_argument("--reader", choices=READERS, default="library",
                    help="tensor reader: the library's (safetensors.safe_open, mmap) or a what-if replacement")
    ap.add_argument("--quantize", nargs="*", choices=QUANTIZED, default=[],
                    help="also load quantized to these (block Linears in nf4 / int8, the rest in bf16)")
    ap.add_argument("--workdir", type=Path, default=None, help="where the checkpoints go (default: a temp folder)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the generated checkpoints (and reuse them when the next run asks for the same)")
    ap.add_argument("--limit", type=float, default=1.2, help="largest accepted ratio (default 1.2)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--_measure", help=argparse.SUPPRESS)
    ap.add_argument("--_load-dtype", dest="load_dtype", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))

    if args._measure:
        measure_child(args._measure, args.load_dtype, args.reader)
        return 0

    st_dtype = DTYPE_NAMES[args.dtype]
    cast_to = args.cast_to or ("bf16" if args.dtype in ("fp32", "fp8") else "fp32")
    layouts = LAYOUTS if args.layout == "all" else (args.layout,)
    own_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="bench_load_memory_")) if own_workdir else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    if args.layout == "gguf":  # --size-gb is then the .gguf file's size
        from library.formats.gguf_quants import GGUF_BYTES_PER_PARAM

        params = plan_params(args.size_gb, GGUF_BYTES_PER_PARAM[args.gguf_type])
    else:
        params = plan_params(args.size_gb, ELEMENT_SIZE[st_dtype])
    print(f"machine: {machine_line()}")
    print(f"checkpoint: FLUX.1-dev width (hidden {params.hidden_size}, mlp {params.mlp_hidden_dim}), "
          f"{params.depth} double + {params.depth_single_blocks} single blocks, "
          f"{args.gguf_type + ' (.gguf)' if args.layout == 'gguf' else args.dtype}; reader: {args.reader}; "
          f"workdir {workdir}", flush=True)

    rows: list[dict] = []
    written: list[Path] = []
    try:
        for layout in layouts:
            path = checkpoint_path(workdir, layout)
            entries = checkpoint_entries(params, layout)
            meta = {"format": "pt", "bench": "bench_load_memory", "size_gb": str(args.size_gb),
                    "depth": str(params.depth), "depth_single_blocks": str(params.depth_single_blocks)}
            t0 = time.perf_counter()
            if layout == "gguf":
                size, how = write_gguf_checkpoint(path, entries, args.gguf_type), "written"
                written.append(path)
            elif args.keep and path.exists() and _same_checkpoint(path, entries, st_dtype, meta):
                size, how = path.stat().st_size, "reused"
            else:
                size, how = write_checkpoint(path, entries, st_dtype, meta), "written"
                written.append(path)
            print(f"[{layout}] {path} {how}: {size / GB:.2f} GB, {len(entries)} tensors "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
            file_dtype = f"{args.gguf_type} + F32" if layout == "gguf" else args.dtype
            for load_dtype in ("stored",) if layout == "gguf" else ("stored", cast_to, *args.quantize):
                r = measure(load_target(workdir, layout), load_dtype, args.reader)
                r.update(layout=layout, file_dtype=file_dtype,
                         load_dtype=f"{file_dtype} (as stored)" if load_dtype == "stored" else load_dtype,
                         file_bytes=size, reader=args.reader)
                rows.append(r)
                print(f"[{layout}] load as {load_dtype}: baseline {r['baseline'] / MiB:.0f} MiB, weights "
                      f"{r['weights'] / GB:.2f} GB, peak {r['hwm_load'] / GB:.2f} GB after load, "
                      f"{r['hwm'] / GB:.2f} GB "
                      f"after reading every weight -> ratio {r['ratio']:.2f} (load only {r['ratio_load']:.2f}; "
                      f"anon only {r['ratio_anon']:.2f}; {r['samples']} samples); load {r['load_s']:.1f} s, "
                      f"read {r['touch_s']:.1f} s", flush=True)
            if not args.keep:
                _remove(path, workdir, layout)
    finally:
        if not args.keep:
            for p in written:
                if p.exists():
                    _remove(p, workdir, None)
            if own_workdir:
                shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(table(rows, args.limit))
    print(f"\nratio = (peak RSS after load and one read of every weight - baseline RSS) / loaded weight bytes; "
          f"limit {args.limit}. 'ratio, load' stops at the end of the load call. Peak anon / file-mapped: sampled "
          "peaks of the private memory and of the file pages mapped by the process.")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_line(), "rows": rows}, indent=1))
    bad = [r for r in rows if r["ratio"] > args.limit]
    if bad:
        print(f"FAIL: {len(bad)} case(s) above {args.limit}x: "
              + ", ".join(f"{r['layout']}/{r['load_dtype']} {r['ratio']:.2f}" for r in bad))
        return 1
    print(f"OK: every case within {args.limit}x")
    return 0


def _same_checkpoint(path: Path, entries, st_dtype: str, meta: dict[str, str]) -> bool:
    from library.formats.safetensors_io import ModelFileError, read_header

    try:
        h = read_header(path)
    except ModelFileError:
        return False
    return (h.metadata == meta and list(h.tensors) == [k for k, _ in entries]
            and all(t.dtype == st_dtype for t in h.tensors.values()))


def _remove(path: Path, workdir: Path, layout: str | None) -> None:
    path.unlink(missing_ok=True)
    if layout == "diffusers" or path.parent.name == "transformer":
        shutil.rmtree(workdir / "diffusers", ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
