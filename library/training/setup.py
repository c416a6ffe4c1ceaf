"""The setup steps of the training loop: accelerate, datasets, models, caches, sampling, loaders, validation.

Plain functions over `args`, so each reads on its own and every trainer shares them through library/training/loop.py.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import ProjectConfiguration

from library.data.cache_common import model_file_identity
from library.data.config import load_dataset_config, validate_against_training_args
from library.data.datasets import EpochBatchSampler, build_datasets
from library.data.latent_cache import LatentCache
from library.data.text_encoder_cache import TextEncoderCache, text_encoder_identity
from library.flow.generation import FluxModels, Placement
from library.flow.matching import FlowMatchingSettings
from library.flow.prompts import load_prompts
from library.memory.block_swap import split_blocks_to_swap
from library.memory.fp8 import prepare_fp8, prepare_t5xxl_fp8
from library.memory.gguf_linear import check_swappable_gguf, load_gguf_transformer
from library.memory.quantized_base import load_quantized_transformer
from library.models import loading as flux_utils
from library.models.chroma import NoCLIP
from library.models.text_encoding import caption_encoder
from library.models.variants import ModelVariant, resolve_variant
from library.training.assistant import check_assistant_lora
from library.training.errors import TrainingError
from library.training.loss import FluxLossComputer
from library.training.samples import SampleSchedule, precompute_prompt_conditioning, sample_images
from library.training.settings import DatasetKinds, RunSettings
from library.training.trackers import log_sample_images

from library.memory.block_swap import enable_flux_block_swap, move_to_device_except_swap_blocks
from library.memory.checkpointing import enable_gradient_checkpointing

logger = logging.getLogger(__name__)

VALIDATION_SIGMAS = (0.2, 0.4, 0.6, 0.8)  # fixed, so validation losses compare across steps


# Options sd-scripts has that this suite does not implement yet: refused with a reason rather than ignored.
NOT_YET_SUPPORTED = {
    "dataset_class": "custom dataset classes are not supported; use --dataset_config",
    "debug_dataset": "use tools/inspect_dataset.py to look at a dataset",
    "face_crop_aug_range": "face-crop augmentation is not implemented",
}


def check_supported(args) -> None:
    """Refuse options that would otherwise be silently ignored (one message listing all of them)."""
    used = [(name, why) for name, why in NOT_YET_SUPPORTED.items() if getattr(args, name, None)]
    if used:
        raise TrainingError("not supported yet: " + "; ".join(f"--{n}: {why}" for n, why in used))


def weight_dtype(args) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision or "no", torch.float32)


def make_accelerator(args, trackers: list[str] | None = None, engine_kwargs: dict | None = None):
    """The run's Accelerator; `trackers` are the tracker names from trackers.resolve_trackers, `engine_kwargs` the
    distributed engine's (library/distributed/engine.py accelerator_kwargs)."""
    # accelerate keeps its settings in process-wide singletons: clear what an earlier run in this process (a
    # notebook, a test) left, so this run gets its own mixed precision and accumulation settings.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    logging_dir = None
    if args.logging_dir:
        logging_dir = str(Path(args.logging_dir) / f"{args.log_prefix or ''}{time.strftime('%Y%m%d%H%M%S')}")
    return Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                       mixed_precision=args.mixed_precision or "no", log_with=trackers or None,
                       project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir),
                       **(engine_kwargs or {}))


def tracker_config(args, seed: int) -> dict:
    """Arguments worth logging, without secrets or paths of the user's machine (as --log_config intends), with the
    run's seed (drawn when --seed was not given)."""
    if not getattr(args, "log_config", False):
        return {}
    secret = ("token", "api_key", "password")
    return {k: v for k, v in {**vars(args), "seed": seed}.items()
            if isinstance(v, (int, float, str, bool)) and not any(s in k for s in secret)
            and not (isinstance(v, str) and ("/" in v or "\\" in v))}


def build_dataset_groups(args, seed: int, kinds: DatasetKinds):
    """Training and validation DatasetGroups from --dataset_config or the command-line fallbacks, validated
    before any model loads; `kinds`: the subsets the recipe reads and what conditioning images are for."""
    config = load_dataset_config(args, **kinds.config_flags())
    validate_against_training_args(config, args)
    face_crop = [s.where for s in config.all_subsets() if s.face_crop_aug_range is not None]
    if face_crop:  # the schema reads sd-scripts' files; the option is refused, never silently ignored
        raise TrainingError(f"face_crop_aug_range: {NOT_YET_SUPPORTED['face_crop_aug_range']}; remove it from "
                            f"{'; '.join(face_crop)}")
    train, val = build_datasets(config, seed, skip_bad_images=args.skip_bad_images,
                                verify_images=getattr(args, "verify_images", False),
                                max_train_steps=args.max_train_steps, conditioning_as_mask=kinds.conditioning_as_mask,
                                control_latents=kinds.control_latents)
    if len(train) == 0:
        raise ValueError("the datasets hold no images to train on")
    return train, val


