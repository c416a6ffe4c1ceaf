"""Plain multi-process training on two CPU ranks (accelerate launch, gloo): DDP through accelerate and the reducer
engine (block swapping, fused optimizer modes) each train what one process trains on the same global batch (one
process with N-fold gradient accumulation, fp32, within 1e-5), really run (the wrapped model's type, the engine's
collectives counted), communicate once per optimizer step, and start the first gradient all-reduce before the
backward has reached the earliest transformer block (tests/engine_job.py records the order of events)."""

import json

import pytest
import torch
from safetensors.torch import load_file

import cli_runs
from cli_runs import run_args
from tools.make_demo_dataset import make_controlnet_demo_dataset, make_demo_dataset
from tools.make_tiny_models import make_tiny_models

PORTS = iter(range(29700, 29720))
LORA = ("--network_module", "networks.lora_flux", "--network_dim", "4")
FUSED = ("--fused_backward_pass", "--optimizer_type", "adafactor")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny models and 4 images: two ranks see 2 batches each per epoch (room for accumulation)."""
    base = tmp_path_factory.mktemp("ddp")
    return make_tiny_models(base / "models"), make_demo_dataset(base / "data", count=4, size=32)


def base_args(setup, *common):
    """argv(out, *extra): a 2-step fp32 run without clipping (clipping per tensor in the fused modes differs)."""
    def argv(out, *extra):
        return [*run_args(*setup, out), "--learning_rate", "1e-3", "--max_train_steps", "2", "--cache_latents",
                "--max_grad_norm", "0", *common, *extra]
    return argv


def one_process(kind, tmp_path, argv):
    """{"{module index}.{name}": weight} one process trained."""
    trainer, code = cli_runs.run_trainer(kind, argv)
    assert code == 0 and trainer.engine.name == "single"
    return {f"{i}.{k}": v.detach().clone() for i, m in enumerate(trainer.trainable_modules)
            for k, v in m.state_dict().items()}


def two_ranks(kind, work, argv, bucket_kib=0):
    """(rank 0 weights, rank 1 weights, rank 0 report) of a two-rank run of tests/engine_job.py."""
    work.mkdir()
    cli_runs.launch_job_on_two_ranks("engine_job.py", [kind, str(work), str(bucket_kib), *argv], next(PORTS))
    weights = [load_file(str(work / f"rank{r}_of_2.safetensors")) for r in range(2)]
    return *weights, json.loads((work / "rank0_of_2.json").read_text())


def assert_same_training(ranks, single):
    a, b = ranks
    assert a.keys() == b.keys() == single.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    worst = max((a[k] - single[k]).abs().max().item() for k in a)
    assert worst < 1e-5, worst


def collectives_per_backward(events) -> list[tuple[bool, int]]:
    """[(micro-batch steps, all-reduces launched from its backward start to the next one)]."""
    out = []
    for e in events:
        if e[0] == "backward":
            out.append((e[1], 0))
        elif e[0] == "all_reduce":
            out[-1] = (out[-1][0], out[-1][1] + 1)
    return out


def assert_one_all_reduce_per_bucket(events, pattern):
    """The reducer: per micro-batch (`pattern`: whether each steps), no all-reduce unless it steps, then one per
    bucket (of the plan then: the first step's buckets follow the registration order, later ones the backward's)."""
    counts = collectives_per_backward(events)
    assert [s for s, _ in counts] == pattern and all(n == 0 for s, n in counts if not s)
    plans = [e[2] for e in events if e[0] == "all_reduce"]
    assert min(plans) > 10 and sum(n for _, n in counts) == len(plans)
    i = 0
    for _, n in counts:
        assert n == 0 or set(plans[i:i + n]) == {n}
        i += n


def assert_overlaps(events, last_only=False):
    """In every micro-batch that steps (`last_only`: the last one), an all-reduce starts before double_blocks[0]
    has all its gradients."""
    starts = [i for i, e in enumerate(events) if e[0] == "backward" and e[1]]
    ends = [next((j for j in range(s + 1, len(events)) if events[j][0] == "backward"), len(events)) for s in starts]
    spans = list(zip(starts, ends))[-1:] if last_only else list(zip(starts, ends))
    assert spans
    for s, e in spans:
        kinds = [x[0] for x in events[s:e]]
        last_block0 = len(kinds) - 1 - kinds[::-1].index("block0_grad")
        assert "all_reduce" in kinds[:last_block0], kinds


@pytest.mark.slow
def test_ddp_lora_equals_one_process_with_accumulation(setup, tmp_path):
    """LoRA under DDP (with --cpu_offload_checkpointing: a backward inside the backward) equals one process
    accumulating the same 4 batches."""
    argv = base_args(setup)
    *ranks, report = two_ranks("network", tmp_path / "2", argv(tmp_path / "out2", *LORA, "--gradient_checkpointing",
                                                               "--cpu_offload_checkpointing"))
    assert report["engine"] == "ddp" and report["model_type"] == "DistributedDataParallel"
    assert [n > 0 for _, n in collectives_per_backward(report["events"])] == [True, True]
    single = one_process("network", tmp_path, argv(tmp_path / "out1", *LORA, "--gradient_accumulation_steps", "2"))
    assert_same_training(ranks, single)


@pytest.mark.slow
def test_ddp_full_fine_tune_overlaps_and_syncs_once_per_step(setup, tmp_path):
    """Full fine-tuning under DDP with 2 micro-batches per step: nothing is sent on the first, and on the second
    the first bucket's all-reduce starts before double_blocks[0]'s backward is done (buckets of 64 KiB, from the
    second step on: DDP's first backward learns the order the gradients come in and sends one bucket)."""
    argv = base_args(setup, "--gradient_accumulation_steps", "2", "--gradient_checkpointing")
    *ranks, report = two_ranks("full", tmp_path / "2", argv(tmp_path / "out2"), bucket_kib=64)
    assert report["engine"] == "ddp" and report["model_type"] == "DistributedDataParallel"
    counts = collectives_per_backward(report["events"])
    assert [s for s, _ in counts] == [False, True] * 2 and all(n == 0 for s, n in counts if not s)
    assert counts[-1][1] > 10  # its first iteration sends one bucket, then DDP rebuilds them in backward order
    assert_overlaps(report["events"], last_only=True)
    single = one_process("full", tmp_path, argv(tmp_path / "out1", "--gradient_accumulation_steps", "4"))
    assert_same_training(ranks, single)


@pytest.mark.slow
def test_reducer_with_fused_backward_pass_overlaps_and_equals_one_process(setup, tmp_path):
    """--fused_backward_pass keeps DDP out: the reducer launches each 64 KiB bucket from the gradient hooks, before
    double_blocks[0] is done, one all-reduce per bucket, and each parameter is stepped with its averaged gradient:
    the weights of one process stepping 2 accumulated batches after the backward (no clipping: the same update)."""
    *ranks, report = two_ranks("full", tmp_path / "2", base_args(setup, *FUSED)(tmp_path / "out2"), bucket_kib=64)
    assert report["engine"] == "reducer" and report["model_type"] == "Flux"
    assert_one_all_reduce_per_bucket(report["events"], [True, True])
    assert_overlaps(report["events"])
    single = one_process("full", tmp_path, base_args(setup, "--optimizer_type", "adafactor")(
        tmp_path / "out1", "--gradient_accumulation_steps", "2"))
    assert_same_training(ranks, single)


@pytest.mark.slow
@pytest.mark.parametrize("mode", [(), ("--blockwise_fused_optimizers",)], ids=["after_backward", "blockwise"])
def test_reducer_with_blocks_to_swap_overlaps_and_syncs_once_per_step(setup, tmp_path_factory, tmp_path, mode):
    """--blocks_to_swap (trained blocks' weights and gradients move between storage and the compute device) keeps
    DDP out. With 2 micro-batches per step the reducer sends nothing on the first and one all-reduce per bucket on
    the second, the first before double_blocks[0] is done; the weights are those of one process accumulating the same
    4 batches (with --blockwise_fused_optimizers each block is stepped once its buckets are averaged)."""
    models, _ = cli_runs.swappable_tiny_models(tmp_path_factory.mktemp("swap"))
    argv = base_args((models, setup[1]), "--gradient_accumulation_steps", "2")
    *ranks, report = two_ranks("full", tmp_path / "2", argv(tmp_path / "out2", "--blocks_to_swap", "3", *mode),
                               bucket_kib=64)
    assert report["engine"] == "reducer" and report["model_type"] == "Flux" and report["swapped"] == [1, 4]
    assert_one_all_reduce_per_bucket(report["events"], [False, True] * 2)
    assert_overlaps(report["events"])
    single = one_process("full", tmp_path, argv(tmp_path / "out1", "--gradient_accumulation_steps", "4"))
    assert_same_training(ranks, single)


@pytest.mark.slow
def test_ddp_controlnet_with_gradient_checkpointing(tmp_path_factory, tmp_path):
    """The ControlNet under DDP: the parameters of its last double block's text stream never get a gradient (nothing
    consumes that output); DDP leaves them out instead of waiting for them, also when the first step starts with an
    accumulating micro-batch. The result equals one process accumulating the same batches."""
    base = tmp_path_factory.mktemp("cn")
    setup = make_tiny_models(base / "models"), make_controlnet_demo_dataset(base / "data", count=4, size=32)
    argv = base_args(setup, "--gradient_checkpointing")
    *ranks, report = two_ranks("controlnet", tmp_path / "2", argv(tmp_path / "out2", "--gradient_accumulation_steps",
                                                                   "2"))
    assert report["engine"] == "ddp" and report["model_type"] == "DistributedDataParallel"
    assert "6 unconsumed parameters left out" in report["describe"]
    assert [n > 0 for _, n in collectives_per_backward(report["events"])] == [False, True] * 2
    single = one_process("controlnet", tmp_path, argv(tmp_path / "out1", "--gradient_accumulation_steps", "4"))
    assert_same_training(ranks, single)


@pytest.mark.slow
def test_ddp_lora_module_dropout_finds_unused_parameters(setup, tmp_path):
    """LoRA module dropout skips modules at random in a step: DDP then looks for unused parameters in each forward
    (without it, a skipped module's bucket never fills and DDP stops), and both ranks still end equal."""
    argv = base_args(setup, *LORA, "--network_args", "module_dropout=0.5")
    a, b, report = two_ranks("network", tmp_path / "2", argv(tmp_path / "out2"))
    assert report["engine"] == "ddp" and "find_unused_parameters" in report["describe"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ddp_refuses_module_dropout_with_offloaded_checkpointing():
    from types import SimpleNamespace

    from library.distributed.ddp import DDPEngine
    from library.distributed.engine import EngineError

    def check(*network_args):
        DDPEngine(None, SimpleNamespace(cpu_offload_checkpointing=True, network_args=list(network_args))).check(None)

    check("module_dropout=0", "rank_dropout=0.1")
    with pytest.raises(EngineError, match="use --gradient_checkpointing instead"):
        check("module_dropout=0.1")
