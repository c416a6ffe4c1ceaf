"""sd-scripts' training command line for the FLUX trainers: argument groups, --config_file, checks (reference 1).

Names, types and defaults are sd-scripts' (reference 1.2-1.14), so existing command lines and `--config_file`
TOMLs parse unchanged. Dataset options live in `library.data.arguments`, optimizer options in
`library.training.optimizers`.

Differences from sd-scripts, on the side of saying so:

* options that do nothing for FLUX ([I] in the reference) are named in one warning (`warn_ineffective`);
  options that cannot work ([X]) and contradictions are errors, all reported together (`verify_training_args`);
* unknown `--config_file` keys are errors with a suggestion (sd-scripts silently keeps them), and config values
  get the option's type (a TOML `network_alpha = 16` is 16.0, `text_encoder_lr = 1e-4` becomes `[1e-4]`);
* `--network_alpha` defaults to 1.0, not the int 1 (reference 17.25: int64 alpha tensors);
* `--cpu_offload_checkpointing` implies `--gradient_checkpointing` in every trainer (sd-scripts' LoRA trainer
  silently does nothing without it), and it composes with `--blocks_to_swap` (sd-scripts refuses the pair);
* options are never abbreviated, an unknown option names the closest ones, and numbers are checked as they are
  parsed (`--network_dim 0`, `--learning_rate -1`: one line naming what is allowed; `library.formats.command_line`).

Only cheap imports here: the trainers' --help must stay fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Mapping

from library.data.arguments import add_dataset_arguments
from library.models.variants import model_type_choices
from library.formats.command_line import (ArgumentParser, fraction, non_negative_float, non_negative_int,
                                          positive_float, positive_int, seed_int)
from library.training import optimizers

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainerCommandLine:
    """What one trainer adds to the shared command line, as data: the shared parser, checks and warnings read it
    instead of branching on a trainer name (library/training/recipes/command_lines.py holds one per recipe)."""

    script: str  # the entry point, for messages
    training: str  # what it trains, for messages ("LoRA training")
    add_arguments: Callable[[argparse.ArgumentParser], None]  # the trainer's own argument group
    checks: Callable[[argparse.Namespace, Callable], list[str]]  # its own checks: (args, get) -> problems
    dataset_kinds: Mapping[str, bool] = field(default_factory=dict)  # add_dataset_arguments' support_* flags
    ineffective: Mapping[str, str] = field(default_factory=dict)  # option -> why it does nothing in this trainer
    refused: Mapping[str, str] = field(default_factory=dict)  # option -> why it cannot work in this trainer
    fp8_base: bool = False  # the frozen transformer may be stored in fp8 (--fp8_base_unet implies --fp8_base)
    # --model_type values it trains
    model_types: tuple[str, ...] = ("flux", "dev", "krea", "schnell", "kontext", "canny", "depth", "chroma")


class TrainingArgumentError(ValueError):
    """Problems with the training options, one line each."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid training options:\n  " + "\n  ".join(self.problems))


# --- argument groups ----------------------------------------------------------------------------------------------


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    """Console logging (reference 1.2)."""
    add = parser.add_argument_group("logging").add_argument
    add("--console_log_level", type=str, default=None, choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        help="console log level (default: INFO)")
    add("--console_log_file", type=str, default=None, help="write the log to this file instead of the console")
    add("--console_log_simple", action="store_true", help="plain log lines (no rich formatting)")


def setup_logging(args: argparse.Namespace) -> None:
    """Apply --console_log_level / --console_log_file (plain lines either way: no rich dependency)."""
    level = getattr(logging, getattr(args, "console_log_level", None) or "INFO")
    kwargs = {"filename": args.console_log_file} if getattr(args, "console_log_file", None) else {}
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", **kwargs)


def add_model_path_arguments(parser: argparse.ArgumentParser) -> None:
    """Model files (reference 1.3 with the FLUX paths of 1.11/1.12)."""
    add = parser.add_argument_group("models").add_argument
    add("--v2", action="store_true", help="SD 2.x switch of sd-scripts; no effect on FLUX")
    add("--v_parameterization", action="store_true", help="SD v-prediction switch of sd-scripts; no effect on FLUX")
    add("--pretrained_model_name_or_path", type=str, default=None,
        help="FLUX.1 or Chroma transformer: BFL .safetensors (dev, schnell, Chroma; fp8 allowed), a diffusers "
             "folder, or a .gguf file (LoRA training; pip install gguf)")
    add("--clip_l", type=str, default=None, help="CLIP-L text encoder (clip_l.safetensors); not for Chroma")
    add("--t5xxl", type=str, default=None, help="T5-XXL encoder (t5xxl_fp16.safetensors or fp8)")
    add("--ae", type=str, default=None, help="FLUX autoencoder (ae.safetensors)")
    add("--tokenizer_cache_dir", type=str, default=None,
        help="folder of tokenizers (DIR/openai_clip-vit-large-patch14, DIR/google_t5-v1_1-xxl) for offline use")
    add("--disable_mmap_load_safetensors", action="store_true", help="read .safetensors without memory mapping")
    add("--model_type", type=str, default="flux", choices=model_type_choices(),
        help="which model: flux (default) recognises dev or schnell from the keys, Chroma from its keys and "
             "Kontext/Krea from the file's ModelSpec metadata; dev, krea, schnell, kontext, chroma name it (checked "
             "against the keys). The model's defaults (--guidance_scale, T5 length, sample steps) follow it: "
             "library/models/variants.py")


