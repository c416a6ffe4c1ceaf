"""FLUX.1 LoRA file layouts: detect, read into one internal form, write back out (docs/lora_formats.md).

Internal form: `{kohya lora_name: LoRAWeights(down (r, in), up (out, r), alpha)}`, the update being
`alpha / r * up @ down` -- exactly what our trainer saves (fused `qkv` / `linear1`, `lora_unet_*`, `lora_te1_*`,
`lora_te3_*`). Every reader keeps the update exact: a file without alpha means alpha = rank; PEFT's
`lora_adapter_metadata` (lora_alpha, alpha_pattern, rsLoRA) is honoured; split q/k/v(/mlp) parts become one fused
module with a block-diagonal up (parts with different scales get their scale folded into up, alpha = rank).

Layouts read (module names x tensor names, any combination):
  * kohya / sd-scripts: `lora_unet_<BFL path with _>`, `lora_te1_<CLIP path>`, `lora_te3_<T5 path>`
  * BFL names, bare or behind `diffusion_model.` / `model.diffusion_model.` (ComfyUI, BFL control LoRAs)
  * diffusers names behind `transformer.` / `base_model.model.` / none (diffusers, PEFT, ai-toolkit, SimpleTuner),
    `text_encoder.` (CLIP-L) and `text_encoder_2.` (T5)
  * diffusers names with `_`: `lora_transformer_` (OneTrainer), `lycoris_` (SimpleTuner LyCORIS-LoRA)
  * tensors `lora_down`/`lora_up`, `lora_A`/`lora_B`, `lora.down`/`lora.up`, `lora_linear_layer.down/up`, `alpha`
Layouts written: FORMATS below.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from typing import Mapping

import torch

from library.formats.diffusers_keys import DOUBLE_BLOCK_MAP, GLOBAL_MAP, SINGLE_BLOCK_MAP, SWAPPED_HALVES
from library.formats.model_hashes import add_model_hashes
from library.formats.safetensors_io import load_tensors, read_header, save_file_atomic

logger = logging.getLogger(__name__)

FORMATS = ("sd-scripts", "ai-toolkit", "diffusers", "comfyui")
FORMAT_ALIASES = {"kohya": "sd-scripts", "sd_scripts": "sd-scripts", "aitoolkit": "ai-toolkit", "peft": "diffusers",
                  "comfy": "comfyui"}
MLP_RATIO = 4  # every FLUX.1 model; only needed to size a single block's MLP rows when a file has no proj_mlp LoRA

UNET, CLIP, T5 = "lora_unet", "lora_te1", "lora_te3"
_TENSOR_SUFFIXES = {
    ".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora.down.weight": "down", ".lora.up.weight": "up", ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up", ".alpha": "alpha",
}
_COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_DIFFUSERS_PREFIXES = ("transformer.", "base_model.model.", "unet.")
_CLIP_PREFIXES = ("text_encoder.", "text_encoders.clip_l.transformer.", "te1.")
_T5_PREFIXES = ("text_encoder_2.", "text_encoders.t5xxl.transformer.", "te2.")
_CLIP_PATH = re.compile(r"text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])")
_T5_PATH = re.compile(r"encoder\.block\.\d+\.layer\.\d+\.(SelfAttention\.(q|k|v|o)|DenseReluDense\.(wi_0|wi_1|wo|wi))")


class LoRAFormatError(ValueError):
    """A LoRA file whose layout or contents cannot be read exactly (message meant for the user)."""


@dataclass
class LoRAWeights:
    down: torch.Tensor  # (rank, in)
    up: torch.Tensor  # (out, rank)
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight update alpha / rank * up @ down."""
        return self.scale * (self.up.to(dtype) @ self.down.to(dtype))


# ---------------------------------------------------------------------------------------------------------------
# Module name tables (kohya name <-> BFL path <-> diffusers parts)


def _under(path: str) -> str:
    return path.replace(".", "_")


