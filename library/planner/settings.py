"""What the memory planner plans for: `PlanSettings` (one prediction's model, sizes and training options), built
from a trainer's command line by `settings_from_args`, and the `MemoryPlan` it returns; the CUDA overheads that
PyTorch's allocator does not show, with their sources."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import torch

from library.data.schema import resolve_resolution
from library.formats.safetensors_io import read_header
from library.models.checkpoint import analyze_checkpoint
from library.models.chroma import CHROMA_PRESETS, ChromaParams
from library.models.transformer import FLUX_PRESETS, FluxParams
from library.planner import controlnet_rig
from library.planner.quantized_bases import gguf_base_quantization
from library.training.optimizers import resolve_optimizer_type
from library.training.recipes.controlnet import ControlNetTrainer
from library.training.recipes.full import FullTrainer
from library.training.recipes.kontext import trains_kontext
from library.training.recipes.lora import LoRATrainer
from library.training.settings import MemoryProfile

# the recipes the planner simulates, by the name tools/plan_memory.py --trainer gives them
PLANNED_RECIPES = {r.memory_profile.name: r.memory_profile for r in (LoRATrainer, FullTrainer, ControlNetTrainer)}

GIB = 1024**3
MIB = 1024**2

# Memory on a CUDA device that PyTorch's allocator statistics do not show, added to every CUDA prediction.
RUNTIME_OVERHEAD = {
    # The CUDA context with lazy module loading (CUDA >= 11.7, PyTorch's default): about 300-500 MiB on recent
    # drivers, as nvidia-smi shows for a process that has only run `torch.zeros(1, device="cuda")`. Upper end taken.
    "cuda_context": 512 * MIB,
    # cuBLAS/cuBLASLt workspace: PyTorch allocates 32 MiB per handle and stream on Hopper (4 MiB x 8 before),
    # through its own allocator (CUBLAS_WORKSPACE_CONFIG); two streams when a swap stream runs beside compute.
    "cublas_workspace": 2 * 32 * MIB,
}
# Caching-allocator slack: blocks are rounded (512 B, 2 MiB segments) and freed blocks split; a fraction of what
# comes and goes in a step (activations, gradients, transients), as reserved exceeds allocated in steady-state
# training loops (torch.cuda.memory_reserved vs max_memory_allocated). An assumption, stated where printed.
ALLOCATOR_SLACK = 0.05
SOURCES = {
    "cuda_context": "CUDA context with lazy loading, 300-500 MiB per nvidia-smi on current drivers (upper end)",
    "cublas_workspace": "PyTorch's cuBLAS workspace, 32 MiB per handle/stream on sm90, two streams",
    "allocator_slack": f"{ALLOCATOR_SLACK:.0%} of activations, gradients and transients for the caching "
                       "allocator's rounding and fragmentation (assumption)",
}

# The table of `--table`: sd-scripts' swap counts and the settings the issue names.
TABLE_SWAPS = (0, 8, 18, 28, 35)
TABLE_RESOLUTIONS = (512, 1024)


@dataclass
class PlanSettings:
    """What one prediction is for. `target` is the device kind planned for: "cuda" or "cpu"."""

    trainer: str = "network"  # the planned recipe by its planner name (PLANNED_RECIPES): network (LoRA), full, ...
    controlnet: tuple = ()  # trainer controlnet: (layout, double, single blocks, modes, condition features)
    model: str = "dev"  # a preset name or a checkpoint path
    params: FluxParams = field(default_factory=lambda: FLUX_PRESETS["dev"])
    width: int = 1024
    height: int = 1024
    batch_size: int = 1
    t5_tokens: int = 512
    mixed_precision: str = "bf16"
    fp8_base: bool = False
    fp8_file: bool = False  # the checkpoint is stored in fp8 already
    base_quantization: str = ""  # a frozen base stored as nf4, int8, fp8_scaled, gguf_q4_k, ... ("": --fp8_base)
    gradient_checkpointing: bool = True
    cpu_offload_checkpointing: bool = False
    blocks_to_swap: int = 0
    network_module: str = "networks.lora_flux"  # the adapter: networks.lora_flux or lycoris.kohya (LoKr, LoHa...)
    network_dim: int = 16
    network_alpha: float = 16.0
    network_args: list = field(default_factory=list)
    optimizer_type: str = "AdamW8bit"
    optimizer_args: list = field(default_factory=list)
    fused_backward_pass: bool = False
    blockwise_fused_optimizers: bool = False
    full_bf16: bool = False
    cache_text_encoder_outputs: bool = True
    cache_latents: bool = True
    apply_t5_attn_mask: bool = False
    reference_images: int = 0  # FLUX.1 Kontext: references per sample at the target's size (more image tokens)
    target: str = "cuda"
    # the run's engine and process count (library/planner/sharding.py): the plan is then per GPU
    num_processes: int = 1
    engine: str = ""  # "" (one process, or plain data parallel: DDP / the reducer), "deepspeed" or "fsdp2"
    zero_stage: int = 0  # DeepSpeed's ZeRO stage
    offload_optimizer: str = ""  # DeepSpeed --offload_optimizer_device: "cpu" or "nvme"
    offload_params: str = ""  # DeepSpeed --offload_param_device (ZeRO-3), or "cpu" for FSDP2's fsdp_offload_params
    ddp_gradient_as_bucket_view: bool = False
    # parameter counts of the models that stay on the device when their outputs are not cached (from the files'
    # headers when given, else the real FLUX.1 ones)
    t5xxl_params: int = 4_762_310_656
    clip_l_params: int = 123_060_480
    ae_params: int = 83_819_683

    def __post_init__(self):
        if self.trainer == "controlnet" and not self.controlnet:  # sd-scripts' default ControlNet
            self.controlnet = controlnet_rig.DEFAULT_PLAN

    @property
    def profile(self) -> MemoryProfile:
        """The planned recipe's memory profile."""
        try:
            return PLANNED_RECIPES[self.trainer]
        except KeyError:
            raise ValueError(f"trainer must be one of {', '.join(PLANNED_RECIPES)}, got {self.trainer!r}") from None

    @property
    def weight_dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mixed_precision, torch.float32)

    def describe(self) -> dict:
        out = asdict(self)
        out["params"] = {"depth": self.params.depth, "depth_single_blocks": self.params.depth_single_blocks,
                         "hidden_size": self.params.hidden_size}
        return out