@dataclass
class TrainingModels:
    flux: torch.nn.Module
    ae: torch.nn.Module
    clip_l: torch.nn.Module
    t5xxl: torch.nn.Module
    tokenizer: object
    variant: ModelVariant  # which FLUX.1 model, and its defaults (library/models/variants.py)
    weight_dtype: torch.dtype
    compute_dtype: torch.dtype

    @property
    def is_schnell(self) -> bool:
        return self.variant.name == "schnell"

    def free_unneeded(self, args, device, keep_text_encoders: bool = False) -> None:
        """Move the text encoders and AE off the accelerator when their outputs are cached (sampling moves them
        back one at a time); `keep_text_encoders`: they are trained."""
        moved = []
        if args.cache_text_encoder_outputs and not keep_text_encoders:
            moved += [self.clip_l, self.t5xxl]
        if args.cache_latents:
            moved.append(self.ae)
        for m in moved:
            m.to("cpu")
        if moved and torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


def load_models(args, settings: RunSettings, accelerator, flux_dtype: torch.dtype | None = None,
                quantized_base_allowed: bool = True) -> TrainingModels:
    """The four models on the accelerator, frozen. `flux_dtype`: the transformer's dtype when it differs from the
    weight dtype (full fine-tuning keeps float32 weights under autocast); `quantized_base_allowed`: the recipe
    keeps the whole transformer frozen, so a GGUF file may be its base."""
    device, dtype = accelerator.device, weight_dtype(args)
    info = flux_utils.analyze_checkpoint(args.pretrained_model_name_or_path)
    variant = model_variant(args, info)
    warn_unused_guidance(args, variant)
    if getattr(args, "assistant_lora", None):
        check_assistant_lora(args.assistant_lora, variant)
    blocks_to_swap = check_blocks_to_swap(args, settings.blocks_to_swap, info)
    check_fp8_checkpoint(settings.fp8_base, args.pretrained_model_name_or_path, info)
    fp8, quant = settings.fp8_base, settings.quantized_base
    stored = fp8 or quant is not None  # weights that are not in a float type compute in `compute`
    compute = torch.bfloat16 if (stored and dtype == torch.float32 and device.type == "cuda") else dtype
    logger.info("loading %s (%s, %s layout)", args.pretrained_model_name_or_path, variant.name, info.layout)
    if info.layout == "gguf":
        if quant:
            raise TrainingError(f"{args.pretrained_model_name_or_path} is a GGUF file, quantized already: "
                                f"--base_quantization {quant} does not apply to it; leave it out")
        flux = load_gguf_base(args.pretrained_model_name_or_path, info, fp8, quantized_base_allowed, compute,
                              blocks_to_swap)
    elif quant:
        logger.info("quantizing the transformer's block weights to %s while loading (bitsandbytes)", quant)
        flux = load_quantized_transformer(args.pretrained_model_name_or_path, quant, compute, info=info,
                                          quantize_device=device if device.type == "cuda" else "cpu")
    else:
        _, flux = flux_utils.load_flow_model(args.pretrained_model_name_or_path,
                                             None if fp8 else (flux_dtype or dtype), "cpu", info=info)
    if info.fp8_scaled:
        logger.info("%s is scaled fp8: %s", args.pretrained_model_name_or_path,
                    "used as stored (--fp8_base)" if fp8 else f"dequantised to {flux_dtype or dtype} at load")
    if fp8 and info.layout != "gguf":
        scaled = "tensor" if getattr(args, "base_quantization", None) == "fp8_scaled" else None
        prepare_fp8(flux, torch.float8_e4m3fn, compute, fp8_matmul=bool(getattr(args, "fp8_matmul", False)),
                    scaled=scaled)
    t5_fp8 = settings.fp8_t5xxl
    ae = flux_utils.load_ae(args.ae, torch.float32 if getattr(args, "no_half_vae", False) else dtype, "cpu")
    if variant.family == "chroma":  # T5 only: a weightless stand-in gives the zeros the encoding passes along
        if args.clip_l:
            logger.info("Chroma has no CLIP-L input: --clip_l %s is not loaded", args.clip_l)
        clip_l = NoCLIP(dtype)
    else:
        clip_l = flux_utils.load_clip_l(args.clip_l, dtype, "cpu")
    if variant.t5_attn_mask and not args.apply_t5_attn_mask:
        logger.info("%s: T5 padding is masked (--apply_t5_attn_mask is implied for it)", variant.name)
    t5xxl = flux_utils.load_t5xxl(args.t5xxl, None if t5_fp8 else dtype, "cpu")
    if t5_fp8:
        prepare_t5xxl_fp8(t5xxl, torch.float8_e4m3fn, compute)
    for m in (flux, ae, clip_l, t5xxl):
        m.requires_grad_(False).eval()
        if not (m is flux and blocks_to_swap):  # placed by enable_block_swap once the trainable part exists
            m.to(device)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(flux, cpu_offload=bool(getattr(args, "cpu_offload_checkpointing", False)))
    tokenizer = flux_utils.load_tokenizer(args.tokenizer_cache_dir, info.is_schnell,
                                          args.t5xxl_max_token_length or variant.t5_max_length)
    return TrainingModels(flux, ae, clip_l, t5xxl, tokenizer, variant, dtype, compute)


