"""FSDP2 (PyTorch's `fully_shard`) applied by us, from an accelerate FSDP config.

`accelerate launch --config_file fsdp.yaml` sets ACCELERATE_USE_FSDP and FSDP_* variables; engine_kind() then gives
`fsdp2`. Accelerate stands aside: on CPU it ignores FSDP, and on GPUs it would wrap the prepared model its own way,
while our models never go through `accelerator.prepare` (the frozen base is no trained module, a LoRA lives outside
the transformer's module tree). accelerator_kwargs() therefore reads the FSDP settings and clears
ACCELERATE_USE_FSDP, so the Accelerator is a plain multi-process one (MULTI_GPU or MULTI_CPU: process group,
accumulation, mixed precision autocast) and FSDP2Engine shards the models itself: one code path for CPU and GPU.

Honoured settings: fsdp_reshard_after_forward (true / FULL_SHARD, false / SHARD_GRAD_OP), fsdp_offload_params
(CPUOffloadPolicy, GPU runs), mixed_precision (the parameters' dtype in forward/backward; gradients reduced in
fp32). Ignored: the wrap policy (the units are always the transformer blocks), fsdp_state_dict_type (saved models
are always full files; the optimizer state always sharded), fsdp_cpu_ram_efficient_loading, sync_module_states
(every rank loads the same files), fsdp_version (always FSDP2). Refused: NO_SHARD / HYBRID_SHARD and
fsdp_activation_checkpointing (use --gradient_checkpointing).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from library.distributed.engine import Engine, EngineError, env_flag
from library.distributed.grad_sync import GradientBuckets
from library.distributed.sharded_optimizer import check_saved, load_sharded, save_sharded

logger = logging.getLogger(__name__)

BLOCK_LISTS = ("double_blocks", "single_blocks")  # the transformer's and both ControlNet layouts' block stacks
RESHARD = {"true": True, "full_shard": True, "1": True, "false": False, "shard_grad_op": False, "2": False}


@dataclass(frozen=True)
class FSDPSettings:
    reshard_after_forward: bool = True
    offload_params: bool = False


def fsdp_settings(environ=None) -> FSDPSettings:
    """The accelerate FSDP config's settings we honour (its FSDP_* variables); refuses the ones we cannot."""
    environ = os.environ if environ is None else environ
    strategy = str(environ.get("FSDP_SHARDING_STRATEGY") or "FULL_SHARD").lower()
    reshard = str(environ.get("FSDP_RESHARD_AFTER_FORWARD") or strategy).lower()
    for value in (strategy, reshard):
        if value not in RESHARD:
            raise EngineError(f"accelerate FSDP config: sharding {value.upper()} is not supported; use "
                              "fsdp_reshard_after_forward: true (FULL_SHARD) or false (SHARD_GRAD_OP), or drop the "
                              "FSDP config for plain DDP")
    if env_flag(environ, "FSDP_ACTIVATION_CHECKPOINTING"):
        raise EngineError("accelerate FSDP config: fsdp_activation_checkpointing is not supported; set it to false "
                          "and use --gradient_checkpointing")
    return FSDPSettings(reshard_after_forward=RESHARD[reshard], offload_params=env_flag(environ, "FSDP_OFFLOAD_PARAMS"))


def accelerator_kwargs(args, environ=None) -> dict:
    """Checks the FSDP settings and makes the run's Accelerator a plain multi-process one: ACCELERATE_USE_FSDP is
    removed from this process's environment (accelerate reads it there), so accelerate neither wraps nor ignores
    anything; FSDP2Engine applies fully_shard. No extra Accelerator arguments."""
    fsdp_settings(environ)
    for env in {id(e): e for e in (os.environ, environ) if e is not None}.values():
        env.pop("ACCELERATE_USE_FSDP", None)
    return {}


def is_sharded(module: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in module.parameters())


