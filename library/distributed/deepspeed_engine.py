"""DeepSpeed ZeRO stages 0-3 through accelerate.

The plugin comes from sd-scripts' arguments (`--deepspeed --zero_stage ...`, built in `accelerator_kwargs`) or from
an accelerate DeepSpeed config (`accelerate launch --config_file ds.yaml`: accelerate builds it from the
ACCELERATE_DEEPSPEED_* variables). Either way the trained modules go to `accelerator.prepare` inside a TrainStep
together with the optimizer and scheduler (accelerate hands DeepSpeed the model only with its optimizer), so ZeRO
partitions the optimizer state (stage 1), the gradients (2) and the trained parameters (3); the frozen base stays
outside. DeepSpeed then owns the step: `accelerator.backward` runs DeepSpeed's backward (which divides the loss by
the accumulation steps and reduces the gradients as its stage does; accelerate marks the accumulation boundary) and,
on the micro-batch that steps, DeepSpeed's step with its own clipping (`gradient_clipping` = --max_grad_norm in the
config, so the loop's clip does nothing here and nothing is clipped twice).

Saving: under ZeRO-3 the full weights are gathered with DeepSpeed's 16-bit consolidation (what
`accelerator.get_state_dict` calls: module by module, the full tensors only on the main process, in the weights'
own dtype -- float32 in an fp32 run, despite the name). Gathering the whole module on every rank
(GatheredParameters) would need the full model once per GPU. The consolidation is switched on in the config here,
so users need no --zero3_save_16bit_model. A --save_state folder holds accelerate's DeepSpeed checkpoint
(`pytorch_model/`: the module states and each rank's optimizer partition), which already contains the trained
weights, so the loop writes no safetensors copy of them there.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch

from library.distributed.engine import Engine, EngineError, env_flag
from library.distributed.train_step import TrainStep

logger = logging.getLogger(__name__)

CHECKPOINT = "pytorch_model"  # accelerate's DeepSpeed checkpoint folder inside a state folder (its MODEL_NAME)


def _nvme_errors(pairs) -> list[str]:
    return [f"--{what}_device nvme needs --{what}_nvme_path (a folder on a fast local NVMe drive)"
            for what, device, path in pairs if device == "nvme" and not path]


def accelerator_kwargs(args, environ=None) -> dict:
    """{"deepspeed_plugin": ...} built from sd-scripts' DeepSpeed arguments with --deepspeed; nothing for an
    accelerate DeepSpeed config (accelerate builds that plugin itself)."""
    if not getattr(args, "deepspeed", False):
        return {}
    environ = os.environ if environ is None else environ
    config_file = environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if config_file != "none":  # accelerate's plugin would read that file and ignore (or refuse) these arguments
        raise EngineError(f"--deepspeed with an accelerate config whose deepspeed_config_file ({config_file}) sets "
                          "DeepSpeed up: leave out --deepspeed (the file decides) or launch with a config without it")
    if env_flag(environ, "ACCELERATE_USE_DEEPSPEED"):
        logger.warning("--deepspeed: the DeepSpeed settings come from --zero_stage and the other DeepSpeed "
                       "arguments (as in sd-scripts), not from the accelerate config's deepspeed_config")
    errors = _nvme_errors([("offload_optimizer", args.offload_optimizer_device, args.offload_optimizer_nvme_path),
                           ("offload_param", args.offload_param_device, args.offload_param_nvme_path)])
    if errors:
        raise EngineError("; ".join(errors))
    if args.offload_param_device and args.zero_stage != 3:
        raise EngineError(f"--offload_param_device needs --zero_stage 3 (parameters are partitioned, and so "
                          f"offloadable, only in stage 3); this run has --zero_stage {args.zero_stage}")
    if args.offload_optimizer_device and args.zero_stage == 0:
        raise EngineError("--offload_optimizer_device needs --zero_stage 1, 2 or 3 (stage 0 keeps the optimizer "
                          "whole on each device)")
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(
        zero_stage=args.zero_stage, gradient_accumulation_steps=args.gradient_accumulation_steps,
        gradient_clipping=float(args.max_grad_norm or 0),  # 0: no clipping (never the accelerate config's value)
        offload_optimizer_device=args.offload_optimizer_device or "none",
        offload_param_device=args.offload_param_device or "none",
        offload_optimizer_nvme_path=args.offload_optimizer_nvme_path,
        offload_param_nvme_path=args.offload_param_nvme_path,
        zero3_init_flag=bool(args.zero3_init_flag), zero3_save_16bit_model=bool(args.zero3_save_16bit_model))
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = args.train_batch_size
    return {"deepspeed_plugin": plugin}


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    def __init__(self, accelerator, args):
        super().__init__(accelerator, args)
        self.plugin = accelerator.state.deepspeed_plugin  # None when accelerate did not start DeepSpeed
        self.stage = int(self.plugin.zero_stage) if self.plugin is not None else None
        self.shards_parameters = self.stage == 3  # every rank takes part in each forward (samples too)
        self.model = None  # DeepSpeed's engine around the TrainStep, after prepare
        self._full: dict | None = None  # the gathered ZeRO-3 weights inside full_weights

    def describe(self) -> str:
        engine = type(self.model).__name__ if self.model is not None else "not prepared"
        return f"deepspeed (ZeRO-{self.stage}, {engine} over {self.accelerator.num_processes} processes)"

    # --- what cannot run --------------------------------------------------------------------------------------------

    def check(self, trainer) -> None:
        from accelerate.utils import DistributedType

        args = self.args
        if self.accelerator.distributed_type != DistributedType.DEEPSPEED or self.plugin is None:
            raise EngineError("DeepSpeed was asked for (--deepspeed or a DeepSpeed accelerate config) but accelerate "
                              "did not start it (ACCELERATE_USE_CPU or `accelerate launch --cpu` turn it off); on "
                              "CPU launch with a DeepSpeed accelerate config that sets use_cpu: true")
        problems = []
        if trainer.settings.blocks_to_swap:
            problems.append("--blocks_to_swap: DeepSpeed decides where the trained weights live; use "
                            "--zero_stage 3 (with --offload_param_device cpu to save more), or train without "
                            "DeepSpeed to swap blocks")
        for option in ("fused_backward_pass", "blockwise_fused_optimizers"):
            if getattr(args, option, False):
                problems.append(f"--{option}: DeepSpeed runs the optimizer step itself on partitioned gradients; "
                                "leave it out (ZeRO-2/3 already partition the gradients and optimizer state) or "
                                "train without DeepSpeed")
        optimizer = str(getattr(args, "optimizer_type", "") or "")
        if self.stage and "schedulefree" in optimizer.lower():
            problems.append(f"--optimizer_type {optimizer}: ZeRO steps the optimizer on flat copies of the weights, "
                            "so a schedule-free optimizer's train/eval weight switch would not reach the sampled or "
                            "saved model; use another optimizer (AdamW) or --zero_stage 0")
        if self.stage == 3:
            if getattr(args, "fp8_base", False) or getattr(args, "base_quantization", None):
                problems.append("--fp8_base/--base_quantization: ZeRO-3 partitions parameters, which fp8 or "
                                "quantized weights cannot be; use --zero_stage 2")
            elif getattr(trainer.command_line, "script", "") == "flux_train_network.py":
                problems.append("ZeRO-3 with a LoRA: the LoRA modules run inside the base model's layers, outside "
                                "the module calls ZeRO-3 gathers parameters on; use --zero_stage 2 (a LoRA is small) "
                                "or DDP")
        zero = self.plugin.deepspeed_config.get("zero_optimization", {})
        problems += _nvme_errors([(f"offload_{what}", (zero.get(f"offload_{what}") or {}).get("device"),
                                   (zero.get(f"offload_{what}") or {}).get("nvme_path"))
                                  for what in ("optimizer", "param")])
        clipping = self.plugin.deepspeed_config.get("gradient_clipping", "auto")
        if clipping != "auto" and float(clipping or 0) != float(args.max_grad_norm or 0):
            problems.append(f"gradient_clipping {clipping} in the DeepSpeed config differs from --max_grad_norm "
                            f"{args.max_grad_norm}; set the same value in both (DeepSpeed clips)")
        if getattr(args, "fp16_master_weights_and_gradients", False) and not (
                args.mixed_precision == "fp16" and self.stage == 2
                and (zero.get("offload_optimizer") or {}).get("device") == "cpu"):
            problems.append("--fp16_master_weights_and_gradients works only with --mixed_precision fp16, "
                            "--zero_stage 2 and --offload_optimizer_device cpu; leave it out")
        if problems:
            raise EngineError("; ".join(problems))
        if getattr(args, "zero3_init_flag", False):
            logger.warning("--zero3_init_flag: the suite loads the models itself (not under zero.Init); ZeRO-3 "
                           "partitions the trained weights when training starts")

    # --- training -----------------------------------------------------------------------------------------------------

    def attach(self, trainer):
        self.step = TrainStep(trainer.trainable_modules, trainer.denoiser())
        # DeepSpeed wraps the step only in prepare (it needs the optimizer): the loss calls through to it then
        return lambda *a, **kw: self.model(*a, **kw)

    def prepare(self, optimizer, scheduler):
        config, args = self.plugin.deepspeed_config, self.args
        if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":  # no DataLoader goes to prepare
            config["train_micro_batch_size_per_gpu"] = args.train_batch_size
        if config.get("gradient_clipping", "auto") == "auto":  # accelerate would fill in 1.0
            config["gradient_clipping"] = float(args.max_grad_norm or 0)
        # full weights for saving come from DeepSpeed's consolidation, which accelerate allows only with this on
        config.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True
        if "fp16" in config and config["fp16"].get("enabled") not in (False, "false"):
            config["fp16"].setdefault("initial_scale_power", 0)  # sd-scripts' setting
            if getattr(args, "fp16_master_weights_and_gradients", False):
                config["fp16"]["fp16_master_weights_and_grads"] = True
        self.model, optimizer, scheduler = self.accelerator.prepare(self.step, optimizer, scheduler)
        return optimizer, scheduler

    def accumulate(self, trainer):
        return self.accelerator.accumulate(self.model)

    def clip_grad_norm_(self, params, max_norm: float):
        """DeepSpeed clipped in its step (gradient_clipping in its config)."""
        return None

    # --- saving -------------------------------------------------------------------------------------------------------

    @contextmanager
    def full_weights(self, modules):
        if self.stage != 3:
            yield
            return
        # collective: every rank gathers each module's partitions in turn; only the main process keeps them
        state = self.accelerator.get_state_dict(self.model)
        self._full = state if self.accelerator.is_main_process else {}
        try:
            yield
        finally:
            self._full = None

    def state_dict(self, module: torch.nn.Module) -> dict:
        if self.stage != 3:
            return module.state_dict()
        if self._full is None:
            raise RuntimeError("DeepSpeedEngine.state_dict under ZeRO-3 is only valid inside full_weights()")
        index = next(i for i, m in enumerate(self.step.trained) if m is module)
        prefix = f"trained.{index}."
        return {k[len(prefix):]: v for k, v in self._full.items() if k.startswith(prefix)}

    def keeps_trainable_in_state(self) -> bool:
        return False  # the DeepSpeed checkpoint holds the trained weights

    def state_archives(self) -> list[str]:
        """accelerate's scheduler file, and DeepSpeed's module states and optimizer partition of this rank (names
        from DeepSpeed's engine: they differ between ZeRO-3 and the other stages, and for bf16 without ZeRO)."""
        archives = [a for a in super().state_archives() if a.startswith("scheduler")]
        names = [self.model._get_ckpt_name("", "")] + ([self.model._get_zero_ckpt_name("", "")] if self.stage else [])
        return archives + [f"{CHECKPOINT}/{os.path.basename(n)}" for n in names]

    def check_state(self, folder: Path) -> None:
        """The DeepSpeed checkpoint in a state folder was written by this many processes for these trained
        parameters (one line naming what differs; loading it would fail deep inside DeepSpeed)."""
        files = sorted((Path(folder) / CHECKPOINT).glob("*zero_pp_rank_*optim_states.pt"))
        world = self.accelerator.num_processes
        if self.stage and len(files) != world:
            raise EngineError(f"{Path(folder) / CHECKPOINT}: a DeepSpeed checkpoint of {len(files)} process(es); "
                              f"this run has {world}: resume with the number of processes that saved it")
        path = Path(folder) / CHECKPOINT / os.path.basename(self.model._get_ckpt_name("", ""))
        try:
            saved = torch.load(path, map_location="cpu", mmap=True, weights_only=True)  # no code from the file
        except (OSError, RuntimeError, zipfile.BadZipFile, EOFError, pickle.UnpicklingError) as e:
            raise EngineError(f"{path}: cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                              "; resume from another state") from None
        shapes = {k: tuple(v) for group in saved.get("param_shapes") or [] for k, v in group.items()}
        expected = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in self.step.named_parameters()
                    if p.requires_grad}
        differing = sorted(k.split(".", 2)[-1] for k in set(shapes) | set(expected) if shapes.get(k) != expected.get(k))
        if differing:  # named without the TrainStep's "trained.<i>." prefix
            raise EngineError(f"{path}: its trained parameters differ from this run's ({', '.join(differing[:3])}"
                              f"{'...' if len(differing) > 3 else ''}); resume with the model and options that "
                              "saved it")