_DOUBLE_U = {_under(k): k for k in DOUBLE_BLOCK_MAP}
_SINGLE_U = {_under(k): k for k in SINGLE_BLOCK_MAP}
_GLOBAL_U = {_under(k): k for k in GLOBAL_MAP}
# diffusers part -> (BFL module, part index, number of parts)
_DOUBLE_PARTS = {d: (b, i, len(ds)) for b, ds in DOUBLE_BLOCK_MAP.items() for i, d in enumerate(ds)}
_SINGLE_PARTS = {d: (b, i, len(ds)) for b, ds in SINGLE_BLOCK_MAP.items() for i, d in enumerate(ds)}
_GLOBAL_PARTS = {d: b for b, d in GLOBAL_MAP.items()}
_DOUBLE_PARTS_U = {_under(d): d for d in _DOUBLE_PARTS}
_SINGLE_PARTS_U = {_under(d): d for d in _SINGLE_PARTS}
_GLOBAL_PARTS_U = {_under(d): d for d in _GLOBAL_PARTS}


def kohya_to_bfl(name: str) -> str | None:
    """`lora_unet_double_blocks_0_img_attn_qkv` -> `double_blocks.0.img_attn.qkv` (None if not a FLUX module)."""
    tail = name[len(UNET) + 1:] if name.startswith(UNET + "_") else None
    if tail is None:
        return None
    if m := re.fullmatch(r"double_blocks_(\d+)_(\w+)", tail):
        return f"double_blocks.{m.group(1)}.{_DOUBLE_U[m.group(2)]}" if m.group(2) in _DOUBLE_U else None
    if m := re.fullmatch(r"single_blocks_(\d+)_(\w+)", tail):
        return f"single_blocks.{m.group(1)}.{_SINGLE_U[m.group(2)]}" if m.group(2) in _SINGLE_U else None
    return _GLOBAL_U.get(tail)


def bfl_to_diffusers_parts(path: str) -> tuple[str, ...]:
    """`double_blocks.0.img_attn.qkv` -> the diffusers Linears it is fused from, in row order."""
    if m := re.fullmatch(r"double_blocks\.(\d+)\.(.+)", path):
        return tuple(f"transformer_blocks.{m.group(1)}.{d}" for d in DOUBLE_BLOCK_MAP[m.group(2)])
    if m := re.fullmatch(r"single_blocks\.(\d+)\.(.+)", path):
        return tuple(f"single_transformer_blocks.{m.group(1)}.{d}" for d in SINGLE_BLOCK_MAP[m.group(2)])
    return (GLOBAL_MAP[path],)


def _bfl_module(path: str) -> str | None:
    """A dotted BFL module path, validated (None if it is not one)."""
    if m := re.fullmatch(r"(double|single)_blocks\.(\d+)\.(.+)", path):
        table = DOUBLE_BLOCK_MAP if m.group(1) == "double" else SINGLE_BLOCK_MAP
        return path if m.group(3) in table else None
    return path if path in GLOBAL_MAP else None


def _diffusers_part(path: str, underscored: bool = False) -> tuple[str, int, int] | None:
    """A diffusers module path (dotted, or with `_` for OneTrainer/LyCORIS names) -> (BFL path, part, parts)."""
    sep = "_" if underscored else r"\."
    doubles, singles, globals_ = ((_DOUBLE_PARTS_U, _SINGLE_PARTS_U, _GLOBAL_PARTS_U) if underscored
                                  else ({d: d for d in _DOUBLE_PARTS}, {d: d for d in _SINGLE_PARTS},
                                        {d: d for d in _GLOBAL_PARTS}))
    if m := re.fullmatch(rf"single_transformer_blocks{sep}(\d+){sep}(.+)", path):
        if (part := singles.get(m.group(2))) is not None:
            bfl, i, n = _SINGLE_PARTS[part]
            return f"single_blocks.{m.group(1)}.{bfl}", i, n
        return None
    if m := re.fullmatch(rf"transformer_blocks{sep}(\d+){sep}(.+)", path):
        if (part := doubles.get(m.group(2))) is not None:
            bfl, i, n = _DOUBLE_PARTS[part]
            return f"double_blocks.{m.group(1)}.{bfl}", i, n
        return None
    if (part := globals_.get(path)) is not None:
        return _GLOBAL_PARTS[part], 0, 1
    return None


def _te_kohya(prefix: str, path: str, pattern: re.Pattern) -> str | None:
    return f"{prefix}_{_under(path)}" if pattern.fullmatch(path) else None