class FSDP2Engine(Engine):
    """Each block of the transformer (and of a trained ControlNet) is one FSDP2 unit, its root module the last.
    A full fine-tune and a ControlNet train sharded weights (gradients reduce-scattered in fp32); a LoRA network
    stays replicated outside FSDP while the frozen base it hooks into is sharded, and its gradients are averaged
    across ranks before the step."""

    name = "fsdp2"
    shards_parameters = True

    def __init__(self, accelerator, args):
        super().__init__(accelerator, args)
        self.settings = fsdp_settings()
        self.roots: list[torch.nn.Module] = []  # the modules fully_shard was applied to (outermost)
        self.units = 0
        self._gathered: dict[int, dict] = {}

    # --- refusals -----------------------------------------------------------------------------------------------

    def check(self, trainer) -> None:
        args = self.args
        if trainer.settings.blocks_to_swap:
            raise EngineError("--blocks_to_swap cannot run under FSDP2 (the blocks are sharded across GPUs); drop it "
                              "and set fsdp_offload_params: true in the accelerate config to keep weights in CPU "
                              "memory")
        for option in ("fused_backward_pass", "blockwise_fused_optimizers"):
            if getattr(args, option, False):
                raise EngineError(f"--{option} cannot run under FSDP2 (it steps inside the backward, before the "
                                  "gradients are reduce-scattered); drop it: FSDP2 already shards gradients and "
                                  "optimizer state")
        quantized = [o for o in ("fp8_base", "fp8_base_unet") if getattr(args, o, False)]
        if getattr(args, "base_quantization", None):
            quantized.append(f"base_quantization {args.base_quantization}")
        if str(getattr(args, "pretrained_model_name_or_path", "") or "").lower().endswith(".gguf"):
            quantized.append("pretrained_model_name_or_path *.gguf")
        if quantized:
            raise EngineError(f"--{quantized[0]}: a quantized or fp8 base cannot be sharded by FSDP2; use a bf16 base "
                              "(it is sharded, so each GPU holds 1/N of it), or DDP / DeepSpeed ZeRO-2 for an fp8 base")
        if getattr(args, "torch_compile", False):
            raise EngineError("--torch_compile is not supported under FSDP2 here (untested with sharded blocks); drop "
                              "it")
        if (args.mixed_precision or "no") == "fp16" or getattr(args, "full_fp16", False):
            raise EngineError("fp16 under FSDP2 is not supported (its gradient scaler does not handle sharded "
                              "gradients here); use --mixed_precision bf16")

    # --- sharding -----------------------------------------------------------------------------------------------

    def shard(self, trainer) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        acc = self.accelerator
        device = acc.device
        mesh = init_device_mesh(device.type, (acc.num_processes,))
        param_dtype = {"bf16": torch.bfloat16}.get(self.args.mixed_precision or "no")
        offload = self.settings.offload_params and device.type == "cuda"  # CPU runs: weights are in CPU memory
        options = dict(mesh=mesh, reshard_after_forward=self.settings.reshard_after_forward,
                       mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32),
                       offload_policy=CPUOffloadPolicy() if offload else OffloadPolicy())
        flux = trainer.models.flux
        _refuse_unshardable(flux)
        # the transformer (trained, or the frozen base under a LoRA / ControlNet) and each trained module with
        # blocks (a ControlNet); a LoRA network has none and stays replicated
        modules = [flux] + [m for m in trainer.trainable_modules if m is not flux and _blocks(m)]
        for module in modules:
            for block in _blocks(module):
                fully_shard(block, **options)
                self.units += 1
            fully_shard(module, **options)
            self.units += 1
            self.roots.append(module)
        self.trained_roots = [m for m in self.roots if any(m is t for t in trainer.trainable_modules)]
        self.replicated = [m for m in trainer.trainable_modules if not any(m is r for r in self.roots)]
        # the replicated modules' (a LoRA's) gradients: bucketed all-reduce launched from their gradient hooks
        acc = self.accelerator
        plain = [p for m in self.replicated for p in m.parameters() if p.requires_grad]
        self.buckets = GradientBuckets(plain, acc.device, lambda: acc.sync_gradients) if plain and \
            acc.num_processes > 1 else None

    def describe(self) -> str:
        s = self.settings
        return (f"fsdp2 ({self.units} units in {len(self.roots)} sharded module(s) over "
                f"{self.accelerator.num_processes} processes; reshard_after_forward={s.reshard_after_forward}, "
                f"params in {self.args.mixed_precision if self.args.mixed_precision == 'bf16' else 'their dtype'}, "
                f"cpu offload={s.offload_params and self.accelerator.device.type == 'cuda'}, "
                f"{len(self.replicated)} replicated trained module(s))")

    @contextmanager
    def accumulate(self, trainer):
        """accelerate decides whether this micro-batch steps; only then do the sharded gradients reduce-scatter
        (before, each rank accumulates its unsharded gradients)."""
        with self.accelerator.accumulate():
            for root in self.trained_roots:
                root.set_requires_gradient_sync(self.accelerator.sync_gradients)
            yield

    def before_step(self, params) -> None:
        if self.buckets is not None:  # the replicated modules' all-reduces, launched during the backward
            self.buckets.finish()

    @torch.no_grad()
    def clip_grad_norm_(self, params, max_norm: float):
        """The global norm: squares of the local shards summed over ranks, plus the replicated gradients' own
        (identical on every rank, so counted once)."""
        grads = [p.grad for p in params if p.grad is not None]
        sharded = [g.to_local() for g in grads if isinstance(g, DTensor)]
        plain = [g for g in grads if not isinstance(g, DTensor)]
        device = self.accelerator.device
        square = torch.zeros((), device=device, dtype=torch.float32)
        for g in sharded:
            square += g.float().pow(2).sum().to(device)
        if sharded and self.accelerator.num_processes > 1:
            torch.distributed.all_reduce(square)
        for g in plain:
            square += g.float().pow(2).sum().to(device)
        norm = square.sqrt()
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for g in sharded + plain:
            g.mul_(scale.to(g.device, g.dtype))
        return norm

    # --- weights ------------------------------------------------------------------------------------------------

    @contextmanager
    def full_weights(self, modules):
        """Every rank gathers each sharded module's full state dict; the main process keeps it (in CPU memory)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        try:
            for m in modules:
                if any(m is r for r in self.roots):
                    self._gathered[id(m)] = get_model_state_dict(m, options=options)
            yield
        finally:
            self._gathered.clear()

    def state_dict(self, module: torch.nn.Module) -> dict:
        if id(module) in self._gathered:
            return self._gathered[id(module)]
        if is_sharded(module):
            raise RuntimeError("a sharded module's full weights exist only inside engine.full_weights()")
        return module.state_dict()

    @torch.no_grad()
    def load_state_dict(self, module: torch.nn.Module, tensors: dict) -> None:
        if not is_sharded(module):
            module.load_state_dict(tensors)
            return
        own = module.state_dict()
        if set(own) != set(tensors):
            raise KeyError(f"the weights do not match the module: {sorted(set(own) ^ set(tensors))[:3]}")
        for key, target in own.items():
            self.load_full_tensor_(target, tensors[key])

    @torch.no_grad()
    def load_full_tensor_(self, target: torch.Tensor, value: torch.Tensor) -> None:
        """A full tensor into a (possibly sharded) weight: this rank keeps its own shard, no communication."""
        if not isinstance(target, DTensor):
            target.copy_(value)
            return
        mine = distribute_tensor(value.to(target.device, target.dtype), target.device_mesh, target.placements,
                                 src_data_rank=None)
        target.to_local().copy_(mine.to_local())

    # --- state folders ------------------------------------------------------------------------------------------

    def state_archives(self) -> list[str]:
        """accelerate's files only: the optimizers' state is in our shard files (checked by check_state)."""
        acc = self.accelerator
        archives = [f"scheduler{f'_{i}' if i else ''}.bin" for i in range(len(acc._schedulers))]
        return archives + (["scaler.pt"] if acc.scaler is not None else [])

    def check_state(self, folder) -> None:
        acc = self.accelerator
        check_saved(Path(folder), acc.process_index, acc.num_processes)

    @contextmanager
    def _without_optimizers(self):
        """accelerate's save_state would write the main process's optimizer shards alone as a pickle: it handles
        the scheduler and RNG states, we the optimizers."""
        acc = self.accelerator
        optimizers, acc._optimizers = acc._optimizers, []
        try:
            yield optimizers
        finally:
            acc._optimizers = optimizers

    def save_state(self, folder) -> None:
        acc = self.accelerator
        with self._without_optimizers() as optimizers:
            acc.save_state(str(folder))
        if len(optimizers) != 1:
            raise EngineError(f"FSDP2 state saving expects one optimizer, the run has {len(optimizers)}")
        save_sharded(optimizers[0], Path(folder), acc.process_index, acc.num_processes)
        acc.wait_for_everyone()

    def load_state(self, folder) -> None:
        acc = self.accelerator
        with self._without_optimizers() as optimizers:
            acc.load_state(str(folder))
        load_sharded(optimizers[0], Path(folder), acc.process_index, acc.num_processes)


def _blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    return [b for name in BLOCK_LISTS for b in (getattr(module, name, None) or [])]


def _refuse_unshardable(module: torch.nn.Module) -> None:
    """A base stored fp8 or quantized (a file that was already so, without the options check() sees)."""
    for name, p in module.named_parameters():
        if type(p) not in (torch.nn.Parameter, torch.Tensor) or not (p.is_floating_point() and p.element_size() > 1):
            raise EngineError(f"the transformer's {name} is stored as {p.dtype} ({type(p).__name__}); FSDP2 cannot "
                              "shard a quantized or fp8 base: use a bf16 checkpoint, or DDP / DeepSpeed ZeRO-2")
