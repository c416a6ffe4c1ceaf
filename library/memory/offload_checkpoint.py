"""Gradient checkpointing whose saved block inputs wait in CPU memory (--cpu_offload_checkpointing).

Plain checkpointing keeps each block's inputs on the device until backward recomputes the block; at 1024x1024 on
FLUX.1-dev those are the image and text streams of every block (about 28 MiB each in bf16, ~1.6 GiB over 57 blocks).
Here the forward runs the block without recording a graph, copies the listed inputs to (pinned) CPU memory and
drops the device copies; the backward brings them back, recomputes the block with a graph and back-propagates
through it. RNG and autocast states are restored for the recomputation, as torch.utils.checkpoint does, so LoRA
dropout draws the same masks.

An autograd.Function only gets a backward when one of its inputs requires grad; with a frozen base (LoRA) the
first block's inputs do not, so a zero-size tensor that requires grad is passed along to keep the backward.
"""

from __future__ import annotations

from typing import Callable

import torch


_OFFLOADED = object()  # marks an argument that waits on the CPU


def offloaded_checkpoint(block: Callable, args: tuple, offload: tuple[int, ...]):
    """Call `block(*args)` with the tensors at positions `offload` kept on the CPU until backward."""
    anchor = torch.empty(0, requires_grad=True)
    return _OffloadedBlock.apply(block, offload, anchor, *args)


def _to_cpu(t: torch.Tensor) -> torch.Tensor:
    if t.device.type == "cpu":
        return t.detach().clone()  # the caller may modify it in place; the recomputation needs this value
    out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out


class _OffloadedBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, block, offload, anchor, *args):
        ctx.block, ctx.offload = block, set(offload)
        ctx.devices = [a.device if isinstance(a, torch.Tensor) else None for a in args]
        ctx.grad_mask = [isinstance(a, torch.Tensor) and a.requires_grad for a in args]
        kept, stored = [], []
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor) and i in ctx.offload:
                stored.append(_to_cpu(a))
                kept.append(_OFFLOADED)
            else:
                kept.append(a)
        ctx.kept, ctx.stored = kept, stored
        device = next((d for d in ctx.devices if d is not None), torch.device("cpu"))
        ctx.device_type = device.type
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        ctx.autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        with torch.no_grad():
            out = block(*args)
        return out

    @staticmethod
    def backward(ctx, *grads):
        stored = iter(ctx.stored)
        inputs = []
        for a, device, needs in zip(ctx.kept, ctx.devices, ctx.grad_mask):
            if a is _OFFLOADED:
                a = next(stored).to(device, non_blocking=True)
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
        ctx.block = ctx.kept = ctx.stored = None
        return (None, None, None, *[a.grad if isinstance(a, torch.Tensor) and needs else None
                                    for a, needs in zip(inputs, ctx.grad_mask)])
