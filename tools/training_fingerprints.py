"""SHA-256 of the files (tensors and metadata, less wall-clock times) the three trainers write with fixed seeds on
the tiny models, through the command lines only.

Used to show that a change that should not change behaviour (a refactor) leaves every output bit-identical: run it
before and after and compare the printed lines. It drives the entry points as subprocesses, so it does not depend on
the library's internal module layout.

    .venv/bin/python tools/training_fingerprints.py [--work DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


VOLATILE_METADATA = ("modelspec.date", "ss_training_started_at", "ss_training_finished_at")  # wall-clock times


def sha256(path: Path) -> str:
    """Digest of a .safetensors file's tensors and metadata, without the metadata that records wall-clock times."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    metadata = header.get("__metadata__", {})
    for key in VOLATILE_METADATA:
        metadata.pop(key, None)
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    digest.update(raw[8 + n:])
    return digest.hexdigest()


def run(cmd: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")


def fingerprints(work: Path) -> dict[str, str]:
    models, data, cn_data = work / "models", work / "data", work / "cn_data"
    run(["tools/make_tiny_models.py", "--out", str(models)])
    run(["tools/make_demo_dataset.py", "--out", str(data), "--count", "4", "--size", "64", "--repeats", "2"])
    run(["tools/make_demo_dataset.py", "--out", str(cn_data), "--count", "2", "--size", "32", "--controlnet"])
    common = ["--pretrained_model_name_or_path", str(models / "flux.safetensors"),
              "--clip_l", str(models / "clip_l.safetensors"), "--t5xxl", str(models / "t5xxl.safetensors"),
              "--ae", str(models / "ae.safetensors"), "--tokenizer_cache_dir", str(models / "tokenizers"),
              "--t5xxl_max_token_length", "32", "--seed", "42", "--max_data_loader_n_workers", "0",
              "--model_prediction_type", "raw", "--optimizer_type", "AdamW"]
    out = {}
    # the quickstart's LoRA (fewer steps), with a save and a state on the way
    run(["flux_train_network.py", *common, "--dataset_config", str(data / "dataset.toml"), "--cache_latents",
         "--cache_text_encoder_outputs", "--network_module", "networks.lora_flux", "--network_dim", "16",
         "--network_alpha", "16", "--network_train_unet_only", "--learning_rate", "5e-3", "--max_train_steps", "40",
         "--save_every_n_steps", "20", "--output_dir", str(work / "lora"), "--output_name", "demo_lora"])
    out["lora step 20"] = sha256(work / "lora" / "demo_lora-step00000020.safetensors")
    out["lora final"] = sha256(work / "lora" / "demo_lora.safetensors")
    # a LoRA with live text encoding, the text-encoder LoRA and gradient checkpointing
    run(["flux_train_network.py", *common, "--dataset_config", str(data / "dataset.toml"),
         "--network_module", "networks.lora_flux", "--network_dim", "4", "--learning_rate", "1e-3",
         "--max_train_steps", "6", "--gradient_checkpointing", "--output_dir", str(work / "lora_te"),
         "--output_name", "te"])
    out["lora with text encoders"] = sha256(work / "lora_te" / "te.safetensors")
    run(["flux_train.py", *common, "--dataset_config", str(data / "dataset.toml"), "--learning_rate", "1e-4",
         "--max_train_steps", "6", "--output_dir", str(work / "full"), "--output_name", "full"])
    out["full fine-tune"] = sha256(work / "full" / "full.safetensors")
    run(["flux_train_control_net.py", *common, "--dataset_config", str(cn_data / "dataset.toml"),
         "--learning_rate", "1e-3", "--max_train_steps", "6", "--output_dir", str(work / "cn"), "--output_name", "cn"])
    out["controlnet"] = sha256(work / "cn" / "cn.safetensors")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # a fixed folder by default; digests do not depend on it (per-item seeds come from paths relative to the dataset)
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "flux_training_fingerprints"),
                   help="working folder, emptied first (default: %(default)s)")
    args = p.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    result = fingerprints(work)
    for name, digest in result.items():
        print(f"{digest}  {name}")


if __name__ == "__main__":
    main()
