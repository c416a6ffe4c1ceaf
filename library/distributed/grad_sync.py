"""Averaging gradients across processes while the backward runs, for trained weights that DDP cannot wrap.

`GradientBuckets` packs the trained parameters into buckets (one dtype per bucket, up to `bucket_bytes` each):
first in reverse registration order, roughly the order the backward completes them; after the first step that
syncs, in the order the main process saw the gradients arrive, parameters that got none last (as DDP rebuilds its
buckets). On a micro-batch that steps, each parameter's post-accumulate-grad hook copies its gradient into its
bucket's flat buffer on the compute device and drops the parameter's own gradient; when a bucket is complete an
asynchronous all-reduce of the buffer is launched at once, so communication overlaps the rest of the backward.
Buckets are launched strictly in their fixed order (a complete bucket waits for the ones before it), so every
process issues the same collectives in the same order even when some parameter gets no gradient.

`finish()` (after the backward) launches what is left -- buckets with a parameter that got no gradient in this
backward on this process: what it accumulated on earlier micro-batches, else zeros -- waits for every reduce, and
hands each parameter its averaged gradient as a view of the bucket (or a copy on the parameter's device when it
lives elsewhere, e.g. a swapped block's weights in CPU memory: the buffer is always on the compute device, because
NCCL reduces nothing else). With `on_ready` set (the fused optimizer modes) a bucket is also finished as soon as its
reduce has completed, checked at every later hook, and `on_ready(params)` is called then, so a parameter is stepped
only once its averaged gradient is there.

Each bucket carries one presence slot per parameter (1 where this process had a gradient): a parameter that got no
gradient on any process keeps `.grad = None` as in a one-process run, one used on some processes averages with zeros
there, as gradient accumulation in one process would.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

DEFAULT_BUCKET_BYTES = 25 * 2**20  # DDP's default bucket size


def per_parameter_hooks(params, ready: Callable[[list], None], should_step: Callable[[], bool]) -> list:
    """`ready([p])` from each parameter's post-accumulate-grad hook on micro-batches that step (one process)."""
    def hook(p):
        if p.grad is not None and should_step():
            ready([p])
    return [p.register_post_accumulate_grad_hook(hook) for p in params]


def plan_buckets(params: list[torch.nn.Parameter], bucket_bytes: int) -> list[list[torch.nn.Parameter]]:
    """Buckets of `params` in their order, one dtype each, a new one where the next would pass `bucket_bytes`."""
    buckets: list[list[torch.nn.Parameter]] = []
    size = 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        if not buckets or p.dtype != buckets[-1][0].dtype or size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += nbytes
    return buckets