def model_variant(args, info) -> ModelVariant:
    """The variant --model_type names (checked against the file's keys) or the file's own (metadata, keys)."""
    try:
        return resolve_variant(getattr(args, "model_type", None), has_guidance_input=info.params.guidance_embed,
                               family=info.family, in_channels=info.params.in_channels,
                               metadata=info.metadata, source=str(args.pretrained_model_name_or_path))
    except ValueError as e:
        raise TrainingError(str(e)) from None


def apply_t5_attn_mask(args, variant: ModelVariant) -> bool:
    """Whether T5 padding is masked: --apply_t5_attn_mask, or always for a model trained so (Chroma)."""
    return bool(getattr(args, "apply_t5_attn_mask", False)) or variant.t5_attn_mask


def flow_matching_settings(args, variant: ModelVariant) -> FlowMatchingSettings:
    """The loss step's settings; --guidance_scale defaults to the model's recommended training guidance."""
    settings = FlowMatchingSettings.from_args(args)
    if getattr(args, "guidance_scale", None) is None:
        settings = replace(settings, guidance_scale=variant.training_guidance or 0.0)
    return settings


def warn_unused_guidance(args, variant: ModelVariant) -> bool:
    """One warning when --guidance_scale is given for a model without a guidance input (schnell): the transformer
    has no guidance embedder, so the value changes nothing. Returns whether it warned."""
    value = getattr(args, "guidance_scale", None)
    if value is None or variant.has_guidance_input:
        return False
    logger.warning("--guidance_scale %s has no effect: FLUX.1 %s has no guidance input (no guidance embedder), so "
                   "the loss is the same for any value; drop the option", value, variant.name)
    return True


def load_gguf_base(path, info, fp8: bool, allowed: bool, compute: torch.dtype, blocks_to_swap: int):
    """A GGUF transformer as a frozen base: its quantized block weights kept, computed in `compute`."""
    if not allowed:
        raise TrainingError(f"{path} is a GGUF (quantized) file, which can be a LoRA training base only; this "
                            "trainer needs the bf16/fp16 .safetensors")
    if fp8:
        raise TrainingError(f"{path} is a GGUF (quantized) file: --fp8_base does not apply to it; leave it out")
    if blocks_to_swap:
        check_swappable_gguf(info)
    return load_gguf_transformer(path, compute, "cpu", info=info)


def check_blocks_to_swap(args, n: int, info) -> int:
    """The run's --blocks_to_swap count, checked against the checkpoint's blocks."""
    try:
        split_blocks_to_swap(n, info.params.depth, info.params.depth_single_blocks)
    except ValueError as e:
        raise TrainingError(f"{e} ({args.pretrained_model_name_or_path})") from None
    return n


def check_fp8_checkpoint(fp8_base: bool, path, info) -> None:
    """fp8 files are used as stored, which --fp8_base supports for float8_e4m3fn only (reference 8)."""
    other = sorted(d for d in info.dtypes if d.startswith("F8") and d != "F8_E4M3")
    if fp8_base and other:
        raise TrainingError(f"{path} stores {', '.join(other)} weights: --fp8_base "
                            "trains on float8_e4m3fn (F8_E4M3) only; use a bf16/fp16 or e4m3fn checkpoint")


