"""library/distributed/grad_sync.py: buckets in backward order, all-reduces launched from the gradient hooks while the
backward runs, nothing sent on accumulating micro-batches, every average mapped back to its own parameter (two gloo
processes spawned here; the trainers' runs are in test_distributed_ddp.py)."""

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from library.distributed.grad_sync import GradientBuckets, plan_buckets


def test_buckets_keep_the_order_one_dtype_each_and_their_size():
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (10, 20, 5, 40)]
    params.insert(2, torch.nn.Parameter(torch.zeros(3, dtype=torch.float64)))
    buckets = plan_buckets(params[::-1], bucket_bytes=30 * 4)
    assert [[p.numel() for p in b] for b in buckets] == [[40], [5], [3], [20, 10]]


class Net(torch.nn.Module):
    """Four layers in a chain and a fifth that no output uses; `skip` leaves out layer 2 (only on one rank)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(5))

    def forward(self, x, skip=False):
        for i, layer in enumerate(self.layers[:4]):
            if not (skip and i == 2):
                x = torch.tanh(layer(x))
        return x.square().mean()


def batch(rank: int, micro: int) -> torch.Tensor:
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(10 * rank + micro))


def _rank(rank: int, init_file: str, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        net = Net()
        sync = [False]
        ready = []
        launched_before_first_layer = []  # in each synced backward, when layer 0's weight gets its gradient
        def note(p):  # registered before the reducer's own hook, so it runs first
            if sync[0]:
                launched_before_first_layer.append(buckets.launched)

        net.layers[0].weight.register_post_accumulate_grad_hook(note)
        buckets = GradientBuckets(list(net.parameters()), "cpu", lambda: sync[0], bucket_bytes=8 * 9 * 4,
                                  on_ready=lambda ps: ready.append([p.grad is not None for p in ps]))
        steps = []
        for _ in range(2):  # the first step in registration order, the second in the order the gradients came
            sync[0] = False
            net(batch(rank, 0)).backward()  # accumulating micro-batch: nothing is sent
            assert all(p.grad is not None for p in net.layers[:4].parameters())
            sync[0] = True
            net(batch(rank, 1), skip=rank == 1).backward()
            buckets.finish()
            steps.append({n: (None if p.grad is None else p.grad.clone()) for n, p in net.named_parameters()})
            net.zero_grad(set_to_none=True)
        # the reference: both ranks' micro-batches in one process, summed and divided by the 2 ranks
        names = {p: n for n, p in net.named_parameters()}
        ref = Net()
        for r in range(2):
            for m in range(2):
                (ref(batch(r, m), skip=r == 1 and m == 1) / 2).backward()
        results[rank] = (steps, {n: p.grad for n, p in ref.named_parameters()}, buckets.launched,
                         [sorted(names[p] for p in b) for b in buckets.buckets], launched_before_first_layer, ready)
    finally:
        dist.destroy_process_group()


def test_two_processes_average_while_the_backward_runs():
    with tempfile.TemporaryDirectory() as tmp:
        results = mp.Manager().dict()
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        mp.spawn(_rank, args=(os.path.join(tmp, "init"), results), nprocs=2, join=True)
        for rank in range(2):
            steps, ref, launched, buckets, before_first, ready = results[rank]
            assert launched == 2 * 5  # one bucket per layer, each sent once per step
            # the unused layer 4 was first in the first step's order and held every launch back until the end;
            # the second step's buckets follow the first backward (layer 4 last): on rank 0 layers 3, 2 and 1 were
            # on their way before layer 0 had its gradient; on rank 1, where layer 2 got none in this backward,
            # layer 3 (its launches keep the order every rank shares)
            assert before_first == [0, 5 + (3 if rank == 0 else 1)]
            assert buckets == [[f"layers.{i}.bias", f"layers.{i}.weight"] for i in (3, 2, 1, 0, 4)]
            for grads in steps:
                for name, g in grads.items():
                    if name.startswith("layers.4."):  # no gradient on any process: None, as in one process
                        assert g is None and ref[name] is None
                    else:  # rank 1's layer 2: its first micro-batch's gradient only
                        torch.testing.assert_close(g, ref[name], rtol=1e-6, atol=1e-7)
            assert sorted(ready) == sorted([[True, True]] * 8 + [[False, False]] * 2)
