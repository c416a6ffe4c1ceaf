"""Counting the bytes a training step keeps alive, on tensors that may hold no data (`meta`).

Two small context managers the memory planner (library/planner/plan.py) stacks around one real training step:

* `LiveBytes` -- a TorchDispatchMode that sees every tensor an op creates below autograd, keeps a weak reference
  to its storage and so knows the live bytes at every moment, their peak, and what was alive at the peak (each
  storage tagged with the phase that made it: forward, backward, optimizer, or re-tagged as a gradient).
  `torch.distributed._tools.mem_tracker.MemTracker` cannot be used: it fails on frozen parameters (LoRA).
* `device_emulation` -- what `meta` lacks: the fused attention kernel of the target device, and CUDA autocast.

`SavedBytes` counts what autograd keeps for backward in a forward (bench/bench_saved_for_backward.py, tests).
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """Live bytes of the storages created under this mode on `device` (a device type: "meta", "cpu", "cuda").

    Storages that exist before (weights, optimizer states) are registered with `ignore` and never counted, even
    when an in-place op returns them. `peak` is the maximum of `live`; `at_peak` holds the live bytes by
    tag (the phase that allocated them: forward, backward, optimizer; or "gradients") at that moment."""

    def __init__(self, device: str):
        super().__init__()
        self.device = device
        self.phase = "forward"
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, list] = {}  # key -> [nbytes, tag]
        self._ids: dict[int, int] = {}  # id(storage object) -> key (storage python objects are preserved)
        self._ignored: set[int] = set()
        self._keep: list = []  # the ignored storages, so that their ids stay theirs
        self._next = 0
        self._by_tag: dict[str, int] = {}
        self.at_peak: dict[str, int] = {}  # live bytes by tag when the peak was reached

    def ignore(self, tensors) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                self._ignored.add(id(st))
                self._keep.append(st)

    def release(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` now stands for memory off the device (e.g. checkpointed inputs offloaded to the CPU): its bytes
        leave the count and it is never counted again."""
        sid = id(tensor.untyped_storage())
        key = self._ids.pop(sid, None)
        if key is not None:
            self._free(sid, key)
        self.ignore([tensor])
        return tensor

    def retag(self, tensor: torch.Tensor, tag: str) -> None:
        key = self._ids.get(id(tensor.untyped_storage()))
        if key is not None and key in self._sizes:
            entry = self._sizes[key]
            self._by_tag[entry[1]] -= entry[0]
            self._by_tag[tag] = self._by_tag.get(tag, 0) + entry[0]
            entry[1] = tag

    def live_by_tag(self) -> dict[str, int]:
        return dict(self._by_tag)

    def peak_by_tag(self) -> dict[str, int]:
        """Live bytes by tag at the moment of the peak (a gradient counts as such once autograd accumulated it)."""
        return dict(self.at_peak)

    def _track(self, t: torch.Tensor) -> None:
        if t.device.type != self.device:
            return
        st = t.untyped_storage()
        sid = id(st)
        if sid in self._ids or sid in self._ignored:
            return
        key, self._next = self._next, self._next + 1
        nbytes = st.nbytes()
        self._ids[sid] = key
        self._sizes[key] = [nbytes, self.phase]
        self.live += nbytes
        weakref.finalize(st, self._free, sid, key)
        self._by_tag[self.phase] = self._by_tag.get(self.phase, 0) + nbytes
        if self.live > self.peak:
            self.peak = self.live
            self.at_peak = dict(self._by_tag)

    def _free(self, sid: int, key: int) -> None:
        entry = self._sizes.pop(key, None)
        if entry is not None:
            self.live -= entry[0]
            self._by_tag[entry[1]] -= entry[0]
        if self._ids.get(sid) == key:
            del self._ids[sid]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    @contextmanager
    def in_phase(self, phase: str):
        previous, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = previous


# CUDA autocast's op lists, for the functions this suite's models call (torch.amp autocast op reference).
_LOWER = ("linear", "conv2d", "scaled_dot_product_attention")
_FP32 = ("layer_norm", "group_norm")


