"""library.distributed.grad_sync.py: bucketed gradient averaging maps every reduced value back to its own gradient."""

import torch

from library.distributed.grad_sync import average_gradients


def test_buckets_by_size_and_dtype_and_map_results_back():
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (10, 20, 5, 40)] + [
        torch.nn.Parameter(torch.zeros(3, dtype=torch.float64)), torch.nn.Parameter(torch.zeros(7))]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    params[-1].grad = None  # no gradient: untouched
    before = [None if p.grad is None else p.grad.clone() for p in params]
    seen = []

    def reduce(t):  # stands in for a mean over processes; every element must come back to its place
        seen.append(t.numel())
        return t * 2 + 1

    # 30 float32 elements per bucket: [10, 20], [5], [40] and the float64 one
    calls = average_gradients(params, reduce, bucket_bytes=30 * 4)
    assert calls == 4 and sorted(seen) == [3, 5, 30, 40]
    for p, b in zip(params, before):
        if b is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, b * 2 + 1)


def test_process_mean_reduces_on_the_accelerator_and_returns_home():
    from library.distributed.grad_sync import process_mean

    calls = []

    class FakeAccelerator:
        device = torch.device("meta")  # stands in for the GPU: any device other than the tensor's

        def reduce(self, t, reduction):
            calls.append((t.device.type, reduction))
            return torch.full(t.shape, 7.0)  # the "reduced" result

    out = process_mean(FakeAccelerator())(torch.ones(3))
    assert calls == [("meta", "mean")] and out.device.type == "cpu" and torch.equal(out, torch.full((3,), 7.0))