def enable_block_swap(args, n: int, models: TrainingModels, accelerator) -> list:
    """Place the transformer with `n` blocks swapped: blocks through the swappers, the rest on the device. The
    swapped weights are copied host-to-device only when the blocks' own weights are frozen (LoRA); a trainer
    that trains them (full fine-tuning) gets write-back, decided from requires_grad."""
    if not n:
        return []
    flux, device = models.flux, accelerator.device
    write_back = any(p.requires_grad for blocks in (flux.double_blocks, flux.single_blocks)
                     for p in blocks.parameters())
    move_to_device_except_swap_blocks(flux, device)
    swappers = list(enable_flux_block_swap(flux, n, device, "cpu", host_to_device_only=not write_back))
    if write_back and not (getattr(args, "fused_backward_pass", False)
                           or getattr(args, "blockwise_fused_optimizers", False)):
        logger.warning("--blocks_to_swap with trained blocks and an optimizer stepping after backward: the swapped "
                       "blocks' weights and gradients are in CPU memory then, so the optimizer updates them on the "
                       "CPU (slower; bitsandbytes' 8-bit optimizers may not support it). --fused_backward_pass or "
                       "--blockwise_fused_optimizers update each block on the GPU inside the backward")
    logger.info("--blocks_to_swap %d: %.2f GiB of block weights on %s (%.2f GiB in swap slots), the rest in CPU "
                "memory, %s", n, sum(s.buffer_bytes + s.resident_bytes for s in swappers) / 2**30, device,
                sum(s.buffer_bytes for s in swappers) / 2**30,
                "copied back after each use (trained weights)" if write_back else "copied to the device only")
    return swappers


def compile_blocks(args, models: TrainingModels) -> None:
    """--torch_compile: compile each transformer block's forward with --dynamo_backend. Per block, because the 57
    blocks share two graphs (one compile each instead of one huge graph), and the forward only, so that the hooks
    around it (block swapping, gradient checkpointing) stay plain Python."""
    if not getattr(args, "torch_compile", False):
        return
    backend = getattr(args, "dynamo_backend", None) or "inductor"
    flux = models.flux
    for block in (*flux.double_blocks, *flux.single_blocks):
        block.forward = torch.compile(block.forward, backend=backend)
    logger.info("--torch_compile: %d transformer blocks compiled with the %s backend (the first steps are slow "
                "while it compiles)", len(flux.double_blocks) + len(flux.single_blocks), backend)


def prepare_caches(args, accelerator, models: TrainingModels, train_group, val_group) -> None:
    """Encode latents and text-encoder outputs once when asked to, then point the datasets at the caches."""
    groups = [g for g in (train_group, val_group) if g is not None]
    latent_cache = te_cache = None
    split = dict(process_index=accelerator.process_index, num_processes=accelerator.num_processes,
                 wait_for_everyone=accelerator.wait_for_everyone, progress=accelerator.is_local_main_process)
    if args.cache_latents:
        latent_cache = LatentCache(args.cache_latents_to_disk, model_file_identity(args.ae),
                                   skip_cache_check=args.skip_cache_check, batch_size=args.vae_batch_size)
        for group in groups:
            for ds in group.datasets:
                latent_cache.cache(ds.latent_items, models.ae, ds.load_pixels, accelerator.device, models.ae.dtype,
                                   **(split if args.cache_latents_to_disk else {"progress": split["progress"]}))
    if args.cache_text_encoder_outputs:
        batch_size = args.text_encoder_batch_size or train_group.datasets[0].config.batch_size
        te_cache = TextEncoderCache(args.cache_text_encoder_outputs_to_disk,
                                    text_encoder_identity(None if isinstance(models.clip_l, NoCLIP) else args.clip_l,
                                                          args.t5xxl, str(models.weight_dtype)),
                                    skip_cache_check=args.skip_cache_check, batch_size=batch_size,
                                    apply_t5_attn_mask=apply_t5_attn_mask(args, models.variant),
                                    t5_max_length=models.tokenizer.t5_max_length)
        items = [i for g in groups for i in g.items]
        encode = caption_encoder(models.tokenizer, models.clip_l, models.t5xxl,
                                 apply_t5_attn_mask(args, models.variant))
        te_cache.cache(items, encode,
                       **(split if args.cache_text_encoder_outputs_to_disk else {"progress": split["progress"]}))
    for group in groups:
        group.attach(tokenizer=models.tokenizer, latent_cache=latent_cache, te_cache=te_cache)


def make_sampler(group, accelerator):
    return EpochBatchSampler(group, process_index=accelerator.process_index,
                             num_processes=accelerator.num_processes)