@dataclass
class MemoryPlan:
    settings: PlanSettings
    peak_bytes: int
    parts: dict[str, int]
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"peak_bytes": self.peak_bytes, "peak_gib": round(self.peak_bytes / GIB, 3), "parts": self.parts,
                "settings": self.settings.describe(), "seconds": round(self.seconds, 2), "notes": self.notes,
                "overhead_sources": SOURCES if self.settings.target == "cuda" else {}}


# --- settings from a trainer's arguments --------------------------------------------------------------------------


def _largest_image(args) -> tuple[int, int, int]:
    """(width, height, batch) of the largest batch in pixels: from the --dataset_config datasets (their buckets never
    hold more pixels than the dataset's resolution), else --resolution and --train_batch_size. The dataset file is
    read for these values only, so a plan needs no images."""
    import tomllib

    default_batch = getattr(args, "train_batch_size", None) or 1
    if getattr(args, "dataset_config", None):
        try:
            with open(args.dataset_config, "rb") as f:
                config = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ValueError(f"--dataset_config {args.dataset_config}: cannot read it ({e})") from None
        general = config.get("general", {})
        sizes = []
        for d in config.get("datasets", []) or [{}]:
            res = d.get("resolution", general.get("resolution", getattr(args, "resolution", None)))
            if res is None:
                raise ValueError(f"--dataset_config {args.dataset_config}: a dataset has no resolution")
            w, h = resolve_resolution(res)
            sizes.append((w * h * d.get("batch_size", general.get("batch_size", default_batch)), w, h,
                          d.get("batch_size", general.get("batch_size", default_batch))))
        _, w, h, batch = max(sizes)
        return w, h, batch
    if not getattr(args, "resolution", None):
        raise ValueError("give the image size: --resolution W,H or --dataset_config")
    w, h = resolve_resolution(args.resolution)
    return w, h, default_batch


