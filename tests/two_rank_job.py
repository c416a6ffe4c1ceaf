"""Run by tests/test_train_network.py (and test_full_training.py: argv without --network_module) under
`accelerate launch --num_processes 2`: trains, then every rank writes its own copy of the trained weights (the
LoRA, or the whole transformer) so the test can compare the ranks."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flux_train_network as cli  # noqa: E402
from library.training.recipes.lora import LoRATrainer  # noqa: E402
from library.training.arguments import verify_training_args  # noqa: E402


def main() -> int:
    dump_dir, argv = Path(sys.argv[1]), sys.argv[2:]
    if "--network_module" in argv:
        args = cli.setup_parser().parse_args(argv)
        verify_training_args(args, cli.COMMAND_LINE)
        trainer = LoRATrainer(args)
    else:
        import flux_train
        from library.training.recipes.full import FullTrainer

        args = flux_train.setup_parser().parse_args(argv)
        verify_training_args(args, flux_train.COMMAND_LINE)
        trainer = FullTrainer(args)
    code = trainer.run()
    from safetensors.torch import save_file

    trained = trainer.network if isinstance(trainer, LoRATrainer) else trainer.models.flux
    state = {k: v.detach().contiguous().cpu() for k, v in trained.state_dict().items()}
    rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
    save_file(state, str(dump_dir / f"rank{rank}_of_{world}.safetensors"))
    return code


if __name__ == "__main__":
    sys.exit(main())
