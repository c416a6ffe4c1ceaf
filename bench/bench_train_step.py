#!/usr/bin/env python
"""Training step time on CPU, and the share of it spent outside the transformer's forward and backward.

What it checks: in a LoRA run as users start it (`flux_train_network.main(argv)`, cached latents and cached
text-encoder outputs, AdamW, gradient clipping, progress bar and TensorBoard logging), the work of a step that is
not the model's forward and backward -- data loading, loss math, the backward of the loss math, clipping, the
optimizer, the scheduler, zero_grad and the bookkeeping (loss.item, progress bar, logging, after_step) -- is at
most `--limit` (10 %) of a step on the small preset. The process exits 1 when it is not.

Presets:
  tiny   FLUX_PRESETS["tiny"] (hidden 64, 2 double + 2 single blocks) at 64 px with 32 T5 tokens: the quickstart's
         setting. Reported, not gated: its model is so small that fixed per-step costs dominate by design.
  small  defined here (`small_params()`: hidden 512, 4 heads of 128 like FLUX.1, 2 double + 4 single blocks) at
         256 px (256 image tokens) with 64 T5 tokens, batch 1 (the worst case for the overhead share). Gated.
  Both use make_tiny_models' tiny AE, CLIP-L and T5 (the transformer's vec_in_dim/context_in_dim match their
  widths); the small transformer is written with the project's safetensors writer over the tiny one. The trainer
  runs as quickstart.sh runs it (LoRA dim 16, AdamW, --model_prediction_type raw, fp32) plus what large datasets
  use: --cache_latents_to_disk / --cache_text_encoder_outputs_to_disk (npz read every step; `--cache memory` for
  the in-memory caches) and --logging_dir (TensorBoard; `--no-logging`). Nothing is saved during the timed steps.

How a step is split (all in the trainer process, one thread of Python; `--max_data_loader_n_workers 0` by default
so data loading is on the step's critical path and visible):
  * step         time between the ends of consecutive `Trainer.after_step` calls: the whole loop iteration (next
                 batch, loss, backward, clip, optimizer, scheduler, zero_grad, item, tqdm, log, after_step).
  * model fwd    `Flux.forward` from a forward pre-hook to a forward hook on the transformer (LoRA modules are
                 hooked into its Linears, so they count as model).
  * model bwd    from a tensor hook on the transformer's output (it fires when the backward reaches the output,
                 just before the transformer's own backward nodes run) to the return of `accelerator.backward`.
                 No tensor before the transformer requires grad (frozen base, cached inputs), so nothing but the
                 transformer's backward (and the LoRA gradients' accumulation) runs in that interval.
  * overhead     step - model fwd - model bwd, split further by timing wrappers put on the trainer's own objects
                 after `setup()`: data (the DataLoader iterator), loss math (`loss_fn` minus model fwd), bwd
                 outside (`accelerator.backward` minus model bwd: the loss math's backward), clip
                 (`accelerator.clip_grad_norm_`), optimizer (`optimizer.step`), scheduler, zero_grad, and
                 "bookkeeping" = the rest (isfinite check, loss.item, tqdm, tracker logging, after_step, loop).
  The probes cost a few microseconds per step (about ten perf_counter pairs and three hooks).
  Medians over the steps after `--warmup`, pooled over `--repeats` trainer runs interleaved across presets; the
  per-step overhead share is overhead/step of the same step, so machine noise moves both together. Library files
  are not modified: the bench subclasses `LoRATrainer` and puts it where `flux_train_network.main` imports it
  from, in the bench's own trainer process only.

Counts beside the timings (they do not drift with machine load): on `--count-steps` extra steps after the timed
ones, a TorchDispatchMode counts the aten ops dispatched per step in each phase (a proxy for kernel launches on a
GPU), and a FlopCounterMode the matmul FLOPs per step (it does not count CPU SDPA attention). Those steps are not
timed.

Shared machines: when another process holds one of the 2 cores, every op that torch runs in parallel waits for
the descheduled OpenMP thread, and a 2-thread step gets 10-30x slower (seen here). The bench probes for that
before the runs and after each (a matmul + GELU timed with the default threads and with 1); `--threads 0` (the
default) then runs everything with 1 thread and says so, and a run flagged afterwards is left out of the gate
(with a warning). `--budget-s` stops timing a run early (after >= 10 steps) on such a slow machine.

    python bench/bench_train_step.py                    # both presets, 2 runs each, ~1.5-2 min on 2 cores
    python bench/bench_train_step.py --markdown         # also print the tables as Markdown
    python bench/bench_train_step.py --profile small    # cProfile of the steady-state steps (timings perturbed)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHASES = ("data", "loss_math", "model_fwd", "bwd_outside", "model_bwd", "clip", "optimizer", "scheduler",
          "zero_grad", "bookkeeping")
OVERHEAD_PHASES = tuple(p for p in PHASES if not p.startswith("model_"))

# preset -> (resolution px, T5 tokens, timed steps)
PRESETS = {"tiny": (64, 32, 300), "small": (256, 64, 40)}


def small_params():
    """The 'small' transformer: FLUX.1's structure and head size, hidden 512, 2 double + 4 single blocks."""
    from library.models.transformer import FLUX_PRESETS

    return replace(FLUX_PRESETS["dev"], hidden_size=512, num_heads=4, depth=2, depth_single_blocks=4,
                   axes_dim=(16, 56, 56))


