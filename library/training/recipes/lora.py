"""LoRA training on the shared loop: what is trained (a `--network_module` network) and how it is saved."""

from __future__ import annotations

import importlib
import logging
import random
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from library.data.captions import tag_frequency
from library.formats.lycoris_weights import is_lycoris
from library.formats.metadata import lora_metadata, modelspec_metadata, update_for_save
from library.formats.safetensors_io import load_tensors, read_header
from library.models.text_encoders import kohya_clip_root
from library.memory.quantized_base import dequantize_for_merge
from library.training.arguments import parse_network_args
from library.training.assistant import AssistantLoRA
from library.training.errors import TrainingError
from library.training.loop import Trainer
from library.training.optimizers import optimizer_metadata_text
from library.training.recipes import command_lines
from library.training.recipes.fill import FillHooks
from library.training.recipes.canny_depth import ControlHooks
from library.training.recipes.flex2 import Flex2Hooks
from library.training.recipes.frozen_controlnet import FrozenControlNetHooks
from library.training.recipes.kontext import KontextHooks
from library.training.settings import MemoryProfile
from library.training.setup import TrainingModels, apply_t5_attn_mask, flow_matching_settings
from networks.lycoris_flux import LycorisFileNetwork

logger = logging.getLogger(__name__)


def datasets_info(group) -> list[dict]:
    """What training_metadata.lora_metadata records about each dataset (ss_datasets, ss_bucket_info, tags)."""
    out = []
    for ds in group.datasets:
        c = ds.config
        subsets = []
        for s in c.subsets:
            items = [i for i in ds.items if i.subset is s]
            subsets.append({**{k: getattr(s, k) for k in (
                "is_reg", "class_tokens", "num_repeats", "color_aug", "flip_aug", "random_crop", "shuffle_caption",
                "keep_tokens", "keep_tokens_separator", "secondary_separator", "enable_wildcard", "caption_prefix",
                "caption_suffix", "resize_interpolation")},
                "image_dir": str(s.image_dir) if s.image_dir else None,
                "metadata_file": str(s.metadata_file) if s.metadata_file else None, "img_count": len(items)})
        tags = {}
        for s in c.subsets:
            folder = Path(str(s.image_dir or s.metadata_file)).name
            tags[folder] = tag_frequency([i.caption for i in ds.items if i.subset is s])
        out.append({
            "is_dreambooth": c.kind == "dreambooth", "batch_size": c.batch_size,
            "num_train_images": sum(i.num_repeats for i in ds.items if not i.is_reg),
            "num_reg_images": sum(i.num_repeats for i in ds.items if i.is_reg), "resolution": c.resolution,
            "enable_bucket": c.enable_bucket, "bucket_no_upscale": c.bucket_no_upscale,
            "min_bucket_reso": c.min_bucket_reso, "max_bucket_reso": c.max_bucket_reso,
            "resize_interpolation": c.resize_interpolation, "tag_frequency": tags, "buckets": ds.bucket_table(),
            "mean_img_ar_error": sum(ds.ar_errors) / len(ds.ar_errors) if ds.ar_errors else None,
            "subsets": subsets})
    return out


