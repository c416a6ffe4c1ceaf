"""Run by tests/test_distributed_deepspeed.py under `accelerate launch` (2 CPU processes): one trainer run, then
each rank writes what the test asserts about the engine that really ran (rank<r>.json in the first argument)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cli_runs  # noqa: E402


def main() -> int:
    report_dir, kind, argv = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    trainer, code = cli_runs.run_trainer(kind, argv)
    engine = trainer.engine
    param = next(p for m in trainer.trainable_modules for p in m.parameters())
    report = {"code": code, "engine": type(engine).__name__, "describe": engine.describe(),
              "wrapped": type(getattr(engine, "model", None)).__name__,
              "distributed_type": str(trainer.accelerator.distributed_type),
              "world": trainer.accelerator.num_processes, "local_numel": param.numel(),
              "full_numel": getattr(param, "ds_numel", param.numel()), "losses": trainer.losses,
              "global_step": trainer.global_step, "validates": trainer.val_group is not None}
    rank = trainer.accelerator.process_index
    (report_dir / f"rank{rank}.json").write_text(json.dumps(report))
    return code


if __name__ == "__main__":
    sys.exit(main())