class GradientBuckets:
    """Bucketed all-reduce of `params`' gradients launched from their gradient hooks (see the module docstring).

    `should_sync()`: whether this micro-batch steps (accumulating micro-batches only accumulate, nothing is sent);
    `device`: where the buffers live and are reduced; `on_ready(params)`: called with each bucket's parameters once
    their averaged gradients are set. `launched` counts the all-reduces issued (for tests and benchmarks)."""

    def __init__(self, params: list[torch.nn.Parameter], device, should_sync: Callable[[], bool],
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, group=None, on_ready: Callable[[list], None] | None = None):
        self.device, self.should_sync, self.group, self.on_ready = torch.device(device), should_sync, group, on_ready
        self.world, self.bucket_bytes = dist.get_world_size(group), bucket_bytes
        self.params = [p for p in dict.fromkeys(params) if p.requires_grad]
        self._plan(self.params[::-1])
        self.arrivals: list[torch.nn.Parameter] | None = []  # the first synced backward's order, then None
        self.launched = 0
        self.handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.params]
        self._reset()

    def _plan(self, order: list[torch.nn.Parameter]) -> None:
        self.buckets = plan_buckets(order, self.bucket_bytes)
        self.place: dict[torch.nn.Parameter, tuple[int, int, int]] = {}  # p -> (bucket, offset, index in bucket)
        self.sizes = []
        for b, members in enumerate(self.buckets):
            offset = 0
            for i, p in enumerate(members):
                self.place[p] = (b, offset, i)
                offset += p.numel()
            self.sizes.append(offset + len(members))  # the gradients, then one presence slot per parameter

    def _replan(self) -> None:
        """Buckets in the order the main process's first synced backward completed the gradients (every process
        must use the same buckets), parameters without a gradient last."""
        arrived = {id(p) for p in self.arrivals}
        order = self.arrivals + [p for p in self.params[::-1] if id(p) not in arrived]
        index = {id(p): i for i, p in enumerate(self.params)}
        chosen = [[index[id(p)] for p in order]]
        dist.broadcast_object_list(chosen, src=dist.get_global_rank(self.group, 0) if self.group else 0,
                                   group=self.group)
        self._plan([self.params[i] for i in chosen[0]])
        self.arrivals = None

    def _reset(self) -> None:
        self.taken: set[int] = set()  # ids of the parameters whose gradient this process put in (known on the host)
        self.flat: list[torch.Tensor | None] = [None] * len(self.buckets)
        self.arrived = [0] * len(self.buckets)
        self.next_launch = 0
        self.in_flight: list[tuple[int, object]] = []  # (bucket, work) in launch order

    def _buffer(self, b: int) -> torch.Tensor:
        if self.flat[b] is None:
            self.flat[b] = torch.zeros(self.sizes[b], dtype=self.buckets[b][0].dtype, device=self.device)
        return self.flat[b]

    @torch.no_grad()
    def _hook(self, p: torch.nn.Parameter) -> None:
        if p.grad is None or not self.should_sync():
            return
        if self.arrivals is not None:
            self.arrivals.append(p)
        b = self._take(p)
        self.arrived[b] += 1
        while self.next_launch < len(self.buckets) and self.arrived[self.next_launch] == len(self.buckets[
                self.next_launch]):
            self._launch(self.next_launch)
        if self.on_ready is not None:
            while self.in_flight and self.in_flight[0][1].is_completed():
                self._finish(*self.in_flight.pop(0))

    def _take(self, p: torch.nn.Parameter) -> int:
        """Move p's gradient into its bucket (the averaged one replaces it); returns the bucket."""
        b, offset, i = self.place[p]
        flat = self._buffer(b)
        flat[offset:offset + p.numel()].copy_(p.grad.reshape(-1))
        flat[self.sizes[b] - len(self.buckets[b]) + i] = 1
        self.taken.add(id(p))
        p.grad = None
        return b

    def _launch(self, b: int) -> None:
        for p in self.buckets[b]:  # no gradient in this backward, but accumulated on an earlier micro-batch
            if p.grad is not None:
                self._take(p)
        flat = self._buffer(b).div_(self.world)  # divided first, as DDP does: a sum of means cannot overflow
        self.in_flight.append((b, dist.all_reduce(flat, group=self.group, async_op=True)))
        self.launched += 1
        self.next_launch = b + 1

    def _finish(self, b: int, work) -> None:
        work.wait()
        flat, members = self.flat[b], self.buckets[b]
        present = flat[self.sizes[b] - len(members):]
        offset = 0
        for i, p in enumerate(members):
            # a gradient this process had is there for sure; only for the others is the reduced presence read
            # (a wait for the device, rare: a parameter this backward did not reach)
            if id(p) in self.taken or present[i].item() > 0:
                grad = flat[offset:offset + p.numel()].view_as(p)
                p.grad = grad if p.device == grad.device else grad.to(p.device)
            offset += p.numel()
        self.flat[b] = None  # the gradients' views keep the memory until the optimizer drops them
        if self.on_ready is not None:
            self.on_ready(members)

    def finish(self) -> None:
        """After the backward of a micro-batch that steps: launch the rest, wait for all, set every average."""
        while self.next_launch < len(self.buckets):
            self._launch(self.next_launch)
        for b, work in self.in_flight:
            self._finish(b, work)
        if self.arrivals is not None:
            self._replan()
        self._reset()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
