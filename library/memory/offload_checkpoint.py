"""Gradient checkpointing whose saved block inputs wait in CPU memory (--cpu_offload_checkpointing).

Plain checkpointing keeps each block's inputs on the device until backward recomputes the block; at 1024x1024 on
FLUX.1-dev those are the image and text streams of every block (about 27 MiB each in bf16, ~1.6 GiB over 57 blocks).
Here the forward runs the block without recording a graph, copies the listed inputs to (pinned) CPU memory and
drops the device copies; the backward brings them back, recomputes the block with a graph and back-propagates
through it. RNG and autocast states are restored for the recomputation, as torch.utils.checkpoint does, so LoRA
dropout draws the same masks.

An autograd.Function only gets a backward when one of its inputs requires grad; with a frozen base (LoRA) the
first block's inputs do not, so a zero-size tensor that requires grad is passed along to keep the backward.

Code running inside the block (block swapping's hooks) sees grad mode off although a backward will come: it asks
`recording_for_backward()`, and `call_before_backward(fn)` stands in for a hook on outputs that require grad.

Transfers on CUDA run on a side stream of this module, ordered against compute with events, so they overlap it:

* forward: the inputs' copies to pinned memory start once their producers have run and overlap the block's own
  forward; the compute stream waits for them at the end of the block, so the caller may free (or change) the
  device tensors afterwards and their memory is reused at once;
* backward: the backward visits the blocks in the reverse order of their forwards, so each offloaded block links
  to the one offloaded before it. While a block recomputes and back-propagates, the inputs of that previous block
  (normally the next backward) are copied back; its recomputation waits for them with an event. Only the first
  backward waits for its own inputs.

Sharing the link with block swapping (library/memory/block_swap.py, its own side stream): in forward the inputs
go device to host while the swapper's weights go host to device, opposite directions of a full-duplex link (one
copy engine each). In backward both go host to device: per block step one block's weights (FLUX.1 in fp8: ~324 MiB
for a double block, ~135 MiB for a single one; twice that in bf16) and one block's inputs (~27 MiB at 1024x1024),
so the inputs add 8-20% to the bytes the backward moves. Both are issued ahead of need (the weights K - 1 block
steps, the inputs one block step) and the engine serves them in issue order, so they share the link without
waiting on each other as long as one block's recomputation and backward outlast the transfers. On the CPU (tests)
every copy is synchronous.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch


_OFFLOADED = object()  # marks an argument that waits on the CPU

# callbacks of each offloaded block whose forward is running (innermost last)
_recording: list[list[Callable[[], None]]] = []
_last_offloaded = None  # weakref to the _HostInputs made last: the next one links to it
_side_streams: dict[torch.device, torch.cuda.Stream] = {}


def recording_for_backward() -> bool:
    """True while an offloaded block runs its graph-less forward, its backward (with recomputation) to come."""
    return bool(_recording)


def call_before_backward(fn: Callable[[], None]) -> None:
    """Have the offloaded block whose forward is running call `fn()` when its backward starts, before its inputs
    come back and it is recomputed."""
    if not _recording:
        raise RuntimeError("call_before_backward() called outside the forward of an offloaded block")
    _recording[-1].append(fn)


def offloaded_checkpoint(block: Callable, args: tuple, offload: tuple[int, ...]):
    """Call `block(*args)` with the tensors at positions `offload` kept on the CPU until backward."""
    anchor = torch.empty(0, requires_grad=True)
    return _OffloadedBlock.apply(block, offload, anchor, *args)


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device)
    return _side_streams[device]


class _HostInputs:
    """One block's offloaded inputs, from the forward's copies to pinned memory until its backward takes them back.
    `previous`: weakref to the inputs of the block offloaded before this one (its backward normally comes next)."""

    def __init__(self, tensors: list[torch.Tensor]):
        global _last_offloaded
        self.devices = [t.device for t in tensors]
        self.host = [self._to_host(t) for t in tensors]
        self.fetched = None  # [(device tensor, event it is ready at or None)] once the copies back are queued
        self.previous, _last_offloaded = _last_offloaded, weakref.ref(self)

    @staticmethod
    def _to_host(t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "cpu":
            return t.detach().clone()  # the caller may modify it in place; the recomputation needs this value
        out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
        if t.device.type != "cuda":
            out.copy_(t, non_blocking=True)
            return out
        side = _side_stream(t.device)
        side.wait_stream(torch.cuda.current_stream(t.device))  # t's producers are queued on the compute stream
        with torch.cuda.stream(side):
            out.copy_(t, non_blocking=True)
        return out

    def wait_for_copies_to_host(self) -> None:
        """Make the compute streams wait for the forward's copies (the caller frees the device tensors next)."""
        for device in {d for d in self.devices if d.type == "cuda"}:
            torch.cuda.current_stream(device).wait_stream(_side_stream(device))

    def prefetch(self) -> None:
        """Queue the copies back to the device on the side stream, unless done already or taken (CUDA only: on other
        devices `take` copies synchronously)."""
        if self.host is None or self.fetched is not None or not any(d.type == "cuda" for d in self.devices):
            return
        self._fetch()

    def _fetch(self) -> None:
        self.fetched = []
        for host, device in zip(self.host, self.devices):
            if device.type != "cuda":
                self.fetched.append((host.to(device, non_blocking=True), None))
                continue
            out = torch.empty(host.shape, dtype=host.dtype, device=device)  # the compute stream frees it later
            side = _side_stream(device)
            side.wait_stream(torch.cuda.current_stream(device))  # its memory may still be read by queued compute
            with torch.cuda.stream(side):
                out.copy_(host, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(side)
            self.fetched.append((out, ready))
        self.host = None  # the pinned memory is reused only once the copies have read it (caching host allocator)

    def take(self) -> list[torch.Tensor]:
        """The inputs back on their devices, usable on the compute stream."""
        if self.fetched is None:
            self._fetch()
        tensors = []
        for t, ready in self.fetched:
            if ready is not None:
                torch.cuda.current_stream(t.device).wait_event(ready)
            tensors.append(t)
        self.fetched = None
        return tensors


class _OffloadedBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, block, offload, anchor, *args):
        ctx.block, ctx.offload = block, set(offload)
        ctx.devices = [a.device if isinstance(a, torch.Tensor) else None for a in args]
        ctx.grad_mask = [isinstance(a, torch.Tensor) and a.requires_grad for a in args]
        ctx.kept = [_OFFLOADED if isinstance(a, torch.Tensor) and i in ctx.offload else a for i, a in enumerate(args)]
        ctx.host_inputs = _HostInputs([a for a, k in zip(args, ctx.kept) if k is _OFFLOADED])
        device = next((d for d in ctx.devices if d is not None), torch.device("cpu"))
        ctx.device_type = device.type
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        ctx.autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        ctx.before_backward = []
        _recording.append(ctx.before_backward)
        try:
            with torch.no_grad():
                out = block(*args)
        finally:
            _recording.pop()
        ctx.host_inputs.wait_for_copies_to_host()
        return out

    @staticmethod
    def backward(ctx, *grads):
        for fn in ctx.before_backward:  # block swapping: this block's weights are in place from here on
            fn()
        back = iter(ctx.host_inputs.take())
        previous = ctx.host_inputs.previous() if ctx.host_inputs.previous is not None else None
        if previous is not None:
            previous.prefetch()  # normally the next backward: its inputs travel while this block recomputes
        inputs = []
        for a, needs in zip(ctx.kept, ctx.grad_mask):
            if a is _OFFLOADED:
                a = next(back)
            if isinstance(a, torch.Tensor):
                a = a.detach().requires_grad_(needs)
            inputs.append(a)
        devices = [torch.device(ctx.device_type)] if ctx.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices, device_type=ctx.device_type):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng)
            enabled, dtype = ctx.autocast
            with torch.enable_grad(), torch.autocast(ctx.device_type, dtype=dtype, enabled=enabled):
                out = ctx.block(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        ctx.block = ctx.kept = ctx.host_inputs = ctx.before_backward = None
        return (None, None, None, *[a.grad if isinstance(a, torch.Tensor) and needs else None
                                    for a, needs in zip(inputs, ctx.grad_mask)])
