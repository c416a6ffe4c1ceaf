"""Gradient averaging for multi-process runs that DDP cannot wrap (block swapping, fused optimizer modes).

For now the gradients are averaged after the backward in large buckets (grad_sync.py).
"""

from __future__ import annotations

from library.distributed.engine import Engine
from library.distributed.grad_sync import average_gradients, process_mean


class ReducerEngine(Engine):
    name = "reducer"

    def before_step(self, params) -> None:
        average_gradients(params, process_mean(self.accelerator))