def add_modelspec_arguments(parser: argparse.ArgumentParser) -> None:
    """ModelSpec metadata written as modelspec.* keys (reference 1.4, 13.4)."""
    add = parser.add_argument_group("modelspec metadata").add_argument
    for name, what in [("title", "title (default: --output_name)"), ("author", "author"),
                       ("description", "description"), ("license", "license"),
                       ("tags", "tags, comma separated"), ("usage_hint", "usage hint"),
                       ("thumbnail", "thumbnail image file or data: URL"), ("merged_from", "models merged from"),
                       ("trigger_phrase", "trigger phrase"), ("preprocessor", "preprocessor"),
                       ("is_negative_embedding", "negative embedding flag")]:
        add(f"--metadata_{name}", type=str, default=None, help=f"modelspec.{name}: {what}")


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """Output, saving, steps, precision, logging, sampling, noise and loss options (reference 1.6).

    --train_batch_size and --prior_loss_weight are in `library.data.arguments`."""
    g = parser.add_argument_group("training")
    add = g.add_argument
    add("--output_dir", type=str, default=None, help="folder for checkpoints, states and samples")
    add("--output_name", type=str, default=None, help="base name of the saved files (default: epoch / at / last)")
    add("--huggingface_repo_id", type=str, default=None, help="upload checkpoints to this Hugging Face repo")
    add("--huggingface_repo_type", type=str, default=None, help="repo type: model, dataset, ...")
    add("--huggingface_path_in_repo", type=str, default=None, help="folder inside the repo")
    add("--huggingface_token", type=str, default=None, help="Hugging Face token (better: in --config_file)")
    add("--huggingface_repo_visibility", type=str, default=None, help="public, or private (anything else)")
    add("--save_state_to_huggingface", action="store_true", help="also upload state folders")
    add("--resume_from_huggingface", action="store_true",
        help="--resume is repo_id/path[:revision[:repo_type]] on the Hugging Face hub")
    add("--async_upload", action="store_true", help="upload in the background (the final upload waits)")
    add("--save_precision", type=str, default=None, choices=[None, "float", "fp16", "bf16"],
        help="dtype of saved weights (default: as trained)")
    add("--save_every_n_epochs", type=positive_int, default=None, help="save a checkpoint every N epochs")
    add("--save_every_n_steps", type=positive_int, default=None, help="save a checkpoint every N steps")
    add("--save_n_epoch_ratio", type=positive_int, default=None,
        help="save about N checkpoints over the run (by epochs)")
    add("--save_last_n_epochs", type=positive_int, default=None, help="keep only the last N epoch checkpoints")
    add("--save_last_n_epochs_state", type=positive_int, default=None, help="keep only the last N epoch states")
    add("--save_last_n_steps", type=positive_int, default=None, help="delete step checkpoints older than N steps")
    add("--save_last_n_steps_state", type=positive_int, default=None, help="delete step states older than N steps")
    add("--save_state", action="store_true", help="save the training state with every checkpoint (for --resume)")
    add("--save_state_on_train_end", action="store_true", help="save the training state at the end")
    add("--resume", type=str, default=None, help="state folder to resume from")
    add("--resume_inexact", action="store_true",
        help="resume even when the state's random states cannot be restored (fresh ones are drawn: the result "
             "differs from an uninterrupted run); without it such a state stops the run")
    add("--max_token_length", type=int, default=None, choices=[None, 150, 225],
        help="CLIP token length of SD models; no effect on FLUX (use --t5xxl_max_token_length)")
    add("--mem_eff_attn", action="store_true", help="SD option; FLUX always uses torch SDPA")
    add("--xformers", action="store_true", help="SD option; FLUX always uses torch SDPA")
    add("--sdpa", action="store_true", help="SD option; FLUX always uses torch SDPA")
    add("--torch_compile", action="store_true",
        help="compile each transformer block with torch.compile (backend: --dynamo_backend); faster steps on a GPU "
             "after a slow first step. inductor on CPU needs a C++ compiler")
    add("--dynamo_backend", type=str, default="inductor",
        choices=["eager", "aot_eager", "inductor", "aot_ts_nvfuser", "nvprims_nvfuser", "cudagraphs", "ofi", "fx2trt",
                 "onnxrt", "tensort", "ipex", "tvm"], help="torch.compile backend (default: inductor)")
    add("--vae", type=str, default=None, help="SD VAE; no effect on FLUX (use --ae)")
    add("--max_train_steps", type=non_negative_int, default=1600, help="optimizer steps (default: 1600)")
    add("--max_train_epochs", type=positive_int, default=None, help="epochs; overrides --max_train_steps")
    add("--max_data_loader_n_workers", type=non_negative_int, default=8,
        help="DataLoader worker processes (default: 8)")
    add("--persistent_data_loader_workers", action="store_true", help="keep DataLoader workers between epochs")
    add("--seed", type=seed_int, default=None, help="random seed (default: a random one, recorded in the metadata)")
    add("--gradient_checkpointing", action="store_true", help="recompute block activations in the backward pass")
    add("--gradient_accumulation_steps", type=positive_int, default=1,
        help="micro-batches per optimizer step (default: 1)")
    add("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"], help="autocast dtype")
    add("--full_fp16", action="store_true", help="trained weights in fp16 (needs --mixed_precision fp16)")
    add("--full_bf16", action="store_true", help="trained weights in bf16 (needs --mixed_precision bf16)")
    add("--fp8_base", action="store_true", help="frozen base model weights in fp8 (float8_e4m3fn); the same as "
        "--base_quantization fp8")
    add("--fp8_matmul", action="store_true",
        help="with --fp8_base: compute the frozen fp8 Linears with torch._scaled_mm (activations quantised to fp8) "
             "on GPUs of compute capability 8.9+; elsewhere the weights are upcast as without it (logged)")
    add("--base_quantization", type=str, default=None, choices=["nf4", "int8", "fp8", "fp8_scaled"],
        help="store the frozen transformer's block weights quantized: nf4 or int8 (bitsandbytes, quantized while "
             "loading; T5 stays in the weight dtype), fp8 (= --fp8_base), fp8_scaled (fp8 with a float32 scale per "
             "tensor, ComfyUI's scaled fp8; a scaled file keeps its own scales)")
    add("--ddp_timeout", type=positive_int, default=None, help="distributed process group timeout in minutes")
    add("--ddp_gradient_as_bucket_view", action="store_true", help="DDP gradient_as_bucket_view")
    add("--ddp_static_graph", action="store_true", help="DDP static_graph")
    add("--clip_skip", type=int, default=None, help="SD option; no effect on FLUX")
    add("--logging_dir", type=str, default=None, help="TensorBoard log folder")
    add("--log_with", type=str, default=None, choices=["tensorboard", "wandb", "all"],
        help="trackers (default: tensorboard when --logging_dir is given)")
    add("--loss_csv", type=str, default=None,
        help="CSV file of the per-step training loss and learning rate (step,loss,lr), needs no tracker package")
    add("--log_prefix", type=str, default=None, help="prefix of the timestamped log folder")
    add("--log_tracker_name", type=str, default=None, help="tracker project name")
    add("--wandb_run_name", type=str, default=None, help="wandb run name")
    add("--log_tracker_config", type=str, default=None, help="TOML file of tracker init arguments")
    add("--wandb_api_key", type=str, default=None, help="wandb API key (better: in --config_file)")
    add("--log_config", action="store_true", help="log the options (without paths and secrets) to the tracker")
    add("--noise_offset", type=float, default=None, help="SD noise offset; no effect on FLUX")
    add("--noise_offset_random_strength", action="store_true", help="SD noise offset option; no effect on FLUX")
    add("--multires_noise_iterations", type=int, default=None, help="SD multires noise; no effect on FLUX")
    add("--multires_noise_discount", type=float, default=0.3, help="SD multires noise; no effect on FLUX")
    add("--adaptive_noise_scale", type=float, default=None, help="SD noise offset option; no effect on FLUX")
    add("--ip_noise_gamma", type=non_negative_float, default=None, help="input perturbation noise strength (e.g. 0.1)")
    add("--ip_noise_gamma_random_strength", action="store_true", help="draw the strength from U(0, gamma)")
    add("--zero_terminal_snr", action="store_true", help="SD noise schedule fix; no effect on FLUX")
    add("--min_timestep", type=int, default=None, help="SD option; FLUX draws sigma by --timestep_sampling")
    add("--max_timestep", type=int, default=None, help="SD option; FLUX draws sigma by --timestep_sampling")
    add("--loss_type", type=str, default="l2", choices=["l1", "l2", "huber", "smooth_l1"], help="loss (default: l2)")
    add("--huber_schedule", type=str, default="snr", choices=["constant", "exponential", "snr"],
        help="schedule of the Huber parameter over timesteps (default: snr)")
    add("--huber_c", type=positive_float, default=0.1, help="Huber parameter (default: 0.1)")
    add("--huber_scale", type=positive_float, default=1.0, help="Huber scale (default: 1.0)")
    add("--lowram", action="store_true", help="keep models on the GPU while caching / merging base weights")
    add("--highvram", action="store_true", help="skip CUDA cache clears while caching")
    add("--sample_every_n_steps", type=int, default=None, help="sample images every N steps")
    add("--sample_at_first", action="store_true", help="sample images before training")
    add("--sample_every_n_epochs", type=int, default=None, help="sample images every N epochs (overrides steps)")
    add("--sample_prompts", type=str, default=None, help="prompt file (.txt, .toml or .json)")
    add("--sample_sampler", type=str, default="ddim",
        choices=["ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
                 "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a"],
        help="SD sampler; FLUX samples always use its Euler flow sampler")
    add("--config_file", type=str, default=None, help="TOML file of options; the command line wins over it")
    add("--output_config", action="store_true", help="write the options given to --config_file and exit")


