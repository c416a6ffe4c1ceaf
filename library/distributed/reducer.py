"""Gradient averaging for multi-process runs that DDP cannot wrap: block swapping and the fused optimizer modes.

DDP arms its gradient hooks in its own forward and expects a fixed set of parameters that stay on the device; block
swapping moves the trained blocks' weights and gradients between host and device inside the forward and backward,
and the fused modes consume each gradient inside the backward. Here the trained parameters' own post-accumulate-grad
hooks feed `GradientBuckets` (grad_sync.py): each bucket's all-reduce is launched as soon as its gradients are
complete, while the backward goes on, and everything is waited for in `before_step`, before clipping and stepping.
The fused modes step a bucket's parameters when its reduce has completed (see `on_gradients`).
"""

from __future__ import annotations

from library.distributed.engine import Engine
from library.distributed.grad_sync import DEFAULT_BUCKET_BYTES, GradientBuckets


class ReducerEngine(Engine):
    name = "reducer"
    bucket_bytes = DEFAULT_BUCKET_BYTES

    def attach(self, trainer):
        acc = self.accelerator
        self.buckets = GradientBuckets(trainer.trainable_params, acc.device, lambda: acc.sync_gradients,
                                       self.bucket_bytes)
        self.swappers = trainer.block_swappers
        return super().attach(trainer)

    def on_gradients(self, params, ready) -> list:
        """The fused modes: `ready(bucket)` once a bucket's averaged gradients are set, as soon as its reduce has
        completed (at the latest in before_step, right after the backward). A swapped block has usually left the
        device by then (it is sent back right after its backward), so its parameters are stepped in storage
        memory, once the swapper's copies there have finished."""
        if {id(p) for p in params} - {id(p) for p in self.buckets.place}:
            raise ValueError("the fused optimizer steps parameters the reducer does not synchronise")
        device = self.accelerator.device

        def ready_in_place(bucket):
            if self.swappers and any(p.device != device for p in bucket):
                for swapper in self.swappers:
                    swapper.synchronize()
            ready(bucket)

        self.buckets.on_ready = ready_in_place
        return []

    def before_step(self, params) -> None:
        self.buckets.finish()

    def describe(self) -> str:
        b = self.buckets
        return (f"reducer ({len(b.buckets)} bucket(s) of up to {self.bucket_bytes / 2**20:g} MiB over "
                f"{self.accelerator.num_processes} processes, all-reduce launched from gradient hooks)")
