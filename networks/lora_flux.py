"""LoRA for FLUX.1 with sd-scripts' `networks.lora_flux` API and file format (reference 9, 18.1).

`--network_module networks.lora_flux` calls `create_network` (or `create_network_from_weights` with
`--dim_from_weights`), then `apply_to`, `prepare_optimizer_params_with_multiple_te_lrs`, `save_weights`, ... exactly
as sd-scripts' trainer does. Files are kohya LoRAs (`lora_unet_*`, `lora_te1_*`, `lora_te3_*` with `lora_down`,
`lora_up`, `alpha`) that ComfyUI, diffusers and sd-scripts load. Fixed against sd-scripts: split_qkv works for double
and single blocks and its files carry the trained strength (see networks/lora_modules.py), alpha is saved as float32,
loading a file updates the scale from its alpha, max-norm regularisation rescales, files are never pickles.
`dora_wd=True` trains DoRA (networks/lora_modules.py) on any base, fp8 and quantized included; its files add lycoris'
`dora_scale` and are read back as LyCORIS files.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from library.formats.lora_formats import LoRAFormatError, load_as_kohya
from library.formats.lycoris_weights import read_lycoris
from library.formats.model_hashes import add_model_hashes
from library.formats.safetensors_io import load_tensors, read_header, save_file_atomic
from library.models.text_encoders import kohya_clip_root
from networks.lora_modules import LoRAInfModule, LoRAModule

logger = logging.getLogger(__name__)

LORA_PREFIX_FLUX = "lora_unet"
LORA_PREFIX_TEXT_ENCODER_CLIP = "lora_te1"
LORA_PREFIX_TEXT_ENCODER_T5 = "lora_te3"

# Conditioning layers that `in_dims` can target, in its order: name substring of the LoRA name.
IN_LAYERS = ("_img_in", "_time_in", "_vector_in", "_guidance_in", "_txt_in")
# Per-type dims in sd-scripts' matching order (first hit wins); "single" needs both substrings.
TYPE_DIM_KEYS = ("img_attn_dim", "txt_attn_dim", "img_mlp_dim", "txt_mlp_dim", "img_mod_dim", "txt_mod_dim",
                 "single_dim", "single_mod_dim")
_TYPE_MATCH = (("img_attn",), ("txt_attn",), ("img_mlp",), ("txt_mlp",), ("img_mod",), ("txt_mod",),
               ("single_blocks", "linear"), ("modulation",))

KNOWN_NETWORK_ARGS = {
    "train_blocks", *TYPE_DIM_KEYS, "in_dims", "train_double_block_indices", "train_single_block_indices",
    "network_reg_dims", "network_reg_lrs", "rank_dropout", "module_dropout", "split_qkv", "train_t5xxl", "verbose",
    "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio", "conv_dim", "conv_alpha",
    "dropout", "dora_wd",
}


# ---------------------------------------------------------------------------------------------------------------
# network_args parsing (values arrive as strings from `--network_args key=value`)


def _arg_float(kwargs: dict, key: str) -> float | None:
    value = kwargs.get(key)
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"network_args {key}={value!r}: expected a number") from None


def _arg_int(kwargs: dict, key: str) -> int | None:
    value = _arg_float(kwargs, key)
    if value is not None and value != int(value):
        raise ValueError(f"network_args {key}={kwargs[key]!r}: expected an integer")
    return None if value is None else int(value)


def _arg_bool(kwargs: dict, key: str) -> bool:
    """sd-scripts only recognises the exact string "True"; "true"/"1" are accepted too, anything else is an error
    (sd-scripts silently reads a misspelt value as False)."""
    value = kwargs.get(key)
    if value is None or isinstance(value, bool):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", "", "none"):
        return False
    raise ValueError(f"network_args {key}={value!r}: expected True or False")


def parse_int_list(text: str, count: int, key: str) -> list[int]:
    """`[a,b,c]` or `a,b,c` with exactly `count` integers."""
    items = [s.strip() for s in str(text).strip().strip("[]").split(",") if s.strip()]
    try:
        values = [int(s) for s in items]
    except ValueError:
        raise ValueError(f"network_args {key}={text!r}: expected {count} integers") from None
    if len(values) != count:
        raise ValueError(f"network_args {key}={text!r}: expected exactly {count} integers, got {len(values)}")
    return values


def parse_block_indices(text: str | None, num_blocks: int, key: str) -> list[bool] | None:
    """`all` (None: every block), `none`/empty (no block), or `0-5,7` (0-based, ranges inclusive)."""
    if text is None or str(text).strip().lower() == "all":
        return None
    selected = [False] * num_blocks
    text = str(text).strip()
    if text.lower() in ("", "none"):
        return selected
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            start, end = int(lo), int(hi) if hi else int(lo)
        except ValueError:
            raise ValueError(f"network_args {key}={text!r}: expected 'all', 'none' or indices like 0-5,7") from None
        if not 0 <= start <= end < num_blocks:
            raise ValueError(f"network_args {key}={text!r}: indices must be within 0..{num_blocks - 1}")
        for i in range(start, end + 1):
            selected[i] = True
    return selected


def parse_regex_values(text: str | None, key: str, cast) -> dict[str, float] | None:
    """`regex=value,regex=value` in the given order (the first matching regex wins)."""
    if text is None or not str(text).strip():
        return None
    out = {}
    for pair in str(text).split(","):
        regex, sep, value = pair.strip().rpartition("=")
        if not sep or not regex:
            raise ValueError(f"network_args {key}: {pair!r} is not regex=value")
        try:
            re.compile(regex)
            out[regex] = cast(value)
        except (re.error, ValueError) as e:
            raise ValueError(f"network_args {key}: {pair!r}: {e}") from None
    return out


def _common_kwargs(kwargs: dict) -> dict:
    """Arguments shared by create_network and create_network_from_weights."""
    unknown = sorted(set(kwargs) - KNOWN_NETWORK_ARGS - {"ggpo_sigma", "ggpo_beta"})
    if unknown:
        logger.warning("network_args not used by networks.lora_flux: %s", ", ".join(unknown))
    if kwargs.get("ggpo_sigma") is not None or kwargs.get("ggpo_beta") is not None:
        raise ValueError("network_args ggpo_sigma/ggpo_beta (GGPO) are not supported by this suite")
    if kwargs.get("conv_dim") is not None or kwargs.get("conv_alpha") is not None:
        logger.info("network_args conv_dim/conv_alpha have no effect: FLUX has no Conv2d layers to train")
    dora = _arg_bool(kwargs, "dora_wd")
    if dora and _arg_bool(kwargs, "split_qkv"):
        raise ValueError("network_args dora_wd=True cannot be combined with split_qkv: DoRA normalises whole rows "
                         "of the fused qkv/linear1 weight")
    return dict(
        dora=dora,
        rank_dropout=_arg_float(kwargs, "rank_dropout"),
        module_dropout=_arg_float(kwargs, "module_dropout"),
        reg_lrs=parse_regex_values(kwargs.get("network_reg_lrs"), "network_reg_lrs", float),
        verbose=_arg_bool(kwargs, "verbose"),
        split_qkv=_arg_bool(kwargs, "split_qkv"),
        loraplus_lr_ratio=_arg_float(kwargs, "loraplus_lr_ratio"),
        loraplus_unet_lr_ratio=_arg_float(kwargs, "loraplus_unet_lr_ratio"),
        loraplus_text_encoder_lr_ratio=_arg_float(kwargs, "loraplus_text_encoder_lr_ratio"),
    )


def _as_list(text_encoders) -> list:
    if text_encoders is None:
        return []
    return list(text_encoders) if isinstance(text_encoders, (list, tuple)) else [text_encoders]


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, ae, text_encoders,
                   flux: nn.Module, neuron_dropout: float | None = None, **kwargs) -> "LoRANetwork":
    """sd-scripts' entry point: a LoRA network over `flux` (and CLIP-L, and T5-XXL with train_t5xxl=True).

    `kwargs` are the `--network_args` strings (reference 9.4). `ae` is unused (kept for the API)."""
    network_dim = 4 if network_dim is None else int(network_dim)
    network_alpha = 1.0 if network_alpha is None else float(network_alpha)
    train_blocks = str(kwargs.get("train_blocks") or "all").strip().lower()
    if train_blocks not in ("all", "single", "double"):
        raise ValueError(f"network_args train_blocks={train_blocks!r}: expected all, single or double")
    type_dims = [_arg_int(kwargs, k) for k in TYPE_DIM_KEYS]
    type_dims = None if all(d is None for d in type_dims) else [network_dim if d is None else d for d in type_dims]
    in_dims = parse_int_list(kwargs["in_dims"], 5, "in_dims") if kwargs.get("in_dims") else None
    double_indices = parse_block_indices(kwargs.get("train_double_block_indices"), len(flux.double_blocks),
                                         "train_double_block_indices")
    single_indices = parse_block_indices(kwargs.get("train_single_block_indices"), len(flux.single_blocks),
                                         "train_single_block_indices")
    network = LoRANetwork(
        text_encoders, flux, multiplier=multiplier, lora_dim=network_dim, alpha=network_alpha,
        dropout=neuron_dropout, train_blocks=train_blocks, train_t5xxl=_arg_bool(kwargs, "train_t5xxl"),
        type_dims=type_dims, in_dims=in_dims, train_double_block_indices=double_indices,
        train_single_block_indices=single_indices,
        reg_dims=parse_regex_values(kwargs.get("network_reg_dims"), "network_reg_dims", int), **_common_kwargs(kwargs))
    return network


def create_network_from_weights(multiplier: float, file: str | os.PathLike | None, ae, text_encoders,
                                flux: nn.Module, weights_sd: dict[str, torch.Tensor] | None = None,
                                for_inference: bool = False, **kwargs) -> tuple["LoRANetwork", dict]:
    """A network shaped like a LoRA file: ranks from `lora_down.weight`, alphas from `.alpha` (missing: alpha =
    rank), T5 LoRA iff the file has `lora_te3` keys, conditioning-layer LoRAs iff present. Weights are NOT loaded
    (call `load_weights` or `merge_to`). With network_args split_qkv=True the fused qkv/linear1 modules are split
    back into parts. `for_inference` uses LoRAInfModule (no dropout). Returns (network, weights_sd)."""
    if weights_sd is None:
        weights_sd = load_lora_file(file)
    modules_dim, modules_alpha = {}, {}
    for key, value in weights_sd.items():
        name, _, leaf = key.partition(".")
        if leaf == "alpha":
            modules_alpha[name] = float(value)
        elif leaf == "lora_down.weight":
            modules_dim[name] = value.shape[0]
    for name, dim in modules_dim.items():
        if not modules_alpha.get(name):
            modules_alpha[name] = float(dim)
    common = _common_kwargs(kwargs)
    common["dora"] = common["dora"] or any(k.endswith(".dora_scale") for k in weights_sd)
    network = LoRANetwork(
        text_encoders, flux, multiplier=multiplier, modules_dim=modules_dim, modules_alpha=modules_alpha,
        dropout=None if for_inference else _arg_float(kwargs, "dropout"),
        module_class=LoRAInfModule if for_inference else LoRAModule,
        train_t5xxl=any(n.startswith(LORA_PREFIX_TEXT_ENCODER_T5) for n in modules_dim), **common)
    return network, weights_sd


def load_lora_file(file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a LoRA .safetensors file as kohya keys: kohya files as they are, every other known layout (diffusers/
    PEFT, ai-toolkit, ComfyUI, BFL names, OneTrainer, ...) converted exactly (library/formats/lora_formats.py). Pickles
    are refused by the reader with a message. DoRA files (kohya LoRA tensors plus lycoris' `dora_scale`, what
    dora_wd=True saves) are read as they are."""
    if any(k.endswith(".dora_scale") for k in read_header(file).keys):
        tensors = load_tensors(file)
        others = sorted({w.algo for w in read_lycoris(tensors).values()} - {"lora"})
        if others:
            raise LoRAFormatError(f"{file}: a LyCORIS {'/'.join(others)} file; networks.lora_flux loads LoRA and "
                                  "DoRA weights only (use --network_module lycoris.kohya)")
        return tensors
    return load_as_kohya(file)