def add_deepspeed_arguments(parser: argparse.ArgumentParser) -> None:
    """DeepSpeed through accelerate (reference 1.8)."""
    add = parser.add_argument_group("deepspeed").add_argument
    add("--deepspeed", action="store_true", help="train with DeepSpeed")
    add("--zero_stage", type=int, default=2, choices=[0, 1, 2, 3], help="ZeRO stage (default: 2)")
    add("--offload_optimizer_device", type=str, default=None, choices=[None, "cpu", "nvme"],
        help="offload optimizer states")
    add("--offload_optimizer_nvme_path", type=str, default=None, help="NVMe path for optimizer offload")
    add("--offload_param_device", type=str, default=None, choices=[None, "cpu", "nvme"], help="offload parameters")
    add("--offload_param_nvme_path", type=str, default=None, help="NVMe path for parameter offload")
    add("--zero3_init_flag", action="store_true", help="ZeRO-3 zero.Init for model construction")
    add("--zero3_save_16bit_model", action="store_true", help="ZeRO-3: gather a 16-bit model for saving")
    add("--fp16_master_weights_and_gradients", action="store_true",
        help="fp16 master weights (ZeRO-2 with CPU optimizer offload only)")


def add_custom_train_arguments(parser: argparse.ArgumentParser) -> None:
    """sd-scripts' loss-weighting extras (reference 1.10; --dataset_config is in `library.data.arguments`)."""
    add = parser.add_argument_group("loss weighting (SD)").add_argument
    add("--min_snr_gamma", type=float, default=None, help="SD min-SNR weighting; no effect on FLUX")
    add("--scale_v_pred_loss_like_noise_pred", action="store_true", help="SD v-prediction option; no effect on FLUX")
    add("--v_pred_like_loss", type=float, default=None, help="SD option; no effect on FLUX")
    add("--debiased_estimation_loss", action="store_true", help="SD option; no effect on FLUX")
    add("--weighted_captions", action="store_true", help="SD (word:1.2) captions; not supported for FLUX")


