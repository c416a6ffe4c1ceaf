"""What the end-to-end trainer tests share: the tiny models' command-line arguments and running a trainer in process
(the same parse -> verify -> Trainer path as the entry points, keeping the Trainer for inspection)."""

from __future__ import annotations

import importlib

TRAINERS = {  # trainer kind -> (entry module, Trainer module, Trainer class)
    "network": ("flux_train_network", "library.training.recipes.lora", "LoRATrainer"),
    "full": ("flux_train", "library.training.recipes.full", "FullTrainer"),
    "controlnet": ("flux_train_control_net", "library.training.recipes.controlnet", "ControlNetTrainer"),
}


def model_args(models: dict, t5_tokens: int = 16) -> list[str]:
    """The four model files and tokenizers written by tools/make_tiny_models.py."""
    return ["--pretrained_model_name_or_path", str(models["flux"]), "--clip_l", str(models["clip_l"]),
            "--t5xxl", str(models["t5xxl"]), "--ae", str(models["ae"]), "--tokenizer_cache_dir",
            str(models["tokenizers"]), "--t5xxl_max_token_length", str(t5_tokens)]


def run_args(models: dict, toml, out) -> list[str]:
    """Models, dataset, output folder and the settings every short test run uses."""
    return [*model_args(models), "--dataset_config", str(toml), "--output_dir", str(out), "--seed", "7",
            "--max_data_loader_n_workers", "0", "--model_prediction_type", "raw"]


def run_trainer(kind: str, argv: list[str]):
    """(trainer, exit status) of one in-process run."""
    from library.training.arguments import verify_training_args

    entry, module, cls = TRAINERS[kind]
    entry = importlib.import_module(entry)
    args = entry.setup_parser().parse_args(argv)
    verify_training_args(args, entry.COMMAND_LINE)
    trainer = getattr(importlib.import_module(module), cls)(args)
    return trainer, trainer.run()


def launch_two_ranks(work, argv: list[str], port: int):
    """Run tests/two_rank_job.py on two CPU ranks through `accelerate launch` (gloo); returns the weights each rank
    ended with (rank0, rank1)."""
    from pathlib import Path

    from safetensors.torch import load_file

    launch_job_on_two_ranks("two_rank_job.py", [str(work), *argv], port)
    return tuple(load_file(str(Path(work) / f"rank{i}_of_2.safetensors")) for i in range(2))


def launch_job_on_two_ranks(script: str, args: list[str], port: int) -> None:
    """Run tests/`script` with `args` on two CPU ranks through `accelerate launch` (a real gloo process group)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(port)]
    r = subprocess.run([*launcher, str(root / "tests" / script), *args],
                       capture_output=True, text=True, cwd=root, env=env, timeout=600)
    errors = [line for line in r.stderr.splitlines() if "Error" in line and "ChildFailedError" not in line]
    assert r.returncode == 0, "\n".join(errors[-10:]) + "\n" + r.stderr[-3000:]


def swappable_tiny_models(base):
    """Tiny models whose transformer has 4 double + 8 single blocks (the tiny preset's 2 + 2 cannot swap any: each
    stack keeps 2 blocks), and a 2-image demo dataset: (models, dataset toml)."""
    from dataclasses import replace

    import torch

    from library.formats.safetensors_io import save_file_atomic
    from library.models.checkpoint import analyze_checkpoint
    from library.models.transformer import Flux
    from tools.make_demo_dataset import make_demo_dataset
    from tools.make_tiny_models import make_tiny_models

    models = make_tiny_models(base / "models")
    params = replace(analyze_checkpoint(models["flux"]).params, depth=4, depth_single_blocks=8)
    torch.manual_seed(3)
    models["flux"] = base / "models" / "flux_12_blocks.safetensors"
    save_file_atomic(Flux(params).state_dict(), models["flux"], {"tiny": "true"})
    return models, make_demo_dataset(base / "data", count=2, size=32)


def rendered_latents(models: dict, folder, *extra: str, steps: int = 2):
    """Latents of a 32x32 `flux_minimal_inference.py` render of "a red circle" (fp32, CPU, seed 1) into `folder`."""
    from safetensors.torch import load_file

    import flux_minimal_inference

    assert flux_minimal_inference.main([
        "--ckpt_path", str(models["flux"]), "--ae", str(models["ae"]), "--clip_l", str(models["clip_l"]),
        "--t5xxl", str(models["t5xxl"]), "--tokenizer_cache_dir", str(models["tokenizers"]),
        "--t5xxl_max_token_length", "16", "--dtype", "fp32", "--device", "cpu", "--width", "32", "--height", "32",
        "--steps", str(steps), "--seed", "1", "--prompt", "a red circle", "--output_dir", str(folder),
        "--output_latents", *extra]) == 0
    (file,) = folder.glob("*_latents.safetensors")
    return load_file(str(file))["latents"].float()
