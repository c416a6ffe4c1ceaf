"""Block swapping: keep only some transformer blocks' weights on the compute device and stream the others in.

A stack of N identical blocks gets K = N - S compute-side *slots* (one flat byte buffer per slot, allocated once);
S blocks live in (pinned, with CUDA) storage memory and are copied into a slot shortly before they run. Each
transfer is one contiguous copy of a whole block on a side CUDA stream, ordered against compute with events, so it
overlaps the blocks computing meanwhile. Parameters keep their identity (optimizers and LoRA hooks see the same
`nn.Parameter` objects); only their `.data` is re-pointed between a slot view and a storage view.

The schedule (`swap_schedule`) is a pure function, the same for both stacks:

* forward, when a backward follows: after block i < S runs, its slot receives block i + K. The forward ends with
  the last K blocks resident, which the backward needs first;
* backward: after block b >= K has been back-propagated, its slot receives block b - K. The backward ends in the
  initial layout (blocks 0..K-1 resident), so the next step needs no preparation. Every block runs its backward in
  the slot it ran its forward in: autograd may have saved views of a weight (e.g. the transposed weight of a
  matmul) that point into the slot memory, so they must read the same block's weights again;
* forward only (inference, validation, a frozen stack): blocks are sent back as soon as they have run, so the pass
  also ends in the initial layout; it moves min(2S, N) blocks per pass. A no-grad pass between a forward and its
  backward (differential output preservation) starts from the layout it finds and restores it, so the pending
  backward is unaffected.

Two modes for what leaves the compute device:

* host-to-device-only (`host_to_device_only=True`; frozen weights: LoRA training, inference): the storage copy is
  the master and an evicted block is simply overwritten, so nothing is ever copied back. It halves the bytes moved
  and a slot can be refilled as soon as its block has computed, without waiting for a copy back.
* write-back (trained weights, full fine-tuning): an evicted block's weights, and its gradients when it has them,
  are copied back to storage, so an optimizer stepping in backward (fused) or after it sees and updates the right
  tensors. Swapped blocks' parameters are on the storage device while the optimizer steps after backward.

Gradient checkpointing runs the hooks inside the checkpoint; a recomputation in backward is skipped (the backward
hooks placed the block already). With --cpu_offload_checkpointing the block's forward runs without a graph although
a backward follows: library/memory/offload_checkpoint.py says so (`recording_for_backward`) and calls the
pre-backward hook itself (`call_before_backward`), so the schedule is the same as with plain checkpointing.

Blocks are moved by `prepare()` and must not be moved by `.to()` afterwards (it raises): move the rest of a model
with `move_to_device_except_swap_blocks(model, device)`. Devices may be any pair whose tensors a parameter can be
re-pointed between (CPU/CPU with separate buffers for tests, CUDA/CPU, meta/meta for planning without data).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from library.memory import offload_checkpoint

logger = logging.getLogger(__name__)

_ALIGN = 64  # byte alignment of each tensor inside a block's flat buffer (any dtype can view it)


# --- how many blocks ------------------------------------------------------------------------------------------------


def split_blocks_to_swap(n: int, num_double: int, num_single: int) -> tuple[int, int]:
    """sd-scripts' split of --blocks_to_swap: n // 2 double blocks and (n - n // 2) * 2 single blocks (a single block
    has about half a double block's weights). Each stack keeps at least 2 blocks resident."""
    limit = max_blocks_to_swap(num_double, num_single)
    if not 0 <= n <= limit:
        raise ValueError(f"--blocks_to_swap {n} is out of range: this model ({num_double} double and {num_single} "
                         f"single blocks) can swap 1 to {limit} blocks")
    return n // 2, (n - n // 2) * 2


def max_blocks_to_swap(num_double: int, num_single: int) -> int:
    """The largest n whose split leaves 2 blocks of each stack on the compute device (35 for FLUX.1)."""
    n = 0
    while (n + 1) // 2 <= num_double - 2 and ((n + 1) - (n + 1) // 2) * 2 <= num_single - 2:
        n += 1
    return n