def add_dit_arguments(parser: argparse.ArgumentParser) -> None:
    """Timestep density and block swapping (reference 1.11; the caching options are in `library.data.arguments`)."""
    add = parser.add_argument_group("DiT").add_argument
    add("--weighting_scheme", type=str, default="uniform",
        choices=["sigma_sqrt", "logit_normal", "mode", "cosmap", "none", "uniform"],
        help="timestep density of --timestep_sampling sigma and loss weighting (default: uniform)")
    add("--logit_mean", type=float, default=0.0, help="logit_normal mean (default: 0.0)")
    add("--logit_std", type=positive_float, default=1.0, help="logit_normal standard deviation (default: 1.0)")
    add("--mode_scale", type=float, default=1.29, help="scale of the 'mode' density (default: 1.29)")
    add("--blocks_to_swap", type=blocks_to_swap_arg, default=None,
        help="transformer blocks whose weights stay in CPU memory and are streamed in when needed: 1 to 35 for "
             "FLUX.1 (N // 2 double and (N - N // 2) * 2 single blocks), or 'auto' with --vram_budget_gb to pick "
             "the smallest N that fits")
    add("--vram_budget_gb", type=positive_float, default=None,
        help="GPU memory to plan for with --blocks_to_swap auto, in GiB (e.g. 7.5 on an 8 GB card): the smallest "
             "N whose peak predicted by the memory planner (tools/plan_memory.py) fits is used")