def make_loader(args, seed: int, group, sampler):
    workers = min(args.max_data_loader_n_workers, os.cpu_count() or 1)
    # A private generator: creating each epoch's iterator must not draw from the global RNG, or a resumed run
    # (which restores that RNG mid-epoch) would see different noise than an uninterrupted one.
    return torch.utils.data.DataLoader(group, batch_size=None, sampler=sampler, num_workers=workers,
                                       persistent_workers=bool(args.persistent_data_loader_workers and workers),
                                       generator=torch.Generator().manual_seed(seed))


def make_loss_computer(args, models: TrainingModels, accelerator, denoiser, model_inputs, reference_model,
                       train_text_encoders: bool):
    """The loss of the recipe's `denoiser` (the transformer or a wrapper of it) with its `model_inputs(batch)`."""
    return FluxLossComputer(flow_matching_settings(args, models.variant), denoiser, accelerator.device,
                            models.compute_dtype, ae=models.ae, clip_l=models.clip_l, t5xxl=models.t5xxl,
                            apply_t5_attn_mask=apply_t5_attn_mask(args, models.variant), masked_loss=args.masked_loss,
                            train_text_encoders=train_text_encoders, reference_model=reference_model,
                            model_inputs=model_inputs)


@torch.no_grad()
def validation_loss(args, seed: int, val_group, loss_fn, accelerator) -> float:
    """Mean loss over the validation batches at VALIDATION_SIGMAS, with noise drawn from a generator seeded per
    batch (validation_seed, else the run's seed): the same inputs at every evaluation."""
    sampler = EpochBatchSampler(val_group, epoch=1, process_index=accelerator.process_index,
                                num_processes=accelerator.num_processes)
    seed = args.validation_seed if getattr(args, "validation_seed", None) is not None else seed
    total, count = torch.zeros((), device=accelerator.device), 0
    limit = getattr(args, "max_validation_steps", None)
    for n, key in enumerate(sampler):
        if limit is not None and n >= limit:
            break
        batch = val_group[key]
        for sigma in VALIDATION_SIGMAS:
            # seeded by the batch's place across all processes: the value does not depend on the process count
            generator = torch.Generator("cpu").manual_seed(seed * 1000 + n * accelerator.num_processes
                                                           + accelerator.process_index)
            b = len(batch.captions)
            with accelerator.autocast():
                total += loss_fn(batch, sigmas=torch.full((b,), sigma), generator=generator).float()
            count += 1
    total = accelerator.reduce(total, reduction="sum")
    count = accelerator.reduce(torch.tensor(float(count), device=accelerator.device), reduction="sum")
    return (total / count.clamp(min=1)).item()


class TrainingSamples:
    """Preview images during training: the schedule and the models to render with."""

    def __init__(self, args, models: TrainingModels, accelerator, prompts):
        self.args, self.accelerator, self.prompts = args, accelerator, prompts
        self.schedule = SampleSchedule.from_args(args)
        self.models = FluxModels(models.flux, models.ae, models.clip_l, models.t5xxl, models.tokenizer,
                                 models.variant, models.compute_dtype)
        # with cached text-encoder outputs the encoders leave the accelerator: encode every prompt once now
        offload = accelerator.device.type != "cpu"
        self.placement = Placement(accelerator.device, offload)
        self.conditioning = None
        if args.cache_text_encoder_outputs:
            self.conditioning = precompute_prompt_conditioning(self.models, prompts, self.placement,
                                                               apply_t5_attn_mask(args, models.variant))

    def run(self, trainer, epoch: int | None = None, step: int | None = None) -> None:
        """Render the prompts, each with the model the trainer's recipe gives for it (`sampling_model`). The main
        process renders and writes; when the engine shards the weights every process must take part in every
        forward, so all render the same prompts and only the main process writes."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process or trainer.engine.shards_parameters:
            paths = sample_images(self.models, self.prompts, self.args.output_dir, self.args.output_name,
                                  self.placement, epoch=epoch, step=step if epoch is None else None,
                                  apply_t5_attn_mask=apply_t5_attn_mask(self.args, self.models.variant),
                                  cached_conditioning=self.conditioning,
                                  model_for_prompt=trainer.sampling_model, write=acc.is_main_process)
            if acc.is_main_process:
                log_sample_images(acc, paths, [p.prompt for p in self.prompts], trainer.global_step)
        acc.wait_for_everyone()


def prepare_sampling(args, models: TrainingModels, accelerator) -> TrainingSamples | None:
    if not args.sample_prompts:
        return None
    return TrainingSamples(args, models, accelerator, load_prompts(args.sample_prompts))