class LoRATrainer(FillHooks, Flex2Hooks, KontextHooks, FrozenControlNetHooks, ControlHooks, Trainer):
    tracker_name = "network_train"
    command_line = command_lines.LORA
    memory_profile = MemoryProfile(name="network", trains_transformer=False, fp8_base=True)
    default_network_module = "networks.lora_flux"

    def __init__(self, args, settings=None):
        super().__init__(args, settings)
        self.network_module_name = args.network_module or self.default_network_module
        self.assistant: AssistantLoRA | None = None  # --assistant_lora (schnell)

    def build_trainable(self, models: TrainingModels) -> list[torch.nn.Module]:
        args = self.args
        self.use_control_variant(models)  # Canny/Depth runs (recipes/canny_depth.py)
        try:
            self.network_module = importlib.import_module(self.network_module_name)
        except ImportError as e:
            raise TrainingError(f"--network_module {self.network_module_name}: cannot import it ({e})") from None
        # CLIP-L under its transformers 4.x `text_model` level, so every network module names it as sd-scripts does
        clip = kohya_clip_root(models.clip_l) if models.clip_l is not None else None
        text_encoders = [clip, models.t5xxl]
        self._merge_base_weights(models, text_encoders)
        net_kwargs = parse_network_args(args.network_args)
        self.training_started_at, self.session_id = time.time(), random.randint(0, 2**32 - 1)
        self.net_kwargs = net_kwargs
        if args.dim_from_weights:
            if not args.network_weights:
                raise TrainingError("--dim_from_weights needs --network_weights")
            network, _ = self.network_module.create_network_from_weights(1.0, args.network_weights, models.ae,
                                                                         text_encoders, models.flux, **net_kwargs)
        else:
            network = self.network_module.create_network(1.0, args.network_dim, args.network_alpha, models.ae,
                                                         text_encoders, models.flux,
                                                         neuron_dropout=args.network_dropout, **net_kwargs)
        train_unet = not args.network_train_text_encoder_only
        train_te = not args.network_train_unet_only
        network.apply_to(text_encoders, models.flux, train_te, train_unet)
        self.trains_text_encoder = train_te and any(
            n.startswith(("lora_te1", "lora_te3")) for n, _ in network.named_modules() if "." not in n)
        if self.trains_text_encoder and args.cache_text_encoder_outputs:
            raise TrainingError("text-encoder LoRA training needs live text encoding: drop "
                                "--cache_text_encoder_outputs or add --network_train_unet_only")
        if args.network_weights:  # with --dim_from_weights too: the dims came from it, now the values
            info = network.load_weights(args.network_weights)
            logger.info("loaded --network_weights %s: %s", args.network_weights, info)
        if args.full_bf16 or args.full_fp16:
            network.to(models.weight_dtype)
        network.to(self.accelerator.device)
        if hasattr(network, "prepare_grad_etc"):
            network.prepare_grad_etc(models.clip_l, models.flux)
        self.network = network
        # after the trained network, so it is the outermost hook; not a trainable module, so never saved
        self.assistant = AssistantLoRA(args.assistant_lora, models.flux, self.accelerator.device,
                                       models.weight_dtype) if args.assistant_lora else None
        return [network]

    def _merge_base_weights(self, models: TrainingModels, text_encoders) -> None:
        """--base_weights: LoRAs merged into the frozen base before training."""
        multipliers = self.args.base_weights_multiplier or []
        for i, path in enumerate(self.args.base_weights or []):
            m = multipliers[i] if i < len(multipliers) else 1.0
            if is_lycoris(read_header(path).keys):  # LoKr / LoHa / DoRA: merged by their formulas, whatever module
                LycorisFileNetwork(load_tensors(path), text_encoders, models.flux, m, str(path)).merge_to(
                    self.accelerator.device)
                logger.info("merged --base_weights %s x %s", path, m)
                continue
            net, weights = self.network_module.create_network_from_weights(m, path, models.ae, text_encoders,
                                                                           models.flux, for_inference=True)
            try:
                dequantize_for_merge(getattr(net, "unet_loras", []), self.args.dequantize_merged_layers,
                                     "--dequantize_merged_layers", f"--base_weights {path}")
            except ValueError as e:
                raise TrainingError(str(e)) from None
            net.merge_to(text_encoders, models.flux, weights, models.weight_dtype, self.accelerator.device)
            logger.info("merged --base_weights %s x %s", path, m)

    def param_groups(self):
        args = self.args
        te_lr = args.text_encoder_lr
        if isinstance(te_lr, list) and len(te_lr) == 0:
            te_lr = None
        return optimizer_groups(self.network, te_lr, args.unet_lr, args.learning_rate)

    def sampling_context(self):
        """Sample images show what the saved LoRA gives on plain schnell: the assistant switched off (ai-toolkit)."""
        return self.assistant.switched_off() if self.assistant is not None else nullcontext()

    @contextmanager
    def reference_model(self):
        self.network.set_multiplier(0.0)
        try:
            yield
        finally:
            self.network.set_multiplier(1.0)

    def after_step(self) -> None:
        if self.args.scale_weight_norms:
            keys_scaled, mean_norm, max_norm = self.network.apply_max_norm_regularization(
                self.args.scale_weight_norms, self.accelerator.device)
            self._log({"keys_scaled": keys_scaled, "average_key_norm": mean_norm, "max_key_norm": max_norm})
        super().after_step()

    def training_metadata(self) -> dict[str, str]:
        """ss_* metadata fixed for the run (computed once, at the first save)."""
        if getattr(self, "_metadata", None) is None:
            args, info = self.args, datasets_info(self.train_group)
            self._metadata = lora_metadata(
                args, seed=self.seed, network_module=self.network_module_name, network_dim=args.network_dim,
                network_alpha=args.network_alpha, datasets_info=info,
                num_train_images=sum(d["num_train_images"] for d in info),
                num_reg_images=sum(d["num_reg_images"] for d in info),
                num_validation_images=len(self.val_group.items) if self.val_group is not None else 0,
                num_batches_per_epoch=self.sampler.batches_per_epoch, num_epochs=self.budget.num_epochs,
                max_train_steps=self.budget.max_train_steps,
                optimizer_text=optimizer_metadata_text(self.optimizer_name, self.optimizer_text),
                session_id=self.session_id, training_started_at=self.training_started_at,
                num_processes=self.accelerator.num_processes,
                guidance_scale=flow_matching_settings(args, self.models.variant).guidance_scale,
                family=self.models.variant.family, apply_t5_attn_mask=apply_t5_attn_mask(args, self.models.variant))
            if self.assistant is not None and not args.no_metadata:  # what the LoRA was trained against
                self._metadata["ss_assistant_lora"] = Path(self.assistant.path).name
        return self._metadata

    def state_mismatch(self, key: str, saved: tuple[int, ...], expected: tuple[int, ...]) -> str:
        if key.endswith("lora_down.weight") and saved[0] != expected[0]:  # a LoRA module's rank is its down rows
            return (f"the state was saved with --network_dim {saved[0]} (or a network_args dim for this module), "
                    f"this run has {expected[0]}; resume with the same --network_dim and --network_args")
        return "the state was saved with other network options; resume with the same --network_dim and --network_args"

    def save_weights(self, path: Path, epoch: int, step: int, final: bool) -> None:
        save_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}.get(
            self.args.save_precision)
        resolution = self.train_group.datasets[0].config.resolution
        spec = modelspec_metadata(self.args, architecture=self.models.variant.architecture, lora=True,
                                  resolution=resolution)
        metadata = update_for_save(self.training_metadata(), epoch, step, modelspec=spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.network.save_weights(str(path), save_dtype, metadata)


def optimizer_groups(network, te_lr, unet_lr, learning_rate) -> tuple[list, list[str]]:
    """The network's optimizer parameter groups and their names, through whichever API its module has (the
    trainer and the memory planner)."""
    if hasattr(network, "prepare_optimizer_params_with_multiple_te_lrs"):
        results = network.prepare_optimizer_params_with_multiple_te_lrs(te_lr, unet_lr, learning_rate)
    else:  # an older network API (lycoris.kohya): one text-encoder lr, as sd-scripts hands it over
        if isinstance(te_lr, list):
            te_lr = te_lr[0]
        results = network.prepare_optimizer_params(te_lr, unet_lr, learning_rate)
    groups, descriptions = results if isinstance(results, tuple) else (results, [None] * len(results))
    return groups, [f"{d}" if d else f"group{i}" for i, d in enumerate(descriptions)]