def blocks_to_swap_arg(text: str) -> int | str:
    """--blocks_to_swap: a count or 'auto' (TOML configs may give an int)."""
    if isinstance(text, int) or str(text).strip().lower() != "auto":
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number of blocks or 'auto', got {text!r}") from None
    return "auto"


def add_flux_arguments(parser: argparse.ArgumentParser) -> None:
    """FLUX training options (reference 1.12; the model paths are in `add_model_path_arguments`)."""
    add = parser.add_argument_group("FLUX").add_argument
    add("--controlnet_model_name_or_path", type=str, default=None,
        help="ControlNet trainer: ControlNet to continue from (sd-scripts layout, or diffusers layout: file or "
             "folder); default: a new one started from the transformer's first blocks, zero outputs. LoRA trainer: "
             "a frozen ControlNet the LoRA trains through (ControlNet subsets give its control images)")
    add("--t5xxl_max_token_length", type=positive_int, default=None,
        help="T5 tokens (default: the model's: 256 schnell, 512 otherwise)")
    add("--apply_t5_attn_mask", action="store_true", help="mask T5 padding in T5 and in the transformer")
    add("--guidance_scale", type=float, default=None,
        help="guidance embedding value while training (default: the model's: 3.5 dev and Krea as sd-scripts, 1.0 "
             "Kontext; schnell has no guidance input)")
    add("--timestep_sampling", type=str, default="sigma",
        choices=["sigma", "uniform", "sigmoid", "shift", "flux_shift"],
        help="how sigma is drawn (default: sigma)")
    add("--sigmoid_scale", type=positive_float, default=1.0,
        help="scale for sigmoid / shift / flux_shift (default: 1.0)")
    add("--model_prediction_type", type=str, default="sigma_scaled", choices=["raw", "additive", "sigma_scaled"],
        help="how the prediction is turned into the loss input (default: sigma_scaled; raw recommended)")
    add("--discrete_flow_shift", type=positive_float, default=3.0,
        help="shift of 'shift' and 'sigma' sampling (default: 3.0)")
    add("--assistant_lora", type=str, default=None, metavar="PATH",
        help="FLUX.1-schnell LoRA training: a de-distillation LoRA (e.g. ostris/FLUX.1-schnell-training-adapter, "
             "ai-toolkit's assistant_lora_path) hooked onto the frozen transformer while training, switched off "
             "for sample images and never saved; refused for other models and by the full trainers")


_CPU_OFFLOAD_CHECKPOINTING_HELP = ("gradient checkpointing whose saved block inputs wait in CPU memory (implies "
                                   "--gradient_checkpointing; composes with --blocks_to_swap)")


def add_network_arguments(parser: argparse.ArgumentParser) -> None:
    """LoRA trainer options (reference 1.13) and its deprecated --split_mode."""
    add = parser.add_argument_group("network").add_argument
    add("--cpu_offload_checkpointing", action="store_true", help=_CPU_OFFLOAD_CHECKPOINTING_HELP)
    add("--no_metadata", action="store_true", help="write only the minimal ss_* metadata")
    add("--save_model_as", type=str, default="safetensors", choices=[None, "ckpt", "pt", "safetensors"],
        help="LoRA file format (default: safetensors)")
    add("--unet_lr", type=non_negative_float, default=None,
        help="learning rate of the transformer LoRA (default: --learning_rate)")
    add("--text_encoder_lr", type=non_negative_float, default=None, nargs="*",
        help="learning rate of the CLIP-L [and T5] LoRA (default: --learning_rate)")
    add("--fp8_base_unet", action="store_true", help="fp8 transformer only; text encoders stay in the weight dtype")
    add("--network_weights", type=str, default=None,
        help="LoRA weights to start from (any layout: kohya, diffusers/PEFT, ComfyUI, ...; docs/lora_formats.md)")
    add("--network_module", type=str, default=None, help="network module, e.g. networks.lora_flux")
    add("--network_dim", type=positive_int, default=None, help="LoRA rank (default: 4)")
    add("--network_alpha", type=non_negative_float, default=1.0, help="LoRA alpha (default: 1)")
    add("--network_dropout", type=fraction, default=None, help="dropout on the LoRA bottleneck")
    add("--network_args", type=str, default=None, nargs="*", help="key=value network options")
    add("--network_train_unet_only", action="store_true", help="train the transformer LoRA only")
    add("--network_train_text_encoder_only", action="store_true", help="train the text encoder LoRA only")
    add("--training_comment", type=str, default=None, help="comment recorded as ss_training_comment")
    add("--dim_from_weights", action="store_true", help="take ranks from --network_weights")
    add("--scale_weight_norms", type=positive_float, default=None, help="max norm of each LoRA update (e.g. 1.0)")
    add("--base_weights", type=str, default=None, nargs="*", help="LoRA files merged into the model before training")
    add("--base_weights_multiplier", type=float, default=None, nargs="*", help="multipliers of --base_weights")
    add("--dequantize_merged_layers", action="store_true",
        help="with --base_quantization nf4/int8: the layers --base_weights change are dequantized to the compute "
             "dtype and the LoRA merged into them (otherwise such a merge is refused)")
    add("--no_half_vae", action="store_true", help="autoencoder in fp32")
    add("--skip_until_initial_step", action="store_true",
        help="with --initial_step/--initial_epoch: skip the batches before that step (a --resume state always does)")
    add("--initial_epoch", type=int, default=None,
        help="1-based epoch to start from: the run starts at step (epoch - 1) x steps per epoch")
    add("--initial_step", type=int, default=None,
        help="step to start from (overrides --initial_epoch and a --resume state's step): the step counter and LR "
             "schedule start there and the run ends at --max_train_steps")
    add("--validation_seed", type=seed_int, default=None, help="seed of the validation split and loss")
    add("--validation_split", type=fraction, default=0.0, help="fraction of images held out for validation")
    add("--validate_every_n_steps", type=positive_int, default=None, help="validation loss every N steps")
    add("--validate_every_n_epochs", type=positive_int, default=None, help="validation loss every N epochs")
    add("--max_validation_steps", type=positive_int, default=None, help="at most N validation batches")
    add("--split_mode", action="store_true", help="deprecated: means --blocks_to_swap 18")