# ---------------------------------------------------------------------------------------------------------------
# Module discovery


def _linears(root: nn.Module, prefix: str, target_classes: Iterable[str] | None) -> Iterator[tuple[str, nn.Module]]:
    """(lora_name, Linear) for every Linear inside modules whose class name is in `target_classes` (every Linear
    of `root` when None), named `<prefix>_<path with . as _>`."""
    targets = set(target_classes) if target_classes is not None else None
    for name, module in root.named_modules():
        if targets is None:
            if isinstance(module, nn.Linear):
                yield f"{prefix}.{name}".replace(".", "_"), module
            continue
        if type(module).__name__ not in targets:
            continue
        for child_name, child in module.named_modules():
            if isinstance(child, nn.Linear):
                yield f"{prefix}.{name}.{child_name}".replace(".", "_"), child


def kohya_named_linears(text_encoders, flux: nn.Module) -> dict[str, nn.Linear]:
    """Every Linear of FLUX, CLIP-L and T5 by its kohya module name (`lora_unet_...`, `lora_te1_...`,
    `lora_te3_...`), for files whose modules are applied by name."""
    clip, t5 = (_as_list(text_encoders) + [None, None])[:2]
    found = dict(_linears(flux, LORA_PREFIX_FLUX, None))
    if clip is not None:
        found.update(_linears(kohya_clip_root(clip), LORA_PREFIX_TEXT_ENCODER_CLIP, None))
    if t5 is not None:
        found.update(_linears(t5, LORA_PREFIX_TEXT_ENCODER_T5, None))
    return found