def kohya_to_te_path(name: str) -> tuple[str, str] | None:
    """`lora_te1_text_model_encoder_layers_0_self_attn_q_proj` -> ("clip_l", dotted HF path); T5 likewise."""
    if name.startswith(CLIP + "_"):
        tail = name[len(CLIP) + 1:]
        m = re.fullmatch(r"text_model_encoder_layers_(\d+)_(self_attn|mlp)_(\w+)", tail)
        path = f"text_model.encoder.layers.{m.group(1)}.{m.group(2)}.{m.group(3)}" if m else ""
        return ("clip_l", path) if _CLIP_PATH.fullmatch(path) else None
    if name.startswith(T5 + "_"):
        tail = name[len(T5) + 1:]
        m = re.fullmatch(r"encoder_block_(\d+)_layer_(\d+)_(SelfAttention|DenseReluDense)_(\w+)", tail)
        path = f"encoder.block.{m.group(1)}.layer.{m.group(2)}.{m.group(3)}.{m.group(4)}" if m else ""
        return ("t5xxl", path) if _T5_PATH.fullmatch(path) else None
    return None


# ---------------------------------------------------------------------------------------------------------------
# Detection


def _split_tensor_key(key: str) -> tuple[str, str] | None:
    for suffix, role in _TENSOR_SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _sample(keys, n: int = 6) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} keys)" if len(keys) > n else "")


def _locate(module: str) -> tuple[str, str, int, int, bool]:
    """A file's module name -> (kohya target name, layout, part index, parts, named like diffusers).
    Raises LoRAFormatError for a name that is no FLUX.1 / CLIP-L / T5 module."""
    if module.startswith("lora_te2_"):  # OneTrainer's name for FLUX's T5
        module = T5 + module[len("lora_te2"):]
    if module.startswith((CLIP + "_", T5 + "_")):
        if kohya_to_te_path(module) is None:
            raise LoRAFormatError(f"unknown text-encoder module {module!r}")
        return module, "sd-scripts", 0, 1, False
    if module.startswith(UNET + "_"):
        if kohya_to_bfl(module) is not None:
            return module, "sd-scripts", 0, 1, False
        found = _diffusers_part(module[len(UNET) + 1:], underscored=True)  # some files: lora_unet_ + diffusers
        if found is None:
            raise LoRAFormatError(f"unknown FLUX module {module!r}")
        bfl, i, n = found
        return f"{UNET}_{_under(bfl)}", "sd-scripts", i, n, True
    for prefix, layout in (("lora_transformer_", "onetrainer"), ("lycoris_", "lycoris")):
        if module.startswith(prefix):
            found = _diffusers_part(module[len(prefix):], underscored=True)
            if found is None:
                raise LoRAFormatError(f"unknown FLUX module {module!r}")
            bfl, i, n = found
            return f"{UNET}_{_under(bfl)}", layout, i, n, True
    for prefixes, kohya, pattern in ((_CLIP_PREFIXES, CLIP, _CLIP_PATH), (_T5_PREFIXES, T5, _T5_PATH)):
        for p in prefixes:
            if module.startswith(p):
                name = _te_kohya(kohya, module[len(p):], pattern)
                if name is None:
                    raise LoRAFormatError(f"unknown text-encoder module {module!r}")
                return name, "diffusers", 0, 1, False
    path, layout = module, "bfl"
    for p in _COMFY_PREFIXES + _DIFFUSERS_PREFIXES:
        if module.startswith(p):
            path, layout = module[len(p):], "comfyui" if p in _COMFY_PREFIXES else "diffusers"
            break
    if (bfl := _bfl_module(path)) is not None:
        return f"{UNET}_{_under(bfl)}", layout, 0, 1, False
    if (found := _diffusers_part(path)) is not None:
        bfl, i, n = found
        return f"{UNET}_{_under(bfl)}", "diffusers" if layout == "bfl" else layout, i, n, True
    raise LoRAFormatError(f"unknown FLUX module {module!r}")


def detect_format(keys) -> str:
    """The layout of a LoRA state dict: sd-scripts, comfyui, bfl, diffusers, onetrainer or lycoris (the first
    FLUX-transformer layout found; text-encoder names do not decide it). Raises LoRAFormatError if none."""
    layouts, te_layouts = [], []
    for key in keys:
        split = _split_tensor_key(key)
        if split is None:
            continue
        try:
            target, layout, *_ = _locate(split[0])
        except LoRAFormatError:
            continue
        (layouts if target.startswith(UNET) else te_layouts).append(layout)
    layouts = layouts or te_layouts
    if not layouts:
        raise LoRAFormatError(f"not a FLUX.1 LoRA in any known layout; sample keys: {_sample(list(keys))}")
    for layout in ("sd-scripts", "comfyui", "bfl", "onetrainer", "lycoris", "diffusers"):
        if layout in layouts:
            return layout
    return layouts[0]