def add_full_train_arguments(parser: argparse.ArgumentParser) -> None:
    """flux_train.py / flux_train_control_net.py extras and their saving options (reference 1.14)."""
    add = parser.add_argument_group("full training").add_argument
    add("--mem_eff_save", action="store_true", help="stream the model to disk while saving")
    add("--fp8_scaled", default=None, choices=["tensor", "channel"],
        help="flux_train.py: save the transformer as scaled fp8 (ComfyUI's layout: float8_e4m3fn Linear weights with "
             "a float32 scale per tensor or per output channel, quantised from the trained weights); its other "
             "tensors in --save_precision. Training states keep full precision")
    add("--fused_optimizer_groups", type=int, default=None, help="sd-scripts option that has no effect")
    add("--blockwise_fused_optimizers", action="store_true", help="one optimizer per block, stepped in backward")
    add("--skip_latents_validity_check", action="store_true", help="deprecated: same as --skip_cache_check")
    add("--double_blocks_to_swap", type=non_negative_int, default=None, help="deprecated: use --blocks_to_swap")
    add("--single_blocks_to_swap", type=non_negative_int, default=None, help="deprecated: use --blocks_to_swap")
    add("--cpu_offload_checkpointing", action="store_true", help=_CPU_OFFLOAD_CHECKPOINTING_HELP)
    add("--save_model_as", type=str, default=None,
        choices=[None, "ckpt", "safetensors", "diffusers", "diffusers_safetensors"],
        help="sd-scripts option; the model is always saved as .safetensors")
    add("--use_safetensors", action="store_true", help="sd-scripts option; the model is always saved as .safetensors")


def training_parser(trainer: TrainerCommandLine, description: str | None = None, add_optimizer_arguments=None):
    """The whole parser of one trainer, composed as in reference 1.1."""
    add_optimizer_arguments = add_optimizer_arguments or optimizers.add_optimizer_arguments
    parser = ArgumentParser(description=description)  # no abbreviations, one-line errors
    add_logging_arguments(parser)
    add_model_path_arguments(parser)
    add_modelspec_arguments(parser)
    add_dataset_arguments(parser, **trainer.dataset_kinds)
    add_training_arguments(parser)
    add_deepspeed_arguments(parser)
    add_optimizer_arguments(parser)
    add_custom_train_arguments(parser)
    add_dit_arguments(parser)
    add_flux_arguments(parser)
    trainer.add_arguments(parser)
    return parser