# ---------------------------------------------------------------------------------------------------------------
# Files: models and data (not timed)

def write_models(out: Path, preset: str) -> dict[str, Path]:
    """make_tiny_models' files; for 'small' the transformer is replaced by small_params() at the encoders' widths."""
    import torch
    from safetensors import safe_open

    from library.models.transformer import Flux
    from library.formats.safetensors_io import save_file_atomic
    from tools.make_tiny_models import make_tiny_models

    paths = make_tiny_models(out, "tiny")
    if preset == "small":
        with safe_open(str(paths["flux"]), "pt") as f:
            meta = f.metadata()
            vec_in = f.get_slice("vector_in.in_layer.weight").get_shape()[1]
            ctx_in = f.get_slice("txt_in.weight").get_shape()[1]
        torch.manual_seed(0)
        flux = Flux(replace(small_params(), vec_in_dim=vec_in, context_in_dim=ctx_in))
        save_file_atomic(flux.state_dict(), paths["flux"], meta)
    return paths


def write_data(out: Path, size: int, steps: int) -> Path:
    """make_demo_dataset's shapes at `size` px; repeats so that the whole run is one epoch."""
    from tools.make_demo_dataset import make_demo_dataset

    count = 8
    return make_demo_dataset(out, count=count, size=size, repeats=-(-steps // count))


def trainer_argv(paths: dict, toml: Path, work: Path, steps: int, t5_tokens: int, args) -> list[str]:
    argv = ["--pretrained_model_name_or_path", str(paths["flux"]), "--clip_l", str(paths["clip_l"]),
            "--t5xxl", str(paths["t5xxl"]), "--ae", str(paths["ae"]),
            "--tokenizer_cache_dir", str(paths["tokenizers"]), "--t5xxl_max_token_length", str(t5_tokens),
            "--dataset_config", str(toml), "--cache_latents", "--cache_text_encoder_outputs",
            "--network_module", "networks.lora_flux", "--network_dim", "16", "--network_alpha", "16",
            "--network_train_unet_only", "--optimizer_type", "AdamW", "--learning_rate", "1e-4",
            "--max_train_steps", str(steps), "--model_prediction_type", "raw",
            "--output_dir", str(work / "output"), "--output_name", "bench_lora", "--seed", "42",
            "--max_data_loader_n_workers", str(args.workers), "--mixed_precision", "no"]
    if args.cache == "disk":
        argv += ["--cache_latents_to_disk", "--cache_text_encoder_outputs_to_disk"]
    if args.logging:
        argv += ["--logging_dir", str(work / "logs")]
    if args.optimizer_args:
        argv += ["--optimizer_args", *args.optimizer_args.split()]
    return argv


# ---------------------------------------------------------------------------------------------------------------
# The instrumented trainer (child process)

class Probe:
    """Per-step phase times (perf_counter) and, on counted steps, aten op counts per phase."""

    def __init__(self, warmup: int, timed: int, count_steps: int, profile: bool, budget_s: float = 0.0):
        self.warmup, self.n_timed, self.count_steps, self.profile = warmup, timed, count_steps, profile
        self.budget_s, self.train_start, self.cut = budget_s, None, False
        self.phase = "bookkeeping"
        self.cur = defaultdict(float)
        self.steps: list[dict] = []
        self.step_start = None
        self.bwd_hook_t = None
        self.op_counts: list[dict] = []
        self.flops: list[int] = []
        self.modes = None
        self.profiler = None
        self.n_done = 0

    # phase switching: `enter` returns the previous phase, which the caller restores
    def enter(self, phase: str) -> str:
        prev, self.phase = self.phase, phase
        return prev

    def timed(self, phase: str, fn):
        probe = self

        def wrapper(*a, **k):
            prev = probe.enter(phase)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                probe.cur[phase] += time.perf_counter() - t0
                probe.phase = prev
        return wrapper

    def end_step(self) -> None:
        now = time.perf_counter()
        if self.step_start is not None:
            rec = dict(self.cur)
            rec["step"] = now - self.step_start
            self.steps.append(rec)
        self.n_done += 1
        self.cur = defaultdict(float)
        timed_so_far = self.n_done - self.warmup
        if (self.budget_s and 10 <= timed_so_far < self.n_timed and not self.profile
                and now - self.train_start > self.budget_s):
            self.n_timed, self.cut = timed_so_far, True  # a loaded machine: stop timing here (reported)
        self._switch_modes()
        self.step_start = time.perf_counter()

    def _switch_modes(self) -> None:
        """cProfile over the timed steps (--profile); op/FLOP counting on the steps after them."""
        n, w, t = self.n_done, self.warmup, self.n_timed
        if self.profile:
            import cProfile

            if n == w:
                self.profiler = cProfile.Profile()
                self.profiler.enable()
            elif n == w + t and self.profiler is not None:
                self.profiler.disable()
            return
        if self.modes is not None:
            self.op_counts.append(dict(self.modes[0].counts))
            self.modes[1].__exit__(None, None, None)
            self.modes[0].__exit__(None, None, None)
            self.flops.append(self.modes[1].get_total_flops())
            self.modes = None
        if w + t <= n < w + t + self.count_steps:
            from torch.utils.flop_counter import FlopCounterMode

            counter, flops = OpCounter(self), FlopCounterMode(display=False)
            counter.__enter__()
            flops.__enter__()
            self.modes = (counter, flops)


def _op_counter_class():
    from torch.utils._python_dispatch import TorchDispatchMode

    class _OpCounter(TorchDispatchMode):
        def __init__(self, probe: Probe):
            super().__init__()
            self.probe = probe
            self.counts: dict[tuple[str, str], int] = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.counts[(self.probe.phase, str(func.overloadpacket.__name__))] += 1
            return func(*args, **(kwargs or {}))

    return _OpCounter


def OpCounter(probe):  # noqa: N802 - built lazily so that the parent process need not import torch
    return _op_counter_class()(probe)


class TimedLoader:
    """Iterates the trainer's DataLoader, timing iterator creation and every `next` as 'data'."""

    def __init__(self, loader, probe: Probe):
        self.loader, self.probe = loader, probe

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        probe = self.probe
        t0 = time.perf_counter()
        prev = probe.enter("data")
        it = iter(self.loader)
        while True:
            try:
                batch = next(it)
            except StopIteration:
                probe.cur["data"] += time.perf_counter() - t0
                probe.phase = prev
                return
            probe.cur["data"] += time.perf_counter() - t0
            probe.phase = prev
            yield batch
            t0 = time.perf_counter()
            prev = probe.enter("data")


def run_child(args) -> int:
    import torch

    import flux_train_network
    import library.training.recipes.lora as lora_training

    spec = json.loads(Path(args.child).read_text())
    if args.threads:
        torch.set_num_threads(args.threads)
    probe = Probe(args.warmup, spec["timed"], 0 if args.profile else args.count_steps, bool(args.profile),
                  args.budget_s)

    class BenchLoRATrainer(lora_training.LoRATrainer):
        def setup(self):
            super().setup()
            acc = self.accelerator
            flux = self.models.flux

            def pre_hook(module, inputs):
                probe.fwd_prev = probe.enter("model_fwd")
                probe.fwd_t0 = time.perf_counter()

            def post_hook(module, inputs, output):
                probe.cur["model_fwd"] += time.perf_counter() - probe.fwd_t0
                probe.phase = probe.fwd_prev
                if output.requires_grad:
                    def on_grad(grad):
                        probe.bwd_hook_t = time.perf_counter()
                        probe.phase = "model_bwd"
                    output.register_hook(on_grad)

            flux.register_forward_pre_hook(pre_hook)
            flux.register_forward_hook(post_hook)
            inner_backward = acc.backward

            def backward(loss, **kw):
                prev = probe.enter("bwd_outside")
                probe.bwd_hook_t = None
                t0 = time.perf_counter()
                try:
                    return inner_backward(loss, **kw)
                finally:
                    t1 = time.perf_counter()
                    if probe.bwd_hook_t is not None:
                        probe.cur["model_bwd"] += t1 - probe.bwd_hook_t
                        probe.cur["bwd_outside"] += probe.bwd_hook_t - t0
                    else:
                        probe.cur["bwd_outside"] += t1 - t0
                    probe.phase = prev

            acc.backward = backward
            acc.clip_grad_norm_ = probe.timed("clip", acc.clip_grad_norm_)
            self.optimizer.step = probe.timed("optimizer", self.optimizer.step)
            self.optimizer.zero_grad = probe.timed("zero_grad", self.optimizer.zero_grad)
            self.lr_scheduler.step = probe.timed("scheduler", self.lr_scheduler.step)
            loss_fn = self.loss_fn
            self.loss_fn = probe.timed("loss_math", loss_fn)
            self.loader = TimedLoader(self.loader, probe)
            probe.step_start = None

        def train(self):
            probe.step_start = probe.train_start = time.perf_counter()
            super().train()

        def after_step(self):
            super().after_step()
            cut = probe.cut
            probe.end_step()
            if probe.cut and not cut:  # the loop stops after the counted steps
                self.args.max_train_steps = self.global_step + probe.count_steps + 1

    lora_training.LoRATrainer = BenchLoRATrainer
    rc = flux_train_network.main(spec["argv"])
    if rc != 0:
        print(f"trainer exited {rc}", file=sys.stderr)
        return rc

    steps = probe.steps[args.warmup:args.warmup + probe.n_timed]
    for s in steps:  # exclusive phase times: loss math without the model forward
        s["loss_math"] = s.get("loss_math", 0.0) - s.get("model_fwd", 0.0)
        s["overhead"] = s["step"] - s.get("model_fwd", 0.0) - s.get("model_bwd", 0.0)
        s["bookkeeping"] = s["step"] - sum(s.get(p, 0.0) for p in PHASES if p != "bookkeeping")
    result = {"steps": steps, "threads": torch.get_num_threads(), "cut": probe.cut,
              "op_counts": [{f"{p}|{op}": n for (p, op), n in c.items()} for c in probe.op_counts],
              "flops": probe.flops}
    if probe.profiler is not None:
        import io
        import pstats

        probe.profiler.dump_stats(str(Path(spec["result"]).with_suffix(".pstats")))  # kept with --keep
        buf = io.StringIO()
        st = pstats.Stats(probe.profiler, stream=buf)
        st.sort_stats("tottime").print_stats(35)
        st.sort_stats("cumulative").print_stats(45)
        result["profile"] = buf.getvalue()
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Parent: files, one child per preset, tables

def med(xs):
    return statistics.median(xs) if xs else float("nan")


def summarise(preset: str, res: dict, resolution: int, t5_tokens: int) -> dict:
    steps = res["steps"]
    col = {p: [s.get(p, 0.0) for s in steps] for p in PHASES + ("step", "overhead")}
    shares = [s["overhead"] / s["step"] for s in steps]
    row = {"preset": preset, "resolution": resolution, "t5_tokens": t5_tokens, "n": len(steps),
           "step_med": med(col["step"]), "step_min": min(col["step"]),
           "model_med": med([s.get("model_fwd", 0) + s.get("model_bwd", 0) for s in steps]),
           "overhead_med": med(col["overhead"]), "overhead_min": min(col["overhead"]),
           "share_med": med(shares), "share_sum": sum(col["overhead"]) / sum(col["step"]),
           "phases": {p: med(col[p]) for p in PHASES}}
    counts = defaultdict(list)
    per_op = defaultdict(list)
    for c in res["op_counts"]:
        by_phase = Counter()
        for key, n in c.items():
            phase, op = key.split("|", 1)
            by_phase[phase] += n
            if not phase.startswith("model_"):
                per_op[op].append(n)
        for p in PHASES:
            counts[p].append(by_phase.get(p, 0))
    if res["op_counts"]:
        row["ops"] = {p: med(v) for p, v in counts.items()}
        row["ops_outside"] = sum(row["ops"][p] for p in OVERHEAD_PHASES)
        row["ops_model"] = row["ops"]["model_fwd"] + row["ops"]["model_bwd"]
        k = len(res["op_counts"])
        row["top_outside_ops"] = sorted(((sum(v) / k, op) for op, v in per_op.items()), reverse=True)[:12]
        row["gflop"] = med(res["flops"]) / 1e9
        row["gflops_rate"] = row["gflop"] / row["model_med"]
    row["threads"] = res["threads"]
    if "profile" in res:
        row["profile"] = res["profile"]
    return row


def ms(x):
    return f"{1e3 * x:.2f}" if x < 0.1 else f"{1e3 * x:.1f}"


def tables(rows: list[dict]) -> list[tuple[list[str], list[list[str]]]]:
    t1 = (["preset", "px / T5 tok", "threads", "steps", "step ms (median)", "step ms (min)", "model fwd+bwd ms",
           "overhead ms (median)", "**overhead share** (median of steps)", "overhead share (sum)",
           "share per run", "GFLOP/step (matmuls)", "model GFLOP/s (matmuls)"],
          [[r["preset"], f"{r['resolution']} / {r['t5_tokens']}", str(r["threads"]), str(r["n"]),
            ms(r["step_med"]), ms(r["step_min"]), ms(r["model_med"]), ms(r["overhead_med"]),
            f"**{100 * r['share_med']:.1f} %**", f"{100 * r['share_sum']:.1f} %",
            " / ".join(f"{100 * x:.1f}{' (contended, left out)' if c else ''}" for x, c in r["run_shares"]),
            f"{r.get('gflop', float('nan')):.2f}", f"{r.get('gflops_rate', float('nan')):.0f}"] for r in rows])
    t2 = (["preset"] + [f"{p} ms" for p in PHASES],
          [[r["preset"]] + [ms(r["phases"][p]) for p in PHASES] for r in rows])
    t3 = (["preset"] + [f"{p} ops" for p in PHASES] + ["outside the model", "model"],
          [[r["preset"]] + [f"{r['ops'][p]:.0f}" for p in PHASES] + [f"{r['ops_outside']:.0f}",
                                                                    f"{r['ops_model']:.0f}"]
           for r in rows if "ops" in r])
    return [t1, t2, t3]


def print_table(header, body, markdown: bool) -> None:
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for b in body:
            print("| " + " | ".join(b) + " |")
    else:
        widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
        print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        for b in body:
            print("  ".join(c.ljust(w) for c, w in zip(b, widths)))
    print()


def machine_text() -> str:
    import accelerate
    import torch
    import transformers

    from machine import cpu_model

    cpu = cpu_model()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} cores, load {load:.2f}; Python {platform.python_version()}, torch "
            f"{torch.__version__} ({torch.get_num_threads()} threads), accelerate {accelerate.__version__}, "
            f"transformers {transformers.__version__}")


