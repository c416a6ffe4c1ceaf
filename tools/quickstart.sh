#!/usr/bin/env bash
# The main job on the built-in tiny default, offline, on CPU: write tiny FLUX.1 model files and a small synthetic
# dataset, train a LoRA with `accelerate launch flux_train_network.py`, then render with the trained LoRA.
# Run `bash tools/setup_env.sh` first. Everything lands in ./quickstart/ (override with QUICKSTART_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${QUICKSTART_DIR:-quickstart}
# One intra-op thread for the tiny models (more only spin on a busy 2-core machine); set OMP_NUM_THREADS to override.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=.venv/bin/python
ACCELERATE=.venv/bin/accelerate

$PY tools/make_tiny_models.py --out "$OUT/models"
$PY tools/make_demo_dataset.py --out "$OUT/data" --count 4 --size 64 --repeats 2

$ACCELERATE launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  flux_train_network.py \
  --pretrained_model_name_or_path "$OUT/models/flux.safetensors" --clip_l "$OUT/models/clip_l.safetensors" \
  --t5xxl "$OUT/models/t5xxl.safetensors" --ae "$OUT/models/ae.safetensors" \
  --tokenizer_cache_dir "$OUT/models/tokenizers" --t5xxl_max_token_length 32 \
  --dataset_config "$OUT/data/dataset.toml" --cache_latents --cache_text_encoder_outputs \
  --network_module networks.lora_flux --network_dim 16 --network_alpha 16 --network_train_unet_only \
  --optimizer_type AdamW --learning_rate 5e-3 --max_train_steps 300 --model_prediction_type raw \
  --save_every_n_steps 100 --output_dir "$OUT/output" --output_name demo_lora --seed 42 \
  --max_data_loader_n_workers 0

$PY flux_minimal_inference.py --ckpt_path "$OUT/models/flux.safetensors" --ae "$OUT/models/ae.safetensors" \
  --clip_l "$OUT/models/clip_l.safetensors" --t5xxl "$OUT/models/t5xxl.safetensors" \
  --tokenizer_cache_dir "$OUT/models/tokenizers" --t5xxl_max_token_length 32 --dtype fp32 \
  --prompt "a red circle on a white background" --width 64 --height 64 --steps 20 --seed 42 \
  --lora_weights "$OUT/output/demo_lora.safetensors" --output_dir "$OUT/images"
echo "LoRA: $OUT/output/demo_lora.safetensors; image: $(ls -t "$OUT"/images/*.png | head -1)"