# --- the schedule (pure) --------------------------------------------------------------------------------------------


Move = tuple[int, int]  # (block fetched to the compute device, block whose slot it takes)


@dataclass(frozen=True)
class SwapSchedule:
    """Which block moves where around each block step of one stack of `num_blocks` with `num_swapped` swapped."""

    num_blocks: int
    num_swapped: int

    @property
    def num_slots(self) -> int:
        return self.num_blocks - self.num_swapped

    @property
    def initial(self) -> tuple[int, ...]:
        """Block in each slot before a step (and after a forward+backward or a forward-only pass)."""
        return tuple(range(self.num_slots))

    @property
    def swapped_blocks(self) -> tuple[int, ...]:
        """Blocks that ever leave the compute device (they get a storage copy)."""
        n, s, k = self.num_blocks, self.num_swapped, self.num_slots
        return tuple(b for b in range(n) if s and (b < s or b >= k))

    def before_forward(self, i: int, slots) -> tuple[Move, ...]:
        """Moves that must happen before block i runs: none in a regular pass (its fetch was issued K - 1 blocks
        earlier); in a pass that starts from another layout (a no-grad forward between a forward and its
        backward, e.g. differential output preservation) the first blocks are fetched on demand."""
        slot = i % self.num_slots
        return ((i, slots[slot]),) if slots[slot] != i else ()

    def after_forward(self, i: int, backward_follows: bool, start=None) -> tuple[Move, ...]:
        """Moves to start once block i has run forward. Block x always lives in slot x % K; `start` is the layout
        the pass began with (the initial one unless the pass is nested), which a forward-only pass restores."""
        n, k = self.num_blocks, self.num_slots
        if i + k < n:  # i < S: the slot's next block in this pass
            return ((i + k, i),)
        home = (start or self.initial)[i % k]
        if backward_follows or home == i:
            return ()
        return ((home, i),)  # the slot's last block in this pass: give the slot back its block from the start

    def after_backward(self, b: int) -> tuple[Move, ...]:
        """Moves to start once block b has been back-propagated."""
        return ((b - self.num_slots, b),) if self.num_swapped and b >= self.num_slots else ()

    def simulate(self, first_trained: int | None = 0, nested_forward: bool = False
                 ) -> list[tuple[str, int, tuple[int, ...]]]:
        """Run the schedule on slot contents: [(phase, block, slots before that step)] for one forward (and a
        backward over blocks >= `first_trained`; None: forward only), with `nested_forward` a forward-only pass
        between the forward and its backward. Raises AssertionError on any violation: a block that runs without
        its weights, a backward in another slot than its forward, a fetch into a slot that does not hold the
        evicted block, a regular pass that needs an on-demand fetch, a final layout other than the initial one."""
        slots = list(self.initial)
        where_forward: dict[int, int] = {}
        log = []

        def apply(moves):
            for fetch, evict in moves:
                assert fetch not in slots, f"block {fetch} fetched while resident"
                assert slots[fetch % self.num_slots] == evict, f"block {fetch}'s slot does not hold block {evict}"
                slots[fetch % self.num_slots] = fetch

        def forward(phase, trained_from, start):
            for i in range(self.num_blocks):
                on_demand = self.before_forward(i, slots)
                assert phase == "nested forward" or not on_demand, f"forward {i}: not prefetched"
                apply(on_demand)
                log.append((phase, i, tuple(slots)))
                if phase == "forward":
                    where_forward[i] = slots.index(i)
                apply(self.after_forward(i, trained_from is not None and i >= trained_from, start))

        forward("forward", first_trained, None)
        if nested_forward:
            start = tuple(slots)
            forward("nested forward", None, start)
            assert tuple(slots) == start, f"nested pass left {slots}, not {start}"
        if first_trained is not None:
            for b in range(self.num_blocks - 1, first_trained - 1, -1):
                if b + 1 < self.num_blocks:
                    apply(self.after_backward(b + 1))
                assert b in slots, f"backward {b}: not resident in {slots}"
                assert slots.index(b) == where_forward[b], f"backward {b}: another slot than its forward"
                log.append(("backward", b, tuple(slots)))
            apply(restore_moves(self, slots))
        assert tuple(slots) == self.initial, f"layout {slots} is not the initial {self.initial}"
        return log


