"""Run by tests/test_distributed_fsdp2.py under `accelerate launch --config_file tests/accelerate_fsdp2_cpu.yaml`
(2 CPU processes, gloo): trains with `kind` (network, full or controlnet), then every rank writes what it saw of the
engine to rank{r}.json: its type, which trained or frozen weights were DTensors and how much of one block weight it
held, and how many gradient reduce-scatters ran, so the test asserts FSDP2 really sharded (and synchronised only on
the micro-batches that step)."""

import faulthandler
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch.distributed as dist  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from cli_runs import run_trainer  # noqa: E402
from library.training.loop import Trainer  # noqa: E402


def main() -> int:
    faulthandler.dump_traceback_later(int(os.environ.get("FSDP2_JOB_TIMEOUT", "240")), exit=True)  # a hang: stacks
    dump_dir, kind, argv = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    scatters = []  # FSDP2's gradient reduce-scatters (one per unit with gradients per synchronised backward)
    reduce_scatter = dist.reduce_scatter_single
    dist.reduce_scatter_single = lambda *a, **k: scatters.append(1) or reduce_scatter(*a, **k)
    validations = []
    validate = Trainer.validate
    Trainer.validate = lambda self, kind: validations.append(validate(self, kind)) or validations[-1]
    trainer, code = run_trainer(kind, argv)
    flux = trainer.models.flux
    weight = flux.double_blocks[0].img_attn.qkv.weight
    facts = {
        "engine": type(trainer.engine).__name__, "describe": trainer.engine.describe(),
        "world": trainer.accelerator.num_processes, "distributed_type": str(trainer.accelerator.distributed_type),
        "flux_all_dtensor": all(isinstance(p, DTensor) for p in flux.parameters()),
        "block_weight_local": weight.to_local().numel() if isinstance(weight, DTensor) else weight.numel(),
        "block_weight_global": weight.numel(),
        "trained_dtensor": [all(isinstance(p, DTensor) for p in m.parameters()) for m in trainer.trainable_modules],
        "losses": trainer.losses, "units": trainer.engine.units, "reduce_scatters": len(scatters),
        "validation": validations[-1] if validations else None,  # at the last step: the final weights
    }
    rank = trainer.accelerator.process_index
    (dump_dir / f"rank{rank}.json").write_text(json.dumps(facts))
    return code


if __name__ == "__main__":
    sys.exit(main())
