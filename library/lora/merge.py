"""Merging LoRAs: into FLUX / CLIP-L / T5 checkpoints (streamed tensor by tensor), or into one LoRA (ranks
concatenated, exact; or re-factorised by SVD to a target rank). Used by networks/flux_merge_lora.py.

Every LoRA goes through library/formats/lora_formats.py first, so any supported layout can be merged, and the update
merged is exactly `ratio * alpha / rank * up @ down` (computed in fp32 unless asked otherwise).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from library.formats import fp8_scaled as scaled
from library.formats.gguf_io import is_gguf
from library.formats.streaming_writer import StreamingWriter
from library.models.checkpoint_stream import Readers, plain_entries, transformer_entries
from library.formats.lora_formats import UNET, LoRAWeights
from library.formats.lycoris_weights import LycorisWeights
from library.formats.safetensors_io import read_header

logger = logging.getLogger(__name__)


@dataclass
class WeightedLoRA:
    name: str  # file name, for messages
    modules: dict[str, LoRAWeights | LycorisWeights]
    ratio: float = 1.0


def _shape(w: LoRAWeights | LycorisWeights) -> tuple[int, int]:
    return (w.up.shape[0], w.down.shape[1]) if isinstance(w, LoRAWeights) else w.shape


def lora_name_for_weight(prefix: str, key: str) -> str | None:
    """`double_blocks.0.img_attn.qkv.weight` -> `lora_unet_double_blocks_0_img_attn_qkv` (kohya's rule)."""
    return f"{prefix}_{key[:-len('.weight')].replace('.', '_')}" if key.endswith(".weight") else None


def merge_into_file(src: str | Path, dst: str | Path, loras: Sequence[WeightedLoRA], prefix: str,
                    save_dtype: torch.dtype | None = None, compute_dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", metadata: Mapping[str, str] | None = None,
                    fp8_scaled: str | None = None) -> set[str]:
    """Stream `src` to `dst`, adding every LoRA module of `prefix` (lora_unet: a FLUX transformer in any layout,
    written with BFL names; lora_te1 / lora_te3: a CLIP-L / T5 file, names kept) to its weight. Peak memory is
    about one tensor plus the LoRAs. `save_dtype` None keeps each tensor's stored dtype (a scaled fp8 transformer is
    written scaled again). `fp8_scaled` "tensor" / "channel": the transformer's Linear weights are written as scaled
    fp8 (library/formats/fp8_scaled.py), the other tensors in `save_dtype`. Returns the LoRA module names merged."""
    if prefix == UNET and is_gguf(src):  # a merged file would have to be re-quantized, which is not ours to do
        raise ValueError(f"{src}: is a GGUF (quantized) transformer; a LoRA cannot be merged into it. Merge into "
                         "the bf16/fp16 .safetensors and convert that, or apply the LoRA at inference without merging")
    readers = Readers()
    try:
        if prefix == UNET:
            entries, info = transformer_entries(src, readers)
            src_meta = dict(info.metadata)
        else:
            entries = plain_entries(src, readers)
            src_meta = dict(read_header(src).metadata)  # may describe the model (a tiny config, for one)
        by_key = {e.key: e for e in entries}
        wanted = {n for lora in loras for n in lora.modules if n.startswith(prefix + "_")}
        targets = {lora_name_for_weight(prefix, e.key): e.key for e in entries if e.key.endswith(".weight")}
        missing = sorted(wanted - set(targets))
        if missing:
            raise ValueError(f"{src}: {len(missing)} LoRA module(s) have no weight in this model, e.g. "
                             f"{', '.join(missing[:3])} (a LoRA for another model?)")
        for name in wanted:
            shape = by_key[targets[name]].shape
            for lora in loras:
                w = lora.modules.get(name)
                if w is not None and _shape(w) != tuple(shape):
                    raise ValueError(f"{lora.name}: {name} updates a {_shape(w)[0]}x{_shape(w)[1]} weight, "
                                     f"{src} has {targets[name]} of shape {tuple(shape)}")

        def out_dtype(e) -> torch.dtype:
            return save_dtype if save_dtype is not None and e.dtype.is_floating_point else e.dtype

        modes = _quantised(entries, prefix, save_dtype, fp8_scaled)
        merged: set[str] = set()

        def produce(key: str) -> torch.Tensor:
            e = by_key[key]
            t = e.read()
            name = lora_name_for_weight(prefix, key)
            updates = [(lora, lora.modules[name]) for lora in loras if name in lora.modules]
            if updates:
                w = t.to(device, compute_dtype)
                del t
                for lora, lw in updates:  # LoRA in place: no full-size temporary besides the weight itself
                    if isinstance(lw, LoRAWeights):
                        w.addmm_(lw.up.to(device, compute_dtype), lw.down.to(device, compute_dtype),
                                 alpha=lora.ratio * lw.scale)
                    else:  # LoKr / LoHa / DoRA: the whole updated weight (DoRA rescales W + ΔW)
                        w = lw.updated(w, lora.ratio).to(compute_dtype)
                t = w
                merged.add(name)
            return t if key in modes else t.to("cpu", out_dtype(e))  # quantised from the merged values

        layout = scaled.scaled_layout([(e.key, e.shape, out_dtype(e)) for e in entries], modes)
        meta = dict(src_meta)
        meta.update(metadata or {})
        StreamingWriter(dst, layout, meta).write(scaled.scaled_producer(produce, modes))
    finally:
        readers.close()
    logger.info("%s -> %s: merged %d LoRA module(s)", src, dst, len(merged))
    return merged


def _quantised(entries, prefix: str, save_dtype: torch.dtype | None, fp8_scaled: str | None) -> dict[str, str]:
    """The transformer weights written as scaled fp8 and their scale mode: all Linear weights with `fp8_scaled`,
    else a scaled source's weights when no save dtype is asked (block-wise scales become per-channel)."""
    if prefix != UNET:
        return {}
    if fp8_scaled is not None:
        return {e.key: fp8_scaled for e in entries if scaled.is_quantizable(e.key, e.shape, e.dtype)}
    if save_dtype is None:
        return {e.key: "channel" if e.scale_mode == "block" else e.scale_mode for e in entries if e.scale_mode}
    return {}


# ---------------------------------------------------------------------------------------------------------------
# Several LoRAs -> one LoRA


def concat_loras(loras: Sequence[WeightedLoRA]) -> dict[str, LoRAWeights]:
    """One LoRA whose every module is the sum of the inputs' updates, exactly: ranks are concatenated (down
    stacked, up side by side). When every part has the same ratio * scale c, the tensors are kept as they are and
    alpha = c * total rank; otherwise each part's ratio * scale is folded into its up and alpha = total rank."""
    _plain_updates_only(loras, "cannot be concatenated into a LoRA: give --new_rank to re-factorise it by SVD")
    names = sorted({n for lora in loras for n in lora.modules})
    out = {}
    for name in names:
        parts = [(lora.ratio, lora.modules[name]) for lora in loras if name in lora.modules]
        factors = {ratio * w.scale for ratio, w in parts}
        down = torch.cat([w.down.float() for _, w in parts], dim=0)
        if len(factors) == 1:
            up = torch.cat([w.up.float() for _, w in parts], dim=1)
            alpha = factors.pop() * down.shape[0]
        else:
            up = torch.cat([w.up.float() * (ratio * w.scale) for ratio, w in parts], dim=1)
            alpha = float(down.shape[0])
        if alpha < 0:  # a negative ratio: keep alpha positive, the sign goes into up
            up, alpha = -up, -alpha
        out[name] = LoRAWeights(down, up, alpha)
    return out


def _plain_updates_only(loras: Sequence[WeightedLoRA], why: str, allow_lycoris: bool = False) -> None:
    for lora in loras:
        for name, w in lora.modules.items():
            if isinstance(w, LycorisWeights) and (not allow_lycoris or "dora_scale" in w.tensors):
                kind = "DoRA" if "dora_scale" in w.tensors else w.algo
                raise ValueError(f"{lora.name}: {name} is a {kind} module and {why}")


def svd_factor(delta: torch.Tensor, rank: int, clamp_quantile: float | None = None,
               device: str | torch.device = "cpu") -> tuple[LoRAWeights, float]:
    """Best rank-`rank` LoRA of `delta` (out, in) by SVD: up = U S, down = Vh, alpha = rank (scale 1); entries
    clamped to the `clamp_quantile` quantile of their absolute values (None or 1: no clamping). Returns the LoRA
    and its relative reconstruction error ||delta - up @ down||_F / ||delta||_F (0 for a zero delta)."""
    d = delta.to(device, torch.float32)
    rank = max(1, min(rank, *d.shape))
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    up = u[:, :rank] * s[:rank]
    down = vh[:rank]
    if clamp_quantile is not None and clamp_quantile < 1:
        values = torch.cat([up.flatten(), down.flatten()]).abs()
        if values.numel() > 1 << 24:  # torch.quantile's size limit: estimate from a sample
            values = values[torch.randperm(values.numel(), device=values.device)[: 1 << 24]]
        h = torch.quantile(values, clamp_quantile)
        up, down = up.clamp(-h, h), down.clamp(-h, h)
    norm = torch.linalg.norm(d)
    err = float(torch.linalg.norm(d - up @ down) / norm) if norm > 0 else 0.0
    return LoRAWeights(down.contiguous().cpu(), up.contiguous().cpu(), float(rank)), err


def svd_merge_loras(loras: Sequence[WeightedLoRA], rank: int, clamp_quantile: float | None = None,
                    device: str | torch.device = "cpu") -> tuple[dict[str, LoRAWeights], dict[str, float]]:
    """One LoRA of rank `rank`: each module's summed update re-factorised by SVD. Returns it and the relative
    reconstruction error per module."""
    _plain_updates_only(loras, "needs the base weight (merge it into a model instead)", allow_lycoris=True)
    names = sorted({n for lora in loras for n in lora.modules})
    out, errors = {}, {}
    for name in names:
        delta = sum(lora.ratio * lora.modules[name].delta().to(device) for lora in loras if name in lora.modules)
        out[name], errors[name] = svd_factor(delta, rank, clamp_quantile, device)
    return out, errors


def merged_lora_metadata(loras: Sequence[WeightedLoRA], modules: Mapping[str, LoRAWeights],
                         first_metadata: Mapping[str, str]) -> dict[str, str]:
    """sd-scripts' minimal metadata for a merged LoRA (with our module name, not its `networks.lora`)."""
    ranks = {w.rank for w in modules.values()}
    alphas = {w.alpha for w in modules.values()}
    return {
        "ss_network_module": "networks.lora_flux",
        "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
        "ss_network_alpha": str(alphas.pop()) if len(alphas) == 1 else "Dynamic",
        "ss_base_model_version": first_metadata.get("ss_base_model_version", "flux1"),
        "ss_v2": "False",
        "ss_merged_from": ", ".join(f"{lora.name}:{lora.ratio}" for lora in loras),
    }