def parse_network_args(items: list[str] | None) -> dict[str, str]:
    """`--network_args` as a dict: each item split at its first '=' (values stay strings, reference 9.4)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise TrainingArgumentError([f"--network_args item '{item}' is not key=value"])
        key, value = item.split("=", 1)
        out[key] = value
    return out


def option_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions
            if a.option_strings and a.dest != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)}


def parser_defaults(parser: argparse.ArgumentParser) -> dict:
    """The value of every option when nothing is given (string defaults converted as argparse does)."""
    try:
        return vars(parser.parse_args([]))
    except SystemExit:  # a required option: fall back to the raw defaults
        return {dest: a.default for dest, a in option_actions(parser).items()}


# --- options without effect ([I]) and options that cannot work ([X]) ---------------------------------------------

_SDPA = "FLUX always uses torch scaled_dot_product_attention"
_NOISE = "flow-matching training does not add SD noise offsets (sd-scripts only records them in the metadata)"
_SNR = "an SD noise-prediction loss weighting; see --weighting_scheme and --model_prediction_type"

INEFFECTIVE_FOR_FLUX: dict[str, str] = {
    "v2": "an SD 2.x switch (sd-scripts only records it as ss_v2)",
    "v_parameterization": "an SD v-prediction switch; see --model_prediction_type",
    "max_token_length": "the CLIP token limit of SD models; use --t5xxl_max_token_length",
    "mem_eff_attn": _SDPA, "xformers": _SDPA, "sdpa": _SDPA,
    "vae": "an SD VAE; FLUX uses the autoencoder of --ae",
    "clip_skip": "FLUX uses CLIP-L's pooled output only",
    "noise_offset": _NOISE, "noise_offset_random_strength": _NOISE, "multires_noise_iterations": _NOISE,
    "multires_noise_discount": _NOISE, "adaptive_noise_scale": _NOISE,
    "zero_terminal_snr": "an SD noise schedule fix; FLUX uses flow matching",
    "min_timestep": "sigma is drawn by --timestep_sampling (only recorded in modelspec.timestep_range)",
    "max_timestep": "sigma is drawn by --timestep_sampling (only recorded in modelspec.timestep_range)",
    "sample_sampler": "sample images always use FLUX's Euler flow sampler",
    "min_snr_gamma": _SNR, "scale_v_pred_loss_like_noise_pred": _SNR, "v_pred_like_loss": _SNR,
    "debiased_estimation_loss": _SNR,
}


def warn_ineffective(args: argparse.Namespace, parser: argparse.ArgumentParser,
                     trainer: TrainerCommandLine) -> list[str]:
    """Log ONE warning naming every option without effect on FLUX that `args` sets to a non-default value.

    Returns the option names warned about (in parser order), empty when none."""
    reasons = {**INEFFECTIVE_FOR_FLUX, **trainer.ineffective}
    defaults = parser_defaults(parser)
    named = [(a.option_strings[0], reasons[dest]) for dest, a in option_actions(parser).items()
             if dest in reasons and getattr(args, dest, defaults.get(dest)) != defaults.get(dest)]
    if named:
        logger.warning("%s %s no effect on FLUX training: %s", ", ".join(n for n, _ in named),
                       "has" if len(named) == 1 else "have", "; ".join(f"{n}: {why}" for n, why in named))
    return [n for n, _ in named]


def _unsupported(args: argparse.Namespace, trainer: TrainerCommandLine) -> list[str]:
    problems = []
    model_type = getattr(args, "model_type", "flux")
    if model_type not in trainer.model_types:
        problems.append(f"--model_type {model_type} is not supported by {trainer.script}: it trains "
                        f"{', '.join(trainer.model_types)}")
    problems += [f"--{name} {why}" for name, why in trainer.refused.items() if getattr(args, name, False)]
    return problems


def _base_quantization_problems(get) -> list[str]:
    quant = get("base_quantization")
    if quant in ("nf4", "int8") and (get("fp8_base") or get("fp8_base_unet")):
        return [f"--base_quantization {quant} and --fp8_base / --fp8_base_unet exclude each other: choose one"]
    return []


# --- checks and implications (reference 1.16) ---------------------------------------------------------------------


def verify_training_args(args: argparse.Namespace, trainer: TrainerCommandLine) -> argparse.Namespace:
    """Apply sd-scripts' implications to `args` (in place, each logged) and reject contradictions.

    Raises TrainingArgumentError listing every problem. Dataset-level checks (resolution, buckets, caption options
    against caching) belong to `library.data.config`; optimizer checks to `library.training.optimizers`."""
    if not isinstance(trainer, TrainerCommandLine):
        raise TypeError(f"verify_training_args needs a recipe's TrainerCommandLine, got {trainer!r}")
    get = lambda name, default=None: getattr(args, name, default)  # noqa: E731 (args of any trainer)
    problems = _unsupported(args, trainer)

    def imply(flag: str, implied: str) -> None:
        if get(flag) and not get(implied):
            logger.info("--%s implies --%s", flag, implied)
            setattr(args, implied, True)

    imply("cache_latents_to_disk", "cache_latents")
    imply("cache_text_encoder_outputs_to_disk", "cache_text_encoder_outputs")
    if trainer.fp8_base:
        imply("fp8_base_unet", "fp8_base")
        problems += _base_quantization_problems(get)
    imply("cpu_offload_checkpointing", "gradient_checkpointing")
    for name in ("sample_every_n_steps", "sample_every_n_epochs"):
        if get(name) is not None and get(name) <= 0:
            logger.info("--%s %d: sampling at that interval disabled", name, get(name))
            setattr(args, name, None)
    _deprecated(args, get)

    if get("full_fp16") and get("full_bf16"):
        problems.append("--full_fp16 and --full_bf16 exclude each other: choose one")
    for flag, dtype in (("full_fp16", "fp16"), ("full_bf16", "bf16")):
        if get(flag) and get("mixed_precision") != dtype:
            problems.append(f"--{flag} requires --mixed_precision {dtype} (got {get('mixed_precision')})")
    if trainer.fp8_base and get("base_quantization") in ("fp8", "fp8_scaled"):
        imply("base_quantization", "fp8_base")  # one name for the fp8 path downstream (scaled: setup.load_models)
    if trainer.fp8_base and get("fp8_base") and get("mixed_precision", "no") == "no":
        problems.append("--fp8_base / --fp8_base_unet require --mixed_precision bf16 or fp16: fp8 weights are "
                        "computed in the autocast dtype")
    if get("max_train_steps") == 0 and get("max_train_epochs") is None:  # the type allows 0 for --max_train_epochs
        problems.append("--max_train_steps 0: must be 1 or more (or give --max_train_epochs)")
    swap = get("blocks_to_swap")
    if swap is not None and swap != "auto" and swap < 0:
        problems.append(f"--blocks_to_swap must be 0 or more, got {swap}")
    if get("adaptive_noise_scale") is not None and get("noise_offset") is None:
        problems.append("--adaptive_noise_scale requires --noise_offset")
    if get("scale_v_pred_loss_like_noise_pred") and not get("v_parameterization"):
        problems.append("--scale_v_pred_loss_like_noise_pred requires --v_parameterization")
    if get("v_pred_like_loss") and get("v_parameterization"):
        problems.append("--v_pred_like_loss cannot be used with --v_parameterization")
    if get("resume_from_huggingface") and not get("resume"):
        problems.append("--resume_from_huggingface needs --resume repo_id/path[:revision[:repo_type]]")
    thumbnail = get("metadata_thumbnail")
    if thumbnail and not thumbnail.startswith("data:") and not os.path.isfile(thumbnail):
        problems.append(f"--metadata_thumbnail {thumbnail}: no such image file (or give a data: URL)")
    problems += trainer.checks(args, get)
    _saving_notes(get)
    if problems:
        raise TrainingArgumentError(problems)
    return args


def _deprecated(args: argparse.Namespace, get) -> None:
    if get("split_mode"):
        if get("blocks_to_swap") is None:
            logger.warning("--split_mode is deprecated: using --blocks_to_swap 18 instead")
            args.blocks_to_swap = 18
        else:
            logger.warning("--split_mode is deprecated and ignored: --blocks_to_swap %s is used", get("blocks_to_swap"))
    double, single = get("double_blocks_to_swap"), get("single_blocks_to_swap")
    if double is not None or single is not None:
        swap = (double or 0) + (single or 0) // 2
        logger.warning("--double_blocks_to_swap / --single_blocks_to_swap are deprecated: using --blocks_to_swap %d "
                       "(double + single // 2)%s", swap,
                       f" instead of {get('blocks_to_swap')}" if get("blocks_to_swap") is not None else "")
        args.blocks_to_swap = swap
    if get("skip_latents_validity_check"):
        logger.warning("--skip_latents_validity_check is deprecated: using --skip_cache_check")
        args.skip_cache_check = True


def _saving_notes(get) -> None:
    for last, every in (("save_last_n_steps", "save_every_n_steps"), ("save_last_n_steps_state", "save_every_n_steps"),
                        ("save_last_n_epochs", "save_every_n_epochs"),
                        ("save_last_n_epochs_state", "save_every_n_epochs")):
        by_ratio = every.endswith("epochs") and get("save_n_epoch_ratio")
        if get(last) is not None and get(every) is None and not by_ratio:
            logger.warning("--%s has no effect without --%s", last, every)


def warn_command_line_secrets(argv: list[str] | None = None) -> None:
    """Warn when a secret was given on the command line, where process lists and shell history show it."""
    argv = sys.argv[1:] if argv is None else argv
    for name in ("--wandb_api_key", "--huggingface_token"):
        if any(a == name or a.startswith(name + "=") for a in argv):
            logger.warning("%s on the command line is visible to other users and in shell history: put it in "
                           "--config_file instead", name)
