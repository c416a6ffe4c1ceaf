"""Run by tests/test_distributed_ddp.py under `accelerate launch --num_processes 2`:
`engine_job.py KIND DUMP_DIR BUCKET_KIB trainer-argv...` trains with the trainer KIND (cli_runs.TRAINERS), gradient
buckets of BUCKET_KIB (DDP's and the reducer's; 0: their defaults), and writes per rank its trained weights
(rank{r}_of_{n}.safetensors, "{module index}.{name}") and what happened (rank{r}_of_{n}.json): the engine, the
wrapped model's type, the blocks swapped, and the order of events -- each micro-batch's backward start, each
gradient all-reduce launch (its elements; for the reducer, its number of buckets then), each gradient of
double_blocks[0] accumulated."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cli_runs  # noqa: E402
from library.distributed import reducer  # noqa: E402
from library.training import loop  # noqa: E402


def main() -> int:
    kind, dump_dir, bucket_kib, argv = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    events: list[list] = []
    if bucket_kib:
        reducer.ReducerEngine.bucket_bytes = bucket_kib * 1024
        plain_kwargs = loop.accelerator_kwargs

        def with_buckets(kind, args, environ=None):
            from accelerate.utils import DistributedDataParallelKwargs

            kwargs = plain_kwargs(kind, args, environ)
            handlers = kwargs.setdefault("kwargs_handlers", [])
            ddp = next((h for h in handlers if isinstance(h, DistributedDataParallelKwargs)), None)
            if ddp is None:
                handlers.append(ddp := DistributedDataParallelKwargs())
            ddp.bucket_cap_mb = bucket_kib / 1024
            return kwargs

        loop.accelerator_kwargs = with_buckets
    plain_setup = loop.Trainer.setup

    def instrumented_setup(trainer):
        plain_setup(trainer)
        engine, acc = trainer.engine, trainer.accelerator
        backward = acc.backward

        def recorded_backward(loss, **kw):
            events.append(["backward", acc.sync_gradients])
            return backward(loss, **kw)

        acc.backward = recorded_backward
        if engine.name == "ddp":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            def hook(state, bucket):
                events.append(["all_reduce", bucket.buffer().numel()])
                return default_hooks.allreduce_hook(state, bucket)

            engine.step.register_comm_hook(None, hook)
        elif engine.name == "reducer":
            buckets, launch = engine.buckets, engine.buckets._launch

            def recorded_launch(b):
                events.append(["all_reduce", buckets.sizes[b], len(buckets.buckets)])
                launch(b)

            buckets._launch = recorded_launch
        for p in trainer.models.flux.double_blocks[0].parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(lambda p: events.append(["block0_grad"]))

    loop.Trainer.setup = instrumented_setup
    trainer, code = cli_runs.run_trainer(kind, argv)
    from safetensors.torch import save_file

    acc = trainer.accelerator
    state = {f"{i}.{k}": v.detach().contiguous().cpu()
             for i, m in enumerate(trainer.trainable_modules) for k, v in m.state_dict().items()}
    name = f"rank{acc.process_index}_of_{acc.num_processes}"
    save_file(state, str(dump_dir / f"{name}.safetensors"))
    report = {"engine": trainer.engine.name, "describe": trainer.engine.describe(),
              "model_type": type(trainer.trained_model).__name__, "events": events,
              "swapped": [s.schedule.num_swapped for s in trainer.block_swappers]}
    (dump_dir / f"{name}.json").write_text(json.dumps(report))
    return code


if __name__ == "__main__":
    sys.exit(main())
