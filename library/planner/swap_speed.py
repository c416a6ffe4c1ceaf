"""A model of what block swapping costs in time, since no GPU is at hand to measure it (issue 7).

Inputs: the FLOPs of one block's forward and of its backward (with the recomputation gradient checkpointing adds),
counted by torch's FlopCounterMode on `meta` tensors at the planned image size; the bytes of one block (the
swapper's slot size); an assumed compute rate and an assumed pinned host-to-device bandwidth. The two stacks are
simulated event by event with the schedule of `library.memory.block_swap.SwapSchedule`: a block computes once its
weights
are in its slot; a transfer starts once the slot's previous block has finished computing and the copy stream is
free (one copy stream, as the swapper uses; write-back mode copies the evicted block out first). The step time is
the sum over the stacks plus everything else (embedders, final layer, loss), which never waits. The slowdown is
the modelled step time divided by the same model without swapping.

bench/ holds the GPU benchmark that replaces these numbers with measurements when a GPU is available.
"""

from __future__ import annotations

from dataclasses import dataclass

from library.memory.block_swap import swap_schedule

# Assumptions, stated wherever the model is printed.
# Compute: RTX 4090 dense BF16 tensor throughput with FP32 accumulate, 165.2 TFLOPS (NVIDIA Ada Lovelace
# architecture whitepaper, GeForce RTX 4090 column), at the utilisation FLUX.1-dev reaches on an H100: peers.md 3.3
# has 28 steps at 1024x1024 in 6.3-6.7 s, i.e. ~0.23 s per forward of the 74.7 TFLOP counted here, 325 TFLOP/s of
# an H100 SXM's 989 dense BF16 TFLOPS, 33%.
DEFAULT_TFLOPS = 165.2 * 0.33
# Transfers: PCIe 4.0 x16 carries 31.5 GB/s per direction (16 GT/s x 16 lanes, 128b/130b); pinned copies reach
# about 75-80% of it, as CUDA's bandwidthTest sample reports on such systems. Pageable memory is far slower (not
# modelled: the swapper pins its storage copies).
DEFAULT_H2D_GBPS = 24.0
ASSUMPTIONS = {
    "compute": f"{DEFAULT_TFLOPS:.1f} TFLOP/s effective: RTX 4090 dense BF16 (165.2 TFLOPS, NVIDIA Ada whitepaper) "
               "at 33% utilisation, what FLUX.1-dev inference reaches on an H100 (peers.md 3.3: ~0.23 s per 74.7 "
               "TFLOP forward at 1024x1024, of 989 TFLOPS)",
    "h2d": f"{DEFAULT_H2D_GBPS:.0f} GB/s pinned host-to-device: PCIe 4.0 x16 (31.5 GB/s theoretical) at ~76%",
}


@dataclass
class StackCost:
    """One stack of identical blocks: seconds per block forward / backward, seconds per block transfer."""

    num_blocks: int
    num_swapped: int
    forward_s: float
    backward_s: float
    transfer_s: float  # one block, one direction
    write_back: bool = False


def simulate_stack(c: StackCost) -> tuple[float, float]:
    """(forward seconds, backward seconds) of one stack with the swap schedule, transfers overlapping compute."""
    sch = swap_schedule(c.num_blocks, c.num_swapped)
    k = sch.num_slots
    per_move = c.transfer_s * (2 if c.write_back else 1)
    ready = {b: 0.0 for b in range(k)}  # block -> time its weights are in its slot
    freed = {}  # slot -> time its current block finished computing
    t = copy_free = 0.0

    def move(fetch: int, evict: int, after: float) -> None:
        nonlocal copy_free
        start = max(copy_free, after)
        copy_free = start + per_move
        ready[fetch] = copy_free

    for i in range(c.num_blocks):
        t = max(t, ready[i]) + c.forward_s
        freed[i % k] = t
        for fetch, evict in sch.after_forward(i, backward_follows=True):
            move(fetch, evict, t)
    forward_end = t
    for b in range(c.num_blocks - 1, -1, -1):
        if b + 1 < c.num_blocks:
            for fetch, evict in sch.after_backward(b + 1):
                move(fetch, evict, t)
        t = max(t, ready[b]) + c.backward_s
    # the layout must be back before the next step's forward needs block 0..k-1: waiting on the last transfers
    t = max(t, copy_free) if c.num_swapped else t
    return forward_end, t - forward_end


@dataclass
class SpeedModel:
    num_swapped: int
    bytes_per_step: int
    step_s: float
    unswapped_s: float

    @property
    def slowdown(self) -> float:
        return self.step_s / self.unswapped_s


def model_step(blocks_to_swap: int, stacks: dict[str, tuple[int, int, int]], flops: dict[str, tuple[float, float]],
               other_flops: float, write_back: bool, tflops: float = DEFAULT_TFLOPS,
               h2d_gbps: float = DEFAULT_H2D_GBPS) -> SpeedModel:
    """`stacks`: kind -> (num_blocks, num_swapped, block_bytes); `flops`: kind -> (forward, backward) FLOPs of one
    block; `other_flops`: the rest of the step."""
    rate, bw = tflops * 1e12, h2d_gbps * 1e9
    total = other_flops / rate
    base = other_flops / rate
    moved = 0
    for kind, (n, s, nbytes) in stacks.items():
        fwd, bwd = (f / rate for f in flops[kind])
        f_s, b_s = simulate_stack(StackCost(n, s, fwd, bwd, nbytes / bw, write_back))
        total += f_s + b_s
        base += n * (fwd + bwd)
        moved += _moves_per_step(n, s) * nbytes * (2 if write_back else 1)
    return SpeedModel(blocks_to_swap, moved, total, base)


def _moves_per_step(n: int, s: int) -> int:
    """Block transfers to the compute device in one forward+backward (2 per swapped block)."""
    sch = swap_schedule(n, s)
    moves = sum(len(sch.after_forward(i, True)) for i in range(n))
    return moves + sum(len(sch.after_backward(b)) for b in range(1, n))