def swap_schedule(num_blocks: int, num_swapped: int) -> SwapSchedule:
    if not 0 <= num_swapped < num_blocks:
        raise ValueError(f"cannot swap {num_swapped} of {num_blocks} blocks: at most {num_blocks - 1}")
    return SwapSchedule(num_blocks, num_swapped)


def restore_moves(schedule: SwapSchedule, slots) -> tuple[Move, ...]:
    """Moves that bring `slots` back to the initial layout (when a backward stopped early or never came)."""
    return tuple((slot, block) for slot, block in enumerate(slots) if block != slot)


# --- the runtime ----------------------------------------------------------------------------------------------------


@dataclass
class _Layout:
    """Where each parameter of a block sits inside the block's flat buffer (all blocks of a stack share it)."""

    names: list[str]
    shapes: list[torch.Size]
    dtypes: list[torch.dtype]
    offsets: list[int]
    sizes: list[int]
    nbytes: int

    @classmethod
    def of(cls, block: nn.Module) -> "_Layout":
        names, shapes, dtypes, offsets, sizes, pos = [], [], [], [], [], 0
        for name, p in block.named_parameters():
            size = p.numel() * p.element_size()
            names.append(name), shapes.append(p.shape), dtypes.append(p.dtype), offsets.append(pos), sizes.append(size)
            pos += -(-size // _ALIGN) * _ALIGN
        return cls(names, shapes, dtypes, offsets, sizes, pos)

    def check(self, index: int, block: nn.Module) -> None:
        got = [(n, p.shape, p.dtype) for n, p in block.named_parameters()]
        want = list(zip(self.names, self.shapes, self.dtypes))
        if got != want:
            diff = next((g, w) for g, w in zip(got + [None] * len(want), want + [None] * len(got)) if g != w)
            raise ValueError(f"block {index} differs from block 0 ({diff[0]} vs {diff[1]}): swapped blocks must have "
                             "the same parameters, shapes and dtypes (cast the model before enabling block swap)")

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[o:o + n].view(d).view(s) for o, n, s, d in zip(self.offsets, self.sizes, self.shapes, self.dtypes)]


