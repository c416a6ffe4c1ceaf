"""A model of what block swapping costs in time, since no GPU is at hand to measure it (issue 7).

Inputs: the FLOPs of one block's forward and of its backward (with the recomputation gradient checkpointing adds),
counted by torch's FlopCounterMode on `meta` tensors at the planned image size; the bytes of one block (the
swapper's slot size); an assumed compute rate and an assumed pinned host-to-device bandwidth. The two stacks are
simulated event by event with the schedule of `library.memory.block_swap.SwapSchedule`: a block computes once its
weights
are in its slot; a transfer starts once the slot's previous block has finished computing and the copy stream is
free (one copy stream, as the swapper uses; write-back mode copies the evicted block out first). The step time is
the sum over the stacks plus everything else (embedders, final layer, loss), which never waits. The slowdown is
the modelled step time divided by the same model without swapping and without offloaded checkpoints.

With --cpu_offload_checkpointing each block's saved inputs (the activation bytes) also cross the link: out to the
host as the block starts its forward (device-to-host, the other direction of the link than the weights, so they
only wait for each other), and back in while the block after it back-propagates -- in backward they share the
host-to-device direction with the weights, in the order they are issued (one queue: a conservative model of the
two copy streams, which the copy engines may serve side by side).

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
    activation_s: float = 0.0  # one block's offloaded inputs, one direction (--cpu_offload_checkpointing)


def simulate_stack(c: StackCost) -> tuple[float, float]:
    """(forward seconds, backward seconds) of one stack with the swap schedule, transfers overlapping compute."""
    sch = swap_schedule(c.num_blocks, c.num_swapped)
    k = sch.num_slots
    per_move = c.transfer_s * (2 if c.write_back else 1)
    ready = {b: 0.0 for b in range(k)}  # block -> time its weights are in its slot
    inputs_ready = {}  # block -> time its offloaded inputs are back on the device
    t = copy_free = d2h_free = 0.0

    def move(fetch: int, evict: int, after: float) -> None:
        nonlocal copy_free
        start = max(copy_free, after)
        copy_free = start + per_move
        ready[fetch] = copy_free

    def fetch_inputs(b: int, after: float) -> None:
        nonlocal copy_free
        copy_free = max(copy_free, after, offloaded[b]) + c.activation_s
        inputs_ready[b] = copy_free

    offloaded = {}  # block -> time its inputs reached the host
    for i in range(c.num_blocks):
        t = max(t, ready[i])
        if c.activation_s:
            d2h_free = max(d2h_free, t) + c.activation_s
            offloaded[i] = d2h_free
        t += c.forward_s
        for fetch, evict in sch.after_forward(i, backward_follows=True):
            move(fetch, evict, t)
    forward_end = t
    for b in range(c.num_blocks - 1, -1, -1):
        if b + 1 < c.num_blocks:
            for fetch, evict in sch.after_backward(b + 1):
                move(fetch, evict, t)
        if c.activation_s:
            if b == c.num_blocks - 1:
                fetch_inputs(b, t)
            if b > 0:
                fetch_inputs(b - 1, t)  # prefetched while block b back-propagates
        t = max(t, ready[b], inputs_ready.get(b, 0.0)) + c.backward_s
    # the layout must be back before the next step's forward needs block 0..k-1: waiting on the last transfers
    t = max(t, copy_free) if c.num_swapped else t
    return forward_end, t - forward_end


@dataclass
class SpeedModel:
    num_swapped: int
    bytes_per_step: int  # weights (and offloaded activations) over the link, both directions
    step_s: float
    unswapped_s: float

    @property
    def slowdown(self) -> float:
        return self.step_s / self.unswapped_s


def model_step(blocks_to_swap: int, stacks: dict[str, tuple[int, int, int]], flops: dict[str, tuple[float, float]],
               other_flops: float, write_back: bool, tflops: float = DEFAULT_TFLOPS,
               h2d_gbps: float = DEFAULT_H2D_GBPS, activation_bytes: dict[str, int] | None = None) -> SpeedModel:
    """`stacks`: kind -> (num_blocks, num_swapped, block_bytes); `flops`: kind -> (forward, backward) FLOPs of one
    block; `other_flops`: the rest of the step; `activation_bytes`: kind -> one block's inputs that
    --cpu_offload_checkpointing sends to the host (none: not offloaded)."""
    rate, bw = tflops * 1e12, h2d_gbps * 1e9
    total = other_flops / rate
    base = other_flops / rate
    moved = 0
    for kind, (n, s, nbytes) in stacks.items():
        fwd, bwd = (f / rate for f in flops[kind])
        act = (activation_bytes or {}).get(kind, 0)
        f_s, b_s = simulate_stack(StackCost(n, s, fwd, bwd, nbytes / bw, write_back, activation_s=act / bw))
        total += f_s + b_s
        base += n * (fwd + bwd)
        moved += _moves_per_step(n, s) * nbytes * (2 if write_back else 1) + 2 * n * act
    return SpeedModel(blocks_to_swap, moved, total, base)


def _moves_per_step(n: int, s: int) -> int:
    """Block transfers to the compute device in one forward+backward (2 per swapped block)."""
    sch = swap_schedule(n, s)
    moves = sum(len(sch.after_forward(i, True)) for i in range(n))
    return moves + sum(len(sch.after_backward(b)) for b in range(1, n))