# ---------------------------------------------------------------------------------------------------------------
# Reading


def _peft_alphas(metadata: Mapping[str, str] | None) -> dict[str, dict]:
    """PEFT/diffusers `lora_adapter_metadata` -> {component prefix: {lora_alpha, alpha_pattern, use_rslora}}."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        raise LoRAFormatError("metadata lora_adapter_metadata is not JSON") from None
    out: dict[str, dict] = {}
    for key, value in data.items():
        component, _, field = key.rpartition(".")
        if field in ("lora_alpha", "alpha_pattern", "use_rslora", "use_dora"):
            out.setdefault(component, {})[field] = value
    return out


def _peft_alpha(module: str, rank: int, peft: dict[str, dict]) -> float | None:
    """alpha in kohya terms (alpha / rank = PEFT's scaling) for a module named with its component prefix."""
    for component, conf in peft.items():
        if not module.startswith(component + "."):
            continue
        if conf.get("use_dora"):
            raise LoRAFormatError("DoRA adapters (use_dora) are not LoRAs this suite can apply")
        name = module[len(component) + 1:]
        alpha = conf.get("lora_alpha")
        for pattern, value in (conf.get("alpha_pattern") or {}).items():
            pattern = pattern.lstrip("^")
            if name == pattern or name.endswith("." + pattern):
                alpha = value
                break
        if alpha is None:
            return None
        alpha = float(alpha)
        return alpha * math.sqrt(rank) if conf.get("use_rslora") else alpha  # rsLoRA: scale alpha / sqrt(r)
    return None


def read_lora(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
              ) -> tuple[dict[str, LoRAWeights], str]:
    """Any supported layout -> ({kohya lora_name: LoRAWeights}, detected layout). Exact: no update changes."""
    layout = detect_format(state_dict)
    peft = _peft_alphas(metadata)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state_dict.items():
        split = _split_tensor_key(key)
        if split is None:
            unknown.append(key)
            continue
        modules.setdefault(split[0], {})[split[1]] = value
    if unknown:
        raise LoRAFormatError(f"{len(unknown)} tensor(s) that are not plain LoRA weights (DoRA, LoKr, LoHa, biases "
                              f"or full weights are not supported): {_sample(unknown)}")
    # kohya target -> {part index: (down, up, alpha, name)}
    parts: dict[str, dict[int, tuple]] = {}
    counts: dict[str, int] = {}
    bad: list[str] = []
    for module, tensors in modules.items():
        if "down" not in tensors or "up" not in tensors:
            raise LoRAFormatError(f"module {module!r} has {sorted(tensors)} but needs both down (A) and up (B)")
        try:
            target, _, i, n, diffusers_name = _locate(module)
        except LoRAFormatError as e:
            bad.append(str(e))
            continue
        down, up = tensors["down"], tensors["up"]
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
            raise LoRAFormatError(f"module {module!r}: down {tuple(down.shape)} and up {tuple(up.shape)} are not "
                                  "a linear LoRA pair (rank, in) / (out, rank)")
        rank = down.shape[0]
        if "alpha" in tensors:
            alpha = float(tensors["alpha"])
        else:
            alpha = _peft_alpha(module, rank, peft)
        alpha = alpha or float(rank)  # kohya: missing or 0 alpha means alpha = rank
        if target in counts and counts[target] != n:
            raise LoRAFormatError(f"{target}: the file has it both fused and as split q/k/v parts")
        counts[target] = n
        if i in parts.setdefault(target, {}):
            raise LoRAFormatError(f"{target}: the file has it twice ({parts[target][i][3]!r} and {module!r})")
        if diffusers_name and kohya_to_bfl(target) in SWAPPED_HALVES:
            up = _swap_rows(up)  # diffusers' norm_out.linear stores scale then shift; BFL shift then scale
        parts[target][i] = (down, up, alpha, module)
    if bad:
        raise LoRAFormatError(f"{len(bad)} module(s) that are not FLUX.1 / CLIP-L / T5 layers (a LoRA for another "
                              f"model?): " + "; ".join(bad[:4]) + (" ..." if len(bad) > 4 else ""))
    out = {}
    for target, found in parts.items():
        n = counts[target]
        if n == 1:
            down, up, alpha, _ = found[0]
            out[target] = LoRAWeights(down, up, alpha)
        else:
            out[target] = _fuse(target, found, n)
    return out, layout


def _swap_rows(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat((b, a), dim=0)


def _fuse(target: str, found: dict[int, tuple], n: int) -> LoRAWeights:
    """Split q/k/v(/mlp) parts -> one fused module: downs stacked, ups block-diagonal; missing parts add zero rows.
    One shared scale keeps the tensors bit-exact; different scales are folded into each part's up (alpha = rank)."""
    any_down = next(iter(found.values()))[0]
    hidden = any_down.shape[1]
    rows = [hidden] * n if n == 3 else [hidden] * 3 + [MLP_RATIO * hidden]
    if n == 3 and found:  # double-block qkv: every part is as wide as the others
        rows = [next(iter(found.values()))[1].shape[0]] * 3
    for i, (down, up, _, name) in found.items():
        if down.shape[1] != hidden:
            raise LoRAFormatError(f"{target}: part {name!r} has input width {down.shape[1]}, the others {hidden}")
        rows[i] = up.shape[0]
    dtype = any_down.dtype
    scales = {a / d.shape[0] for d, _, a, _ in found.values()}
    downs, ups = [], []
    for i in range(n):
        if i in found:
            down, up, alpha, _ = found[i]
            if len(scales) > 1:
                up = (up.float() * (alpha / down.shape[0])).to(up.dtype)
            downs.append(down)
            ups.append(up)
        else:
            downs.append(torch.zeros(0, hidden, dtype=dtype))
            ups.append(torch.zeros(rows[i], 0, dtype=dtype))
    down = torch.cat(downs, dim=0)
    up = torch.block_diag(*[u.to(dtype) for u in ups])
    alpha = scales.pop() * down.shape[0] if len(scales) == 1 else float(down.shape[0])
    return LoRAWeights(down, up, alpha)


# ---------------------------------------------------------------------------------------------------------------
# Writing


def _split(target: str, w: LoRAWeights, n: int) -> list[tuple[int, LoRAWeights]]:
    """A fused module -> its q/k/v(/mlp) parts, each with the same update rows. When the up matrix is
    block-structured (each rank column feeds one part only, as a split_qkv LoRA or a fused diffusers file) the
    parts get only their own columns (parts with none are left out); otherwise every part keeps the whole down."""
    hidden = w.down.shape[1]
    out_rows = w.up.shape[0]
    if n == 3:
        rows = [out_rows // 3] * 3
    else:
        rows = [hidden] * 3 + [out_rows - 3 * hidden]
    if sum(rows) != out_rows or min(rows) <= 0:
        raise LoRAFormatError(f"{target}: {out_rows} output rows cannot be split into {n} parts")
    ups = w.up.split(rows, dim=0)
    used = [(u != 0).any(dim=0) for u in ups]
    # (an all-zero up, a fresh LoRA, keeps every part whole: its down still matters for further training)
    disjoint = any(u.any() for u in used) and all(not (used[a] & used[b]).any()
                                                  for a in range(n) for b in range(a + 1, n))
    parts = []
    for i, u in enumerate(ups):
        if disjoint:
            cols = used[i].nonzero().flatten()
            if cols.numel() == 0:
                continue
            parts.append((i, LoRAWeights(w.down[cols].clone(), u[:, cols].clone(), w.scale * cols.numel())))
        else:
            parts.append((i, LoRAWeights(w.down.clone(), u.clone(), w.alpha)))
    return parts


def _folded(w: LoRAWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with the scale in B: PEFT layouts without alpha apply B @ A."""
    if w.scale == 1.0:
        return w.down, w.up
    return w.down, (w.up.float() * w.scale).to(w.up.dtype)


def write_lora(modules: Mapping[str, LoRAWeights], fmt: str) -> dict[str, torch.Tensor]:
    """Internal form -> a state dict in `fmt` (one of FORMATS)."""
    fmt = normalize_format(fmt)
    out: dict[str, torch.Tensor] = {}
    dropped = []
    for name, w in modules.items():
        alpha = torch.tensor(float(w.alpha), dtype=torch.float32)
        if fmt == "sd-scripts" or (fmt == "comfyui" and not name.startswith(UNET + "_")):
            out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"], out[f"{name}.alpha"] = w.down, w.up, alpha
            continue
        if fmt == "comfyui":
            key = "diffusion_model." + kohya_to_bfl(name)
            out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"], out[f"{key}.alpha"] = w.down, w.up, alpha
            continue
        if not name.startswith(UNET + "_"):
            if fmt == "ai-toolkit":
                dropped.append(name)
                continue
            component, path = kohya_to_te_path(name)
            prefix = "text_encoder" if component == "clip_l" else "text_encoder_2"
            a, b = _folded(w)
            out[f"{prefix}.{path}.lora_A.weight"], out[f"{prefix}.{path}.lora_B.weight"] = a, b
            continue
        bfl = kohya_to_bfl(name)
        targets = bfl_to_diffusers_parts(bfl)
        pieces = [(0, w)] if len(targets) == 1 else _split(name, w, len(targets))
        for i, piece in pieces:
            a, b = _folded(piece)
            if bfl in SWAPPED_HALVES:
                b = _swap_rows(b)
            out[f"transformer.{targets[i]}.lora_A.weight"] = a
            out[f"transformer.{targets[i]}.lora_B.weight"] = b
    if dropped:
        logger.warning("ai-toolkit files hold transformer LoRA only: %d text-encoder module(s) left out (%s); "
                       "use --dst diffusers or sd-scripts to keep them", len(dropped), _sample(dropped, 3))
    return {k: v.contiguous() for k, v in out.items()}


def normalize_format(fmt: str) -> str:
    name = FORMAT_ALIASES.get(fmt.lower(), fmt.lower())
    if name not in FORMATS:
        raise ValueError(f"unknown LoRA format {fmt!r}: expected one of {', '.join(FORMATS)}")
    return name


def to_kohya_state_dict(modules: Mapping[str, LoRAWeights]) -> dict[str, torch.Tensor]:
    return write_lora(modules, "sd-scripts")


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], fmt: str,
                       metadata: Mapping[str, str] | None = None) -> dict[str, torch.Tensor]:
    modules, _ = read_lora(state_dict, metadata)
    return write_lora(modules, fmt)


# ---------------------------------------------------------------------------------------------------------------
# Files


def load_lora(path) -> tuple[dict[str, LoRAWeights], dict[str, str], str]:
    """Read a LoRA file of any supported layout: (modules, metadata, detected layout). Errors name the file."""
    header = read_header(path)
    try:
        modules, layout = read_lora(load_tensors(path), header.metadata)
    except LoRAFormatError as e:
        raise LoRAFormatError(f"{path}: {e}") from None
    return modules, header.metadata, layout


def load_as_kohya(path) -> dict[str, torch.Tensor]:
    """A LoRA file as a kohya state dict (kohya files unchanged, other layouts converted exactly)."""
    header = read_header(path)
    tensors = load_tensors(path)
    try:
        if all(_is_kohya_key(k) for k in tensors) and tensors:
            return tensors
        modules, layout = read_lora(tensors, header.metadata)
    except LoRAFormatError as e:
        raise LoRAFormatError(f"{path}: {e}") from None
    logger.info("%s: %s LoRA layout, converted to kohya names (%d modules)", path, layout, len(modules))
    return to_kohya_state_dict(modules)


def _is_kohya_key(key: str) -> bool:
    """A key our networks load as it is: canonical kohya module name and tensor name."""
    split = _split_tensor_key(key)
    if split is None or split[1] == "down" and not key.endswith(".lora_down.weight") \
            or split[1] == "up" and not key.endswith(".lora_up.weight"):
        return False
    return kohya_to_bfl(split[0]) is not None or kohya_to_te_path(split[0]) is not None


def carried_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """Source metadata for a converted file: all of it, minus PEFT's adapter config (its alphas no longer apply:
    the converted file states its scale in its own tensors)."""
    return {k: v for k, v in metadata.items() if k != "lora_adapter_metadata"}


def save_lora(path, modules: Mapping[str, LoRAWeights], fmt: str, metadata: Mapping[str, str] | None = None,
              dtype: torch.dtype | None = None, hashes: bool = False) -> None:
    """Write `modules` as a .safetensors file in `fmt`, atomically. Weights are cast to `dtype` (None keeps them);
    alphas stay float32. sd-scripts' model hashes are (re)computed when `hashes` or the metadata has them."""
    sd = write_lora(modules, fmt)
    if dtype is not None:
        sd = {k: v if k.endswith(".alpha") else v.to(dtype) for k, v in sd.items()}
    metadata = carried_metadata(metadata or {})
    if hashes or "sshs_model_hash" in metadata:
        add_model_hashes(sd, metadata)
    save_file_atomic(sd, path, metadata)