def contention_probe(threads: int) -> tuple[float, float]:
    """Median time of a (320 x 512) @ (512 x 2048) matmul plus GELU (the small preset's MLP shape) with `threads`
    and with 1 thread. When another process holds a core, every parallel op waits for the descheduled thread:
    the multi-threaded time then goes far above the single-threaded one (10-15x seen on this machine)."""
    import torch

    a, b = torch.randn(320, 512), torch.randn(512, 2048)
    old = torch.get_num_threads()
    out = []
    for n in (threads or old, 1):
        torch.set_num_threads(n)
        ts = []
        for _ in range(15):
            t0 = time.perf_counter()
            torch.nn.functional.gelu(a @ b)
            ts.append(time.perf_counter() - t0)
        out.append(statistics.median(ts))
    torch.set_num_threads(old)
    return out[0], out[1]


def probe_text(threads: int) -> tuple[str, bool]:
    multi, single = contention_probe(threads)
    flag = ("  <- CONTENDED: another process holds a core; multi-threaded timings are unreliable "
            "(rerun on an idle machine or with --threads 1)") if multi > 1.5 * single else ""
    return (f"contention probe: {1e3 * multi:.2f} ms with {threads or 'default'} threads, {1e3 * single:.2f} ms "
            f"with 1, load average {os.getloadavg()[0]:.2f}{flag}"), bool(flag)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="tiny,small", help="comma list of tiny, small (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=5, help="steps dropped before timing (default: %(default)s)")
    ap.add_argument("--steps-tiny", type=int, default=PRESETS["tiny"][2], help="timed steps, tiny")
    ap.add_argument("--steps-small", type=int, default=PRESETS["small"][2], help="timed steps, small")
    ap.add_argument("--repeats", type=int, default=2,
                    help="trainer runs per preset, interleaved across presets; steps are pooled (default: %(default)s)")
    ap.add_argument("--count-steps", type=int, default=2, help="extra steps with op/FLOP counting (not timed)")
    ap.add_argument("--cache", choices=["disk", "memory"], default="disk",
                    help="latent and text-encoder caches on disk (npz, as large datasets use) or in memory")
    ap.add_argument("--workers", type=int, default=0, help="--max_data_loader_n_workers (default: %(default)s)")
    ap.add_argument("--no-logging", dest="logging", action="store_false", help="no --logging_dir (TensorBoard)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads; 0 (default): torch's default, or 1 when the start-up contention probe "
                         "finds another process holding a core (announced)")
    ap.add_argument("--budget-s", type=float, default=60.0,
                    help="per trainer run: stop timing after this many seconds of training once 10 steps are "
                         "timed (a loaded machine; reported). 0: no limit (default: %(default)s)")
    ap.add_argument("--optimizer-args", default=None,
                    help='extra --optimizer_args for the trainer, space-separated, e.g. "fused=True"')
    ap.add_argument("--limit", type=float, default=0.10, help="largest overhead share allowed, small preset")
    ap.add_argument("--profile", choices=["tiny", "small"], default=None,
                    help="run only this preset under cProfile and print the top functions (timings perturbed)")
    ap.add_argument("--markdown", action="store_true", help="print Markdown tables")
    ap.add_argument("--keep", default=None, help="work folder to keep (default: a temporary folder)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return run_child(args)
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # subprocess.run then kills the trainer process

    presets = [args.profile] if args.profile else [p.strip() for p in args.presets.split(",") if p.strip()]
    steps_for = {"tiny": args.steps_tiny, "small": args.steps_small}
    work_root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_train_step_"))
    work_root.mkdir(parents=True, exist_ok=True)
    print(machine_text())
    print(f"LoRA dim 16, AdamW, clip 1.0, batch 1, fp32, caches: {args.cache}, workers: {args.workers}, "
          f"TensorBoard logging: {'on' if args.logging else 'off'}; warm-up {args.warmup} steps\n")
    text, contended = probe_text(args.threads)
    print(text)
    if contended and not args.threads:
        args.threads = 1
        print("=> running with 1 torch thread (--threads 1): with another process on a core, a 2-thread run is "
              "10x slower and measures the contention, not the trainer. Force threads with --threads N.")
    results: dict[str, list[dict]] = {p: [] for p in presets}
    prepared = {}
    t_start = time.perf_counter()
    for repeat in range(1 if args.profile else args.repeats):
        for preset in presets:
            resolution, t5_tokens, _ = PRESETS[preset]
            timed = steps_for[preset]
            total_steps = args.warmup + timed + (0 if args.profile else args.count_steps) + 1
            work = work_root / preset
            if preset not in prepared:
                prepared[preset] = (write_models(work / "models", preset),
                                    write_data(work / "data", resolution, total_steps))
            paths, toml = prepared[preset]
            spec = {"argv": trainer_argv(paths, toml, work, total_steps, t5_tokens, args), "timed": timed,
                    "result": str(work / f"result{repeat}.json")}
            (work / "spec.json").write_text(json.dumps(spec))
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(work / "spec.json"),
                   "--warmup", str(args.warmup), "--count-steps", str(args.count_steps),
                   "--threads", str(args.threads), "--budget-s", str(args.budget_s)]
            if args.profile:
                cmd += ["--profile", preset]
            t0 = time.perf_counter()
            with open(work / f"trainer{repeat}.log", "w") as log:
                proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            if proc.returncode != 0:
                print(f"{preset}: the trainer failed (exit {proc.returncode}); see {work / f'trainer{repeat}.log'}")
                print((work / f"trainer{repeat}.log").read_text()[-3000:])
                return 2
            res = json.loads(Path(spec["result"]).read_text())
            after, contended_after = probe_text(args.threads)
            res["contended"] = contended_after and res["threads"] > 1
            results[preset].append(res)
            share = med([s["overhead"] / s["step"] for s in res["steps"]])
            print(f"{preset} run {repeat + 1}: {time.perf_counter() - t0:.0f} s, {res['threads']} torch threads, "
                  f"{len(res['steps'])} steps timed{' (cut by --budget-s)' if res['cut'] else ''}, "
                  f"overhead {100 * share:.1f} % (median); after: " + after)
    rows = []
    for preset in presets:
        resolution, t5_tokens, _ = PRESETS[preset]
        runs = results[preset]
        clean = [r for r in runs if not r["contended"]] or runs  # runs flagged as contended are left out
        pooled = {"steps": [s for r in clean for s in r["steps"]], "threads": clean[0]["threads"],
                  "op_counts": [c for r in runs for c in r["op_counts"]],
                  "flops": [f for r in runs for f in r["flops"]]}
        if "profile" in runs[0]:
            pooled["profile"] = runs[0]["profile"]
        row = summarise(preset, pooled, resolution, t5_tokens)
        row["run_shares"] = [(med([s["overhead"] / s["step"] for s in r["steps"]]), r["contended"]) for r in runs]
        row["gate_note"] = (f"median of {row['n']} steps; {len(runs) - len(clean)} of {len(runs)} runs left out "
                            "as contended" if len(clean) < len(runs) else f"median of {row['n']} steps")
        rows.append(row)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s\n")
    for header, body in tables(rows):
        if body:
            print_table(header, body, args.markdown)
    for r in rows:
        if "top_outside_ops" in r:
            print(f"{r['preset']}: most frequent aten ops outside the model, per step: "
                  + ", ".join(f"{op} {n:.0f}" for n, op in r["top_outside_ops"]))
        if "profile" in r:
            print(r["profile"])
    if not args.keep:
        import shutil

        shutil.rmtree(work_root, ignore_errors=True)
    small = next((r for r in rows if r["preset"] == "small"), None)
    if args.profile or small is None:
        return 0
    if any(r["contended"] for rs in results.values() for r in rs):
        print("\nwarning: another process took a core during a multi-threaded run (probe after the run); such a "
              "run measures OpenMP waiting for a descheduled thread, not the trainer. Rerun on an idle machine or "
              "with --threads 1.")
    ok = small["share_med"] <= args.limit
    print(f"\nsmall preset: overhead {100 * small['share_med']:.1f} % of a step ({small['gate_note']}), limit "
          f"{100 * args.limit:.0f} %: {'ok' if ok else 'OVER THE LIMIT'}")
    return 0 if ok else 1

if __name__ == "__main__":
    sys.exit(main())