def _cast_args(fn, dtype, cache: dict | None = None, on_cache=None):
    def cast(x):
        if not (isinstance(x, torch.Tensor) and x.is_floating_point()) or x.dtype == dtype:
            return x
        if cache is None or not (x.is_leaf and x.requires_grad):
            return x.to(dtype)
        # autocast keeps its casts of trained leaf tensors (fp32 master weights) until the region ends
        key = (id(x), dtype)
        if key not in cache:
            cache[key] = (x, x.to(dtype))
            if on_cache is not None:
                on_cache(cache[key][1])
        return cache[key][1]

    def wrapper(*args, **kwargs):
        return fn(*(cast(a) for a in args), **{k: cast(v) for k, v in kwargs.items()})

    return wrapper


def _fused_attention(target: str):
    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
        mask = attn_mask
        if mask is not None and mask.dtype == torch.bool:  # both backends turn a boolean mask into a bias
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        if target == "cpu":
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask,
                                                                              scale=scale)[0]
        if mask is None and q.dtype in (torch.float16, torch.bfloat16):
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[0]
        if mask is not None:
            mask = mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, mask, True, 0.0, False,
                                                                      scale=scale)[0]

    return sdpa


@contextmanager
def device_emulation(target: str, autocast_dtype: torch.dtype | None, on_cache=None):
    """Run `torch.nn.functional` as on `target` ("cuda" or "cpu") while computing on `meta`:

    * attention as the fused kernel of the target (flash / memory-efficient on CUDA, the CPU flash kernel on CPU),
      so no attention matrix is counted -- on `meta` torch would take the math path and materialise it;
    * with `autocast_dtype`, the casts CUDA autocast makes: matrix products and attention in that dtype,
      layer/group norms in float32 (`meta` tensors have no autocast); like autocast, the casts of trained leaf
      tensors (fp32 master weights) are kept until the region ends (`on_cache` is called with each).

    The functions are swapped on the module for the duration (not a TorchFunctionMode: gradient checkpointing
    recomputes blocks on `meta` outside such modes). Not thread-safe; the planner runs alone."""
    saved = {name: getattr(F, name) for name in (*_LOWER, *_FP32)}
    cache: dict = {}
    try:
        F.scaled_dot_product_attention = _fused_attention(target)
        if autocast_dtype is not None:
            for name in _LOWER:
                setattr(F, name, _cast_args(getattr(F, name), autocast_dtype, cache, on_cache))
            for name in _FP32:
                setattr(F, name, _cast_args(getattr(F, name), torch.float32))
        yield
    finally:
        cache.clear()
        for name, fn in saved.items():
            setattr(F, name, fn)


def track_live_gradient_peak(params) -> Callable[[], int]:
    """Hook `params` so that the most gradient bytes alive at once during backward are recorded; returns a function
    that reads that peak. Register before any fused-optimizer hooks, so each gradient is seen before it is freed."""
    params = list(params)
    peak = [0]

    def track(_):
        peak[0] = max(peak[0], sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None))

    for p in params:
        p.register_post_accumulate_grad_hook(track)
    return lambda: peak[0]


class SavedBytes:
    """Distinct storages saved for backward under this context, minus those of `exclude` (params, inputs)."""

    def __init__(self, exclude):
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.saved: dict[int, tuple[int, str]] = {}

    def _pack(self, t):
        st = t.untyped_storage()
        if st.data_ptr() not in self.exclude and st.data_ptr() not in self.saved:
            self.saved[st.data_ptr()] = (st.nbytes(), "?")
        return t

    def attribute(self, outputs) -> None:
        """Name each saved storage after the first autograd node (walking back from `outputs`) that saved it."""
        seen, stack = set(), [o.grad_fn for o in outputs if o.grad_fn is not None]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            for attr in dir(node):
                if attr.startswith("_saved_"):
                    value = getattr(node, attr)
                    for t in value if isinstance(value, (tuple, list)) else (value,):
                        if isinstance(t, torch.Tensor):
                            ptr = t.untyped_storage().data_ptr()
                            if ptr in self.saved and self.saved[ptr][1] == "?":
                                self.saved[ptr] = (self.saved[ptr][0], f"{node.name()}{tuple(t.shape)}")
            stack.extend(n for n, _ in node.next_functions)

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(n for n, _ in self.saved.values())

    def by_op(self) -> list[tuple[str, int]]:
        return sorted(((op, n) for n, op in self.saved.values()), key=lambda kv: -kv[1])