def settings_from_args(args, trainer: str = "network", target: str = "cuda", environ=None) -> PlanSettings:
    """The PlanSettings of a training command line (already parsed, --config_file applied), in the process
    environment `environ` (default: this process's) that `accelerate launch` gives the trainer: its world size and
    DeepSpeed / FSDP choice (`accelerate_environ` writes the same from an accelerate config file)."""
    model_path = getattr(args, "pretrained_model_name_or_path", None)
    fp8_file, file_quantization = False, ""
    if model_path and not getattr(args, "model_preset", None):  # a preset plans without the file

        info = analyze_checkpoint(model_path)  # header only
        params, model = info.params, model_path
        fp8_file = any(d.startswith("F8") for d in info.dtypes)
        if info.layout == "gguf":  # a quantized file is planned as what it stores
            file_quantization = gguf_base_quantization(model_path)
    else:
        model = getattr(args, "model_preset", None) or "dev"
        presets = {**FLUX_PRESETS, "chroma": CHROMA_PRESETS["chroma"], "chroma-tiny": CHROMA_PRESETS["tiny"]}
        if model not in presets:
            raise ValueError(f"--model_preset {model}: expected one of {', '.join(presets)}")
        params = presets[model]
    width, height, batch = _largest_image(args)
    schnell = not params.guidance_embed
    chroma = isinstance(params, ChromaParams)  # T5 only (no CLIP-L weights), its T5 mask always applied
    swap = getattr(args, "blocks_to_swap", None)
    return PlanSettings(
        trainer=trainer, model=model, params=params, width=width, height=height, batch_size=batch,
        t5_tokens=getattr(args, "t5xxl_max_token_length", None) or (256 if schnell else 512),
        mixed_precision=getattr(args, "mixed_precision", "no") or "no",
        fp8_base=bool(getattr(args, "fp8_base", False)) and PLANNED_RECIPES[trainer].fp8_base, fp8_file=fp8_file,
        base_quantization=getattr(args, "base_quantization", None) or file_quantization,
        gradient_checkpointing=bool(args.gradient_checkpointing or getattr(args, "cpu_offload_checkpointing", False)),
        cpu_offload_checkpointing=bool(getattr(args, "cpu_offload_checkpointing", False)),
        blocks_to_swap=swap if isinstance(swap, int) else 0,
        network_module=getattr(args, "network_module", None) or "networks.lora_flux",
        network_dim=getattr(args, "network_dim", None) or 4,
        network_alpha=getattr(args, "network_alpha", None) or 1.0,
        network_args=list(getattr(args, "network_args", None) or []),
        optimizer_type=resolve_optimizer_type(args), optimizer_args=list(getattr(args, "optimizer_args", None) or []),
        fused_backward_pass=bool(getattr(args, "fused_backward_pass", False)),
        blockwise_fused_optimizers=bool(getattr(args, "blockwise_fused_optimizers", False)),
        full_bf16=bool(getattr(args, "full_bf16", False)),
        cache_text_encoder_outputs=bool(getattr(args, "cache_text_encoder_outputs", False)
                                        or getattr(args, "cache_text_encoder_outputs_to_disk", False)),
        cache_latents=bool(getattr(args, "cache_latents", False) or getattr(args, "cache_latents_to_disk", False)),
        apply_t5_attn_mask=bool(getattr(args, "apply_t5_attn_mask", False)) or chroma, target=target,
        reference_images=1 if trains_kontext(args) else 0,  # Kontext: one reference at the target's size
        controlnet=controlnet_rig.controlnet_plan(args, params) if trainer == "controlnet" else (),
        **_distribution(args, os.environ if environ is None else environ),
        **{f"{name}_params": n for name in ("t5xxl", "clip_l", "ae")
           if (n := _param_count(getattr(args, name, None))) is not None}, **({"clip_l_params": 0} if chroma else {}))


def _distribution(args, environ) -> dict:
    """The engine fields of PlanSettings as the trainer decides them (library/distributed/choice.py)."""
    from library.distributed.choice import engine_kind, world_size

    kind = engine_kind(args, environ)
    out = dict(num_processes=getattr(args, "num_processes", None) or world_size(environ),
               ddp_gradient_as_bucket_view=bool(getattr(args, "ddp_gradient_as_bucket_view", False)))
    device = lambda value: "" if value in (None, "", "none") else str(value).lower()  # noqa: E731
    if kind == "deepspeed":
        if getattr(args, "deepspeed", False):  # sd-scripts' arguments
            stage, opt, par = args.zero_stage, args.offload_optimizer_device, args.offload_param_device
        else:  # an accelerate DeepSpeed config, as accelerate launch exports it
            stage = int(environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 2))
            opt = environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE")
            par = environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE")
        out.update(engine="deepspeed", zero_stage=stage, offload_optimizer=device(opt), offload_params=device(par))
    elif kind == "fsdp2":
        from library.distributed.fsdp2 import fsdp_settings

        out.update(engine="fsdp2", offload_params="cpu" if fsdp_settings(environ).offload_params else "")
    return out


def accelerate_environ(path: str) -> dict[str, str]:
    """The environment `accelerate launch --config_file PATH` gives each process, for what the planner reads
    (world size, DeepSpeed stage and offload, FSDP): read with accelerate's own config loader."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(path)
    kind = str(getattr(config.distributed_type, "value", config.distributed_type))
    env = {"WORLD_SIZE": str(config.num_processes or 1)}
    if kind == "DEEPSPEED":
        ds = config.deepspeed_config or {}
        if ds.get("deepspeed_config_file"):
            raise ValueError(f"{path}: a deepspeed_config_file is not read by the planner; plan with --deepspeed "
                             "--zero_stage N [--offload_optimizer_device cpu]")
        env.update(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE=str(ds.get("zero_stage", 2)),
                   ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE=str(ds.get("offload_optimizer_device", "none")),
                   ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE=str(ds.get("offload_param_device", "none")))
    elif kind == "FSDP":
        fsdp = config.fsdp_config or {}
        if int(fsdp.get("fsdp_version", 1)) != 2:
            raise ValueError(f"{path}: fsdp_version {fsdp.get('fsdp_version', 1)}; the trainers run FSDP2 only "
                             "(fsdp_version: 2)")
        env.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2",
                   FSDP_OFFLOAD_PARAMS=str(fsdp.get("fsdp_offload_params", False)).lower())
    return env


def _param_count(path) -> int | None:
    """Parameters in a model file, from its header (None when there is no such file)."""
    if not path or not os.path.isfile(path):
        return None
    return sum(t.numel for t in read_header(path).tensors.values())