def _device_of(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


@dataclass
class SwapStats:
    h2d_bytes: int = 0  # storage -> compute
    d2h_bytes: int = 0  # compute -> storage (write-back mode only)
    moves: int = 0
    restores: int = 0  # layouts restored outside the schedule (a backward that stopped early or never came)


class BlockSwapper:
    """Swaps the weights of `num_swapped` of `blocks` between `compute_device` and `storage_device` (see the module
    docstring). Call `prepare()` once; it installs forward hooks and, for training, per-step backward hooks."""

    def __init__(self, blocks: list[nn.Module], num_swapped: int, compute_device, storage_device, *,
                 host_to_device_only: bool):
        self.blocks = list(blocks)
        self.schedule = swap_schedule(len(self.blocks), num_swapped)
        self.compute, self.storage = _device_of(compute_device), _device_of(storage_device)
        self.host_to_device_only = host_to_device_only
        self.layout = _Layout.of(self.blocks[0])
        for i, b in enumerate(self.blocks[1:], 1):
            self.layout.check(i, b)
        probe_c = torch.empty(0, device=self.compute)
        if not torch._has_compatible_shallow_copy_type(probe_c, torch.empty(0, device=self.storage)):
            raise ValueError(f"cannot swap between {self.compute} and {self.storage}: PyTorch cannot point a "
                             "parameter at tensors of both (use cpu/cpu, cuda/cpu or meta/meta)")
        self.cuda = self.compute.type == "cuda"
        self.stats = SwapStats()
        self.prepared = False
        self._slots_of: list[int] = []  # slot -> block
        self._hooks = []

    # -- sizes ---------------------------------------------------------------------------------------------------

    @property
    def block_bytes(self) -> int:
        return self.layout.nbytes

    @property
    def buffer_bytes(self) -> int:
        """Compute-side bytes of the slots that hold different blocks over a step."""
        return min(self.schedule.num_swapped, self.schedule.num_slots) * self.block_bytes

    @property
    def resident_bytes(self) -> int:
        """Compute-side bytes of slots that keep one block for good, plus the blocks' non-parameter tensors."""
        fixed = self.schedule.num_slots - min(self.schedule.num_swapped, self.schedule.num_slots)
        extra = sum(t.numel() * t.element_size() for b in self.blocks for t in b.buffers())
        return fixed * self.block_bytes + extra

    # -- placement -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def prepare(self) -> "BlockSwapper":
        """Allocate storage copies and slots, place every block, install the hooks. Idempotent."""
        if self.prepared:
            self.restore_layout()
            return self
        sch = self.schedule
        swapped = set(sch.swapped_blocks)
        self._store: dict[int, torch.Tensor] = {}
        self._grad_store: dict[int, torch.Tensor] = {}
        self._slots = [torch.empty(self.block_bytes, dtype=torch.uint8, device=self.compute)
                       for _ in range(sch.num_slots)]
        for b in range(sch.num_blocks):  # block by block: the loaded tensors are freed as their copies are made
            if b in swapped:
                self._store[b] = self._storage_buffer()
                for view, p in zip(self.layout.views(self._store[b]), self.blocks[b].parameters()):
                    view.copy_(p.data)
            if b < sch.num_slots:
                for view, p in zip(self.layout.views(self._slots[b]), self.blocks[b].parameters()):
                    view.copy_(p.data)
            self._point(b, self._slots[b] if b < sch.num_slots else self._store[b])
        for block in self.blocks:
            for name, buf in list(block.named_buffers()):
                _set_buffer(block, name, buf.to(self.compute))
        self._slots_of = list(sch.initial)
        self._ready: dict[int, object] = {}
        if self.cuda:
            self._stream = torch.cuda.Stream(self.compute)
        self._backward_pending = False
        self._in_backward = False
        self._last_backward = None
        self._pass_start = None
        if sch.num_swapped:
            for i, block in enumerate(self.blocks):
                self._hooks.append(block.register_forward_pre_hook(self._make_pre_forward(i)))
                self._hooks.append(block.register_forward_hook(self._make_post_forward(i)))
        for block in self.blocks:
            block._apply = _refuse_move
        self.prepared = True
        logger.info("block swap: %d of %d blocks swapped, %d slots of %.1f MiB on %s, %s", sch.num_swapped,
                    sch.num_blocks, sch.num_slots, self.block_bytes / 2**20, self.compute,
                    "host-to-device only" if self.host_to_device_only else "with write-back")
        return self

    def _storage_buffer(self) -> torch.Tensor:
        """One block's bytes in storage memory (pinned host memory when the compute device is a GPU)."""
        pin = self.cuda and self.storage.type == "cpu"
        return torch.empty(self.block_bytes, dtype=torch.uint8, device=self.storage, pin_memory=pin)

    def _point(self, b: int, flat: torch.Tensor) -> None:
        for view, p in zip(self.layout.views(flat), self.blocks[b].parameters()):
            p.data = view

    def resident(self) -> tuple[int, ...]:
        """Blocks whose weights are on the compute device, by slot."""
        return tuple(self._slots_of)

    # -- moving one block ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def _move(self, fetch: int, evict: int) -> None:
        """Block `fetch` into the slot of block `evict` (write-back: `evict`'s weights and gradients out first).
        On CUDA every copy is queued on the side stream behind an event of the compute stream; the host never
        waits, the fetched block's first use waits for its event (`_wait`)."""
        slot = fetch % self.schedule.num_slots
        if self._slots_of[slot] != evict:
            raise RuntimeError(f"block swap: slot {slot} holds block {self._slots_of[slot]}, not {evict} (schedule "
                               "out of step)")
        params_out, params_in = list(self.blocks[evict].parameters()), list(self.blocks[fetch].parameters())
        grads_out = [p.grad for p in params_out] if not self.host_to_device_only else []
        # gradients kept on storage from an earlier micro-batch (accumulation) come back with their weights;
        # their device buffers are allocated on the compute stream before the event the copies wait for
        grads_in = [(p, torch.empty_like(p.grad, device=self.compute)) for p in params_in
                    if p.grad is not None and p.grad.device != self.compute]
        if self.cuda:
            freed = torch.cuda.Event()
            freed.record(torch.cuda.current_stream(self.compute))
        with torch.cuda.stream(self._stream) if self.cuda else _nullcontext:
            if self.cuda:
                self._stream.wait_event(freed)
            if not self.host_to_device_only:
                self._store[evict].copy_(self._slots[slot], non_blocking=True)
                self.stats.d2h_bytes += self.block_bytes
                self._grads_to_storage(evict, params_out, grads_out)
            self._slots[slot].copy_(self._store[fetch], non_blocking=True)
            self.stats.h2d_bytes += self.block_bytes
            for p, buf in grads_in:
                buf.copy_(p.grad, non_blocking=True)
            if self.cuda:
                ready = torch.cuda.Event()
                ready.record(self._stream)
                self._ready[fetch] = ready
        self._point(evict, self._store[evict])
        self._point(fetch, self._slots[slot])
        if any(g is not None for g in grads_out):
            for p, view in zip(params_out, self.layout.views(self._grad_store[evict])):
                if p.grad is not None:
                    p.grad = view
        for p, buf in grads_in:
            p.grad = buf
        self._slots_of[slot] = fetch
        self.stats.moves += 1

    def _grads_to_storage(self, b: int, params, grads) -> None:
        """Write-back mode: gradients follow their weights (an optimizer needs both on one device)."""
        if all(g is None for g in grads):
            return
        if b not in self._grad_store:
            self._grad_store[b] = self._storage_buffer().zero_()
        for view, g in zip(self.layout.views(self._grad_store[b]), grads):
            if g is None:
                continue
            if self.cuda and g.device.type == "cuda":
                g.record_stream(self._stream)  # freed by the host soon; the copy must finish first
            view.copy_(g, non_blocking=True)
        self.stats.d2h_bytes += self.block_bytes

    def _wait(self, b: int) -> None:
        ready = self._ready.pop(b, None)
        if ready is not None:
            torch.cuda.current_stream(self.compute).wait_event(ready)

    def synchronize(self) -> None:
        """Block the host until every transfer has finished (storage copies are then readable)."""
        if self.cuda and self.prepared:
            self._stream.synchronize()

    def restore_layout(self) -> None:
        """Bring the initial layout back (sd-scripts' prepare_block_swap_before_forward); a no-op when in place."""
        moves = restore_moves(self.schedule, self._slots_of)
        if moves:
            self.stats.restores += 1
        for fetch, evict in moves:
            self._move(fetch, evict)
        self._backward_pending = False

    # -- hooks ---------------------------------------------------------------------------------------------------

    def _make_pre_forward(self, i: int):
        def hook(module, args):
            if _in_backward():  # gradient-checkpoint recomputation: the backward hooks placed it already
                if i not in self._slots_of:  # on CPU/CPU it would silently compute from the storage copy
                    raise RuntimeError(f"block swap: block {i} is recomputed in backward but its weights are not on "
                                       f"{self.compute} (its pre-backward hook did not run)")
                return
            if i == 0:
                if _records_for_backward():  # a pass that may back-propagate starts from the initial layout
                    if self._backward_pending or tuple(self._slots_of) != self.schedule.initial:
                        self.restore_layout()  # a backward that did not run (or stopped early)
                    self._pass_start = None
                else:  # a no-grad pass (maybe between a forward and its backward) returns to where it started
                    self._pass_start = tuple(self._slots_of)
            for fetch, evict in self.schedule.before_forward(i, self._slots_of):
                self._move(fetch, evict)
            self._wait(i)
        return hook

    def _make_post_forward(self, i: int):
        def hook(module, args, output):
            if _in_backward():
                return
            outs = [o for o in (output if isinstance(output, tuple) else (output,)) if isinstance(o, torch.Tensor)]
            # an offloaded checkpoint runs the block without a graph; it calls the pre-backward hook itself
            offloaded = offload_checkpoint.recording_for_backward()
            backward_follows = offloaded or (torch.is_grad_enabled() and any(o.requires_grad for o in outs))
            for fetch, evict in self.schedule.after_forward(i, backward_follows, self._pass_start):
                self._move(fetch, evict)
            if backward_follows:
                self._backward_pending = True
                pre_backward = self._make_pre_backward(i)
                if offloaded:
                    offload_checkpoint.call_before_backward(pre_backward)
                else:
                    for o in outs:
                        if o.requires_grad:
                            o.register_hook(pre_backward)
        return hook

    def _make_pre_backward(self, b: int):
        """Called once before block b's backward (a hook on each output that requires grad: the first one acts)."""
        fired = []

        def hook(grad=None):
            if fired:
                return None
            fired.append(True)
            if not self._in_backward:
                self._in_backward = True
                torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
            if self._last_backward is not None:
                for fetch, evict in self.schedule.after_backward(self._last_backward):
                    self._move(fetch, evict)
            self._last_backward = b
            if b not in self._slots_of:
                raise RuntimeError(f"block swap: block {b} is not on {self.compute} before its backward")
            self._wait(b)
            return None
        return hook

    def _end_backward(self) -> None:
        self._in_backward = False
        self._last_backward = None
        moves = restore_moves(self.schedule, self._slots_of)
        for fetch, evict in moves:
            self._move(fetch, evict)
        self.stats.restores += bool(moves)
        self._backward_pending = False
        if not self.host_to_device_only:
            self.synchronize()  # the optimizer may read the written-back weights and gradients on the host

    def remove(self) -> None:
        """Uninstall the hooks (the weights stay where they are)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for block in self.blocks:
            block.__dict__.pop("_apply", None)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_nullcontext = _Null()


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _records_for_backward() -> bool:
    """A forward whose backward may follow: grad mode on, or an offloaded checkpoint's graph-less forward."""
    return torch.is_grad_enabled() or offload_checkpoint.recording_for_backward()


def _refuse_move(fn, *args, **kwargs):
    raise RuntimeError("this block's weights are managed by block swapping: move the rest of the model with "
                       "library.memory.block_swap.move_to_device_except_swap_blocks(model, device) instead of .to()")


def _set_buffer(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    (module.get_submodule(owner) if owner else module)._buffers[leaf] = value


# --- the FLUX model's two stacks ------------------------------------------------------------------------------------


def enable_flux_block_swap(model, num_blocks: int, compute_device, storage_device="cpu", *,
                           host_to_device_only: bool = True) -> tuple[BlockSwapper, BlockSwapper]:
    """Keep the weights of `num_blocks` blocks of a Flux (sd-scripts' split: n // 2 double, (n - n // 2) * 2 single)
    in `storage_device` memory and stream them in: returns the (double, single) BlockSwappers, both prepared, also
    kept as `model.block_swappers`. Use host_to_device_only=False when the blocks' own weights are trained."""
    nd, ns = split_blocks_to_swap(num_blocks, len(model.double_blocks), len(model.single_blocks))
    swappers = tuple(BlockSwapper(list(blocks), n, compute_device, storage_device,
                                  host_to_device_only=host_to_device_only).prepare()
                     for blocks, n in ((model.double_blocks, nd), (model.single_blocks, ns)))
    model.block_swappers = swappers
    logger.info("block swap: %d blocks = %d double + %d single (half-size) blocks on %s", num_blocks, nd, ns,
                storage_device)
    return swappers


def move_to_device_except_swap_blocks(model: nn.Module, device, block_lists=("double_blocks", "single_blocks")) -> None:
    """Move everything but the swapped block lists (their weights are placed by the swappers)."""
    for name, child in model.named_children():
        if name not in block_lists:
            child.to(device)
    for name, t in list(model.named_parameters(recurse=False)) + list(model.named_buffers(recurse=False)):
        t.data = t.data.to(device)
