#!/usr/bin/env bash
# The main job on the built-in tiny default, offline, on CPU: write trained-like tiny FLUX.1 model files and a
# two-image dataset (a red circle, a green square), train a LoRA with `accelerate launch flux_train_network.py`, sample
# each caption with and without the LoRA (same seed), and draw quickstart/result.png and quickstart/loss.png.
# Run `bash tools/setup_env.sh` first. Everything lands in ./quickstart/ (override with QUICKSTART_DIR; STEPS sets the
# training steps). The recipe is the one tests/test_lora_learning.py checks.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${QUICKSTART_DIR:-quickstart}
STEPS=${STEPS:-1000}
# One intra-op thread for the tiny models (more only spin on a busy 2-core machine); set OMP_NUM_THREADS to override.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=.venv/bin/python
ACCELERATE=.venv/bin/accelerate
MODELS=(--clip_l "$OUT/models/clip_l.safetensors" --t5xxl "$OUT/models/t5xxl.safetensors"
        --ae "$OUT/models/ae.safetensors" --tokenizer_cache_dir "$OUT/models/tokenizers" --t5xxl_max_token_length 32)
SECONDS=0

$PY tools/make_tiny_models.py --out "$OUT/models" --init trained-like --hidden_size 128 --fit_ae_steps 800
echo "models done at ${SECONDS}s"
$PY tools/make_demo_dataset.py --out "$OUT/data" --count 2 --size 64
rm -rf "$OUT/samples" "$OUT/loss.csv"

$ACCELERATE launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  flux_train_network.py --pretrained_model_name_or_path "$OUT/models/flux.safetensors" "${MODELS[@]}" \
  --dataset_config "$OUT/data/dataset.toml" --cache_latents_to_disk --cache_text_encoder_outputs \
  --network_module networks.lora_flux --network_dim 16 --network_alpha 16 --network_train_unet_only \
  --optimizer_type AdamW --learning_rate 1e-2 --lr_scheduler cosine --max_train_steps "$STEPS" \
  --model_prediction_type raw --output_dir "$OUT/output" --output_name demo_lora --seed 1 \
  --max_data_loader_n_workers 0 --loss_csv "$OUT/loss.csv"
echo "training done at ${SECONDS}s"

# Each caption with the base model and with the LoRA: same seed, size and steps; the final latents are kept.
for caption_file in "$OUT"/data/images/*.txt; do
  stem=$(basename "$caption_file" .txt)
  for variant in base lora; do
    lora=()
    [ "$variant" = lora ] && lora=(--lora_weights "$OUT/output/demo_lora.safetensors")
    $PY flux_minimal_inference.py --ckpt_path "$OUT/models/flux.safetensors" "${MODELS[@]}" --dtype fp32 \
      --device cpu --prompt "$(cat "$caption_file")" --width 64 --height 64 --steps 20 --seed 3 \
      --output_latents --output_dir "$OUT/samples/${stem}_$variant" "${lora[@]}"
  done
done

$PY tools/quickstart_report.py --images "$OUT/data/images" --samples "$OUT/samples" \
  --ae "$OUT/models/ae.safetensors" --loss_csv "$OUT/loss.csv" --out "$OUT"
echo "quickstart took ${SECONDS}s. Look at $OUT/result.png and $OUT/loss.png (LoRA: $OUT/output/demo_lora.safetensors)"
