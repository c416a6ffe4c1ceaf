"""The checks of each recipe's own options (`TrainerCommandLine.checks`): problems as one line each, collected with
the shared ones by `library.training.arguments.verify_training_args`."""

from __future__ import annotations

import argparse
import logging

from library.training.arguments import TrainingArgumentError, parse_network_args

logger = logging.getLogger(__name__)


def lycoris_checks(net_args: dict[str, str], fp8_base: bool) -> list[str]:
    """What lycoris.kohya would only find out mid-step (it reads a flag as true unless it is "false")."""
    def flag(key: str) -> bool:
        return key in net_args and str(net_args[key]).lower() != "false"

    problems = []
    if fp8_base and not flag("bypass_mode"):
        problems.append("--fp8_base with --network_module lycoris.kohya needs --network_args bypass_mode=True: "
                        "lycoris otherwise rebuilds each fp8 weight and fails on it")
    if flag("dora_wd") and (flag("bypass_mode") or fp8_base):
        problems.append("--network_args dora_wd=True: lycoris' bypass forward (bypass_mode, needed with --fp8_base) "
                        "does not apply DoRA while training; use --network_module networks.lora_flux with "
                        "--network_args dora_wd=True, which trains DoRA on quantized bases")
    return problems


def network_checks(args: argparse.Namespace, get) -> list[str]:
    problems = []
    if not get("network_module"):
        problems.append("--network_module is required (e.g. --network_module networks.lora_flux)")
    if get("network_train_unet_only") and get("network_train_text_encoder_only"):
        problems.append("--network_train_unet_only and --network_train_text_encoder_only exclude each other: "
                        "together they train nothing")
    try:
        net_args = parse_network_args(get("network_args"))
    except TrainingArgumentError as e:
        problems += e.problems
        net_args = {}
    if net_args.get("train_t5xxl") == "True" and get("cache_text_encoder_outputs"):
        problems.append("--network_args train_t5xxl=True cannot be used with --cache_text_encoder_outputs: "
                        "a trained T5 must encode every step")
    if get("dim_from_weights") and not get("network_weights"):
        problems.append("--dim_from_weights needs --network_weights")
    if get("network_module") == "lycoris.kohya":
        problems += lycoris_checks(net_args, bool(get("fp8_base")))
    if get("save_model_as") in ("ckpt", "pt"):
        problems.append(f"--save_model_as {get('save_model_as')}: LoRAs are written as .safetensors only (pickled "
                        "files can run code when loaded); drop the option")
    multipliers, bases = get("base_weights_multiplier") or [], get("base_weights") or []
    if len(multipliers) > len(bases):
        problems.append(f"--base_weights_multiplier has {len(multipliers)} values for {len(bases)} --base_weights")
    if get("initial_step") is not None and get("initial_epoch") is not None:
        logger.warning("--initial_step %d overrides --initial_epoch %d", get("initial_step"), get("initial_epoch"))
    step = get("initial_step")
    if step is not None and step < 0:
        problems.append(f"--initial_step must be 0 or more, got {step}")
    elif step and get("max_train_epochs") is None and get("max_train_steps", 0) <= step:
        problems.append(f"--initial_step {step} must be below --max_train_steps {get('max_train_steps')}")
    if get("initial_epoch") is not None and get("initial_epoch") < 1:
        problems.append(f"--initial_epoch is 1-based, got {get('initial_epoch')}")
    return problems


def full_checks(args: argparse.Namespace, get) -> list[str]:
    problems = []
    optimizer = (get("optimizer_type") or "").lower()
    if get("fused_backward_pass"):
        if not optimizer.endswith("adafactor"):
            problems.append("--fused_backward_pass requires --optimizer_type adafactor")
        if get("gradient_accumulation_steps", 1) != 1:
            problems.append("--fused_backward_pass requires --gradient_accumulation_steps 1")
        if get("blockwise_fused_optimizers"):
            logger.warning("--blockwise_fused_optimizers ignored: --fused_backward_pass is used")
    elif get("blockwise_fused_optimizers") and "schedulefree" in optimizer:
        problems.append("--blockwise_fused_optimizers cannot use a schedule-free optimizer")
    fused = [f"--{n}" for n in ("fused_backward_pass", "blockwise_fused_optimizers") if get(n)]
    if fused and get("mixed_precision") == "fp16":
        problems.append(f"{fused[0]} cannot use --mixed_precision fp16: fp16 loss scaling needs every gradient "
                        "before a step; use --mixed_precision bf16")
    return problems