def _block_index(lora_name: str) -> int:
    return int(lora_name.split("_")[4])  # lora_unet_double_blocks_<i>_...


class LoRANetwork(nn.Module):
    """The LoRA modules over FLUX (and its text encoders), with sd-scripts' network methods."""

    FLUX_TARGET_DOUBLE = ("DoubleStreamBlock",)
    FLUX_TARGET_SINGLE = ("SingleStreamBlock",)
    CLIP_TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")
    T5_TARGETS = ("T5Attention", "T5DenseGatedActDense")
    LORA_PREFIX_FLUX = LORA_PREFIX_FLUX
    LORA_PREFIX_TEXT_ENCODER_CLIP = LORA_PREFIX_TEXT_ENCODER_CLIP
    LORA_PREFIX_TEXT_ENCODER_T5 = LORA_PREFIX_TEXT_ENCODER_T5

    def __init__(self, text_encoders, unet: nn.Module, multiplier: float = 1.0, lora_dim: int = 4,
                 alpha: float = 1.0, dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None, module_class: type = LoRAModule,
                 modules_dim: dict[str, int] | None = None, modules_alpha: dict[str, float] | None = None,
                 train_blocks: str = "all", split_qkv: bool = False, train_t5xxl: bool = False,
                 type_dims: Sequence[int] | None = None, in_dims: Sequence[int] | None = None,
                 train_double_block_indices: Sequence[bool] | None = None,
                 train_single_block_indices: Sequence[bool] | None = None,
                 reg_dims: dict[str, int] | None = None, reg_lrs: dict[str, float] | None = None,
                 verbose: bool = False, dora: bool = False, loraplus_lr_ratio: float | None = None,
                 loraplus_unet_lr_ratio: float | None = None, loraplus_text_encoder_lr_ratio: float | None = None):
        super().__init__()
        self.multiplier = multiplier
        self.lora_dim, self.alpha = lora_dim, alpha
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self.module_class = module_class
        self.modules_dim, self.modules_alpha = modules_dim, modules_alpha
        self.train_blocks, self.split_qkv, self.train_t5xxl = train_blocks, split_qkv, train_t5xxl
        self.dora = dora
        self.type_dims, self.in_dims = type_dims, in_dims
        self.train_double_block_indices = train_double_block_indices
        self.train_single_block_indices = train_single_block_indices
        self.reg_dims, self.reg_lrs = reg_dims, reg_lrs
        self.set_loraplus_lr_ratio(loraplus_lr_ratio, loraplus_unet_lr_ratio, loraplus_text_encoder_lr_ratio)
        self.skipped: list[str] = []

        self.text_encoder_loras: list[LoRAModule] = []
        for index, te in enumerate(_as_list(text_encoders)[:2]):
            if te is None or (index == 1 and not train_t5xxl):
                continue
            if index == 0:
                found = _linears(kohya_clip_root(te), LORA_PREFIX_TEXT_ENCODER_CLIP, self.CLIP_TARGETS)
            else:
                found = _linears(te, LORA_PREFIX_TEXT_ENCODER_T5, self.T5_TARGETS)
            self.text_encoder_loras += self._create_modules(found, is_flux=False)

        targets = {"all": self.FLUX_TARGET_DOUBLE + self.FLUX_TARGET_SINGLE, "double": self.FLUX_TARGET_DOUBLE,
                   "single": self.FLUX_TARGET_SINGLE}[train_blocks]
        found = list(_linears(unet, LORA_PREFIX_FLUX, targets))
        if in_dims is not None or modules_dim is not None:
            # Outside the blocks: in_dims layers, and from a file any layer it names (final_layer from other tools).
            found += [(n, m) for n, m in _linears(unet, LORA_PREFIX_FLUX, None)
                      if "_blocks_" not in n and (any(t in n for t in IN_LAYERS) or n in (modules_dim or {}))]
        self.unet_loras: list[LoRAModule] = self._create_modules(found, is_flux=True)

        names = [lora.lora_name for lora in self.text_encoder_loras + self.unet_loras]
        if len(names) != len(set(names)):
            raise ValueError("duplicate LoRA module names")
        if modules_dim is not None:
            unused = sorted(set(modules_dim) - set(names))
            if unused:
                logger.warning("%d LoRA module(s) of the file match no layer of the models: %s", len(unused),
                               ", ".join(unused[:5]) + (" ..." if len(unused) > 5 else ""))
        logger.info("LoRA for text encoders: %d modules, for FLUX: %d modules", len(self.text_encoder_loras),
                    len(self.unet_loras))
        if verbose:
            for lora in self.text_encoder_loras + self.unet_loras:
                logger.info("  %s: rank %d x %d, alpha %s", lora.lora_name, lora.lora_dim, lora.num_parts,
                            lora.alpha_value)
            for name in self.skipped:
                logger.info("  skipped (rank 0): %s", name)

    # -- construction ---------------------------------------------------------------------------------------------

    def _rank_and_alpha(self, name: str, is_flux: bool) -> tuple[int, float]:
        """(rank, alpha) of one module; rank 0 means no LoRA (reference 9.4's precedence)."""
        if self.modules_dim is not None:
            return self.modules_dim.get(name, 0), self.modules_alpha.get(name, 0.0)
        for regex, dim in (self.reg_dims or {}).items():
            if re.search(regex, name):  # bypasses the type dims and the block filters
                return dim, self.alpha
        if not is_flux:
            return self.lora_dim, self.alpha
        in_layer = next((i for i, t in enumerate(IN_LAYERS) if t in name), None)
        if "_blocks_" not in name and in_layer is not None:
            return (self.in_dims[in_layer] if self.in_dims else 0), self.alpha
        dim = self.lora_dim
        if self.type_dims is not None:
            for type_dim, needles in zip(self.type_dims, _TYPE_MATCH):
                if all(n in name for n in needles):
                    dim = type_dim
                    break
        for kind, selected in (("double_blocks", self.train_double_block_indices),
                               ("single_blocks", self.train_single_block_indices)):
            if selected is not None and name.startswith(f"{LORA_PREFIX_FLUX}_{kind}_") \
                    and not selected[_block_index(name)]:
                dim = 0
        return dim, self.alpha

    def _split_dims(self, name: str, module: nn.Linear) -> list[int] | None:
        if not self.split_qkv:
            return None
        if name.startswith(f"{LORA_PREFIX_FLUX}_double_blocks_") and name.endswith("_attn_qkv"):
            return [module.out_features // 3] * 3
        if name.startswith(f"{LORA_PREFIX_FLUX}_single_blocks_") and name.endswith("_linear1"):
            h = module.in_features  # q, k, v (hidden each), then the MLP input
            return [h, h, h, module.out_features - 3 * h]
        return None

    def _create_modules(self, found: Iterable[tuple[str, nn.Module]], is_flux: bool) -> list[LoRAModule]:
        loras = []
        for name, module in found:
            dim, alpha = self._rank_and_alpha(name, is_flux)
            if not dim:
                self.skipped.append(name)
                continue
            split_dims = self._split_dims(name, module)
            if split_dims is not None and self.modules_dim is not None:
                # A fused file module: parts get rank/k and keep the file's scale alpha/rank.
                k = len(split_dims)
                if dim % k:
                    raise ValueError(f"{name}: rank {dim} in the file cannot be split into {k} parts (split_qkv)")
                dim, alpha = dim // k, (alpha or dim) / k
            loras.append(self.module_class(name, module, self.multiplier, dim, alpha, dropout=self.dropout,
                                           rank_dropout=self.rank_dropout, module_dropout=self.module_dropout,
                                           split_dims=split_dims, dora=self.dora))
        return loras

    # -- sd-scripts' network API ----------------------------------------------------------------------------------

    def set_loraplus_lr_ratio(self, loraplus_lr_ratio=None, loraplus_unet_lr_ratio=None,
                              loraplus_text_encoder_lr_ratio=None) -> None:
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.loraplus_unet_lr_ratio = loraplus_unet_lr_ratio
        self.loraplus_text_encoder_lr_ratio = loraplus_text_encoder_lr_ratio

    def apply_to(self, text_encoders, flux, apply_text_encoder: bool = True, apply_unet: bool = True) -> None:
        """Hook the selected groups into their Linears and register each LoRA as a child named by its lora_name
        (only applied modules are trained and saved)."""
        if not apply_text_encoder:
            self.text_encoder_loras = []
        if not apply_unet:
            self.unet_loras = []
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.apply_to()
            self.add_module(lora.lora_name, lora)
        logger.info("LoRA applied: %d text-encoder modules, %d FLUX modules", len(self.text_encoder_loras),
                    len(self.unet_loras))

    def restore(self) -> None:
        """Unhook every LoRA (the wrapped Linears get their own forward back)."""
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.restore()

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.multiplier = multiplier

    def set_enabled(self, is_enabled: bool) -> None:
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.enabled = is_enabled

    def is_mergeable(self) -> bool:
        return True

    def enable_gradient_checkpointing(self) -> None:
        pass  # the LoRA modules hold no activations of their own worth checkpointing

    def prepare_grad_etc(self, text_encoder, unet) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder, unet) -> None:
        self.train()

    def on_step_start(self) -> None:
        pass

    def get_trainable_params(self):
        return self.parameters()

    def load_weights(self, file: str | os.PathLike):
        """Load a LoRA file non-strictly (like sd-scripts), fused or split layout; the scale follows the file's
        alpha. Returns torch's (missing_keys, unexpected_keys) and logs them."""
        info = self.load_state_dict(load_lora_file(file), strict=False)
        if info.missing_keys:
            logger.warning("%s: %d network tensor(s) not in the file (kept as initialised), e.g. %s", file,
                           len(info.missing_keys), info.missing_keys[0])
        if info.unexpected_keys:
            logger.warning("%s: %d tensor(s) of the file match no applied LoRA module, e.g. %s", file,
                           len(info.unexpected_keys), info.unexpected_keys[0])
        return info

    def save_weights(self, file: str | os.PathLike, dtype: torch.dtype | None, metadata: dict[str, str] | None
                     ) -> None:
        """Write the kohya file (.safetensors only). Weights are cast to `dtype` (None keeps them); alpha stays
        float32 so that a bf16/fp16 save does not round it. With metadata, sshs_model_hash and sshs_legacy_hash
        are added as sd-scripts computes them."""
        if os.path.splitext(str(file))[1].lower() != ".safetensors":
            raise ValueError(f"{file}: LoRA files are written as .safetensors only; pickled formats (.pt, .ckpt) "
                             "can run code when loaded and are never written by this suite")
        state_dict = {}
        for key, value in self.state_dict().items():
            value = value.detach().to("cpu")
            if dtype is not None and value.is_floating_point() and not key.endswith(".alpha"):
                value = value.to(dtype)
            state_dict[key] = value.contiguous()
        if metadata is not None:
            metadata = dict(metadata)
            add_model_hashes(state_dict, metadata)
        save_file_atomic(state_dict, file, metadata)

    @torch.no_grad()
    def merge_to(self, text_encoders, flux, weights_sd: dict[str, torch.Tensor] | None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        """Add the LoRA to the base weights: W += multiplier * alpha/rank * up @ down, in fp32 (the fused file
        layout is exact for split_qkv too). Text-encoder / FLUX parts are merged when `weights_sd` has
        `lora_te1`/`lora_te3` / `lora_unet` keys; None merges this network's own weights."""
        if weights_sd is None:
            for lora in self.text_encoder_loras + self.unet_loras:
                lora.merge_to(None, dtype, device)
            return
        per_module: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in weights_sd.items():
            name, _, leaf = key.partition(".")
            per_module.setdefault(name, {})[leaf] = value
        loras = []
        if any(n.startswith((LORA_PREFIX_TEXT_ENCODER_CLIP, LORA_PREFIX_TEXT_ENCODER_T5)) for n in per_module):
            loras += self.text_encoder_loras
        if any(n.startswith(LORA_PREFIX_FLUX) for n in per_module):
            loras += self.unet_loras
        merged = set()
        for lora in loras:
            sd = per_module.get(lora.lora_name)
            if sd and "lora_down.weight" in sd and "lora_up.weight" in sd:
                lora.merge_to(sd, dtype, device)
                merged.add(lora.lora_name)
        left = sorted(set(per_module) - merged)
        if left:
            logger.warning("%d LoRA module(s) not merged (no such layer): %s", len(left), ", ".join(left[:5]))
        logger.info("merged %d LoRA modules", len(merged))

    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm_value: float, device) -> tuple[int, float, float]:
        """`--scale_weight_norms`: rescale every module whose update norm exceeds `max_norm_value`. Returns
        (keys_scaled, mean norm after scaling, max norm after scaling)."""
        keys_scaled, norms = 0, []
        for lora in self.text_encoder_loras + self.unet_loras:
            scaled, norm = lora.apply_max_norm(max_norm_value, device)
            keys_scaled += int(scaled)
            norms.append(norm)
        if not norms:
            return 0, 0.0, 0.0
        return keys_scaled, sum(norms) / len(norms), max(norms)

    def prepare_optimizer_params_with_multiple_te_lrs(self, text_encoder_lr, unet_lr, default_lr
                                                      ) -> tuple[list[dict], list[str]]:
        """Optimizer parameter groups and their log descriptions (reference 9.5): CLIP-L, T5, then FLUX; within
        each, regex-LR groups (by regex order), the default group, then the LoRA+ group (lora_up params at
        lr * ratio). Groups whose lr is 0 or None are dropped (their parameters are not trained)."""
        if text_encoder_lr is None or (isinstance(text_encoder_lr, (list, tuple)) and len(text_encoder_lr) == 0):
            te_lrs = [default_lr, default_lr]
        elif isinstance(text_encoder_lr, (list, tuple)):
            te_lrs = list(text_encoder_lr) * 2 if len(text_encoder_lr) == 1 else list(text_encoder_lr)
        else:
            te_lrs = [text_encoder_lr, text_encoder_lr]

        all_params, descriptions = [], []
        te_ratio = self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio
        for i, prefix in enumerate((LORA_PREFIX_TEXT_ENCODER_CLIP, LORA_PREFIX_TEXT_ENCODER_T5)):
            loras = [lora for lora in self.text_encoder_loras if lora.lora_name.startswith(prefix)]
            if loras:
                groups, descs = self._param_groups(loras, te_lrs[i], te_ratio)
                all_params += groups
                descriptions += [f"textencoder {i + 1} " + d for d in descs]
        if self.unet_loras:
            groups, descs = self._param_groups(self.unet_loras, unet_lr if unet_lr is not None else default_lr,
                                               self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio)
            all_params += groups
            descriptions += ["unet" + (" " + d if d else "") for d in descs]
        return all_params, descriptions

    def _param_groups(self, loras: list[LoRAModule], lr: float | None, plus_ratio: float | None
                      ) -> tuple[list[dict], list[str]]:
        reg = list((self.reg_lrs or {}).items())
        # key -> {"lora": [...], "plus": [...]}; regex groups first (by regex index), then the default group.
        buckets: dict[int | None, dict[str, list]] = {}
        for lora in loras:
            index = next((i for i, (regex, _) in enumerate(reg) if re.search(regex, lora.lora_name)), None)
            bucket = buckets.setdefault(index, {"lora": [], "plus": []})
            for name, param in lora.named_parameters():
                bucket["plus" if plus_ratio and "lora_up" in name else "lora"].append(param)
        groups, descs = [], []
        for index in sorted(k for k in buckets if k is not None) + ([None] if None in buckets else []):
            base_lr = lr if index is None else reg[index][1]
            label = "" if index is None else f"reg_lr_{index}"
            for kind in ("lora", "plus"):
                params = buckets[index][kind]
                if not params:
                    continue
                group_lr = None if base_lr is None else (base_lr * plus_ratio if kind == "plus" else base_lr)
                if not group_lr:
                    logger.info("no learning rate for %s%s: not trained", label or "default group",
                                " plus" if kind == "plus" else "")
                    continue
                groups.append({"params": params, "lr": group_lr})
                descs.append((label + " plus").strip() if kind == "plus" else label)
        return groups, descs
