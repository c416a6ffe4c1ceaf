"""Finding, recognising and loading FLUX.1 transformer checkpoints.

Accepted: BFL single files (flux1-dev.safetensors), the same with a ComfyUI `model.diffusion_model.` prefix (also
inside all-in-one checkpoints), diffusers-layout folders, single files or shards, and fp8 files (kept as stored
when no dtype is asked), scaled fp8 included (library/formats/fp8_scaled.py: dequantised when a dtype is asked, else
kept in fp8 with each scale on its Linear as a `scale_weight` buffer), and GGUF files (BFL names, ComfyUI-GGUF's
conversions; loaded dequantized here, kept quantized by library/memory/gguf_linear.py). Everything is decided from
the headers before a tensor is read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from library.formats import fp8_scaled
from library.formats.diffusers_keys import UnknownKeysError, diffusers_shapes_to_bfl, diffusers_to_bfl
from library.formats.gguf_io import GGUFTensorReader, is_gguf, read_gguf_header
from library.models.chroma import APPROXIMATOR_KEY, Chroma, ChromaParams
from library.models.transformer import Flux, FluxParams, default_axes_dim
from library.formats.safetensors_io import (
                                            TRANSFORMER_PREFIXES,
                                            ModelFileError,
                                            SafetensorsHeader,
                                            TensorReader,
                                            assign_weights,
                                            detect_kind,
                                            expect_kind,
                                            load_tensors,
                                            read_header,
                                            sample_keys,
                                            )

ROLE = "the FLUX transformer (--ckpt_path)"
_SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.safetensors$")


@dataclass
class FluxCheckpointInfo:
    path: Path
    layout: str  # "bfl", "diffusers" or "gguf" (BFL names)
    params: FluxParams
    shapes: dict[str, tuple[int, ...]]  # BFL key -> shape
    file_keys: dict[Path, list[str]]  # keys to read from each file (with their prefix)
    prefix: str = ""
    dtypes: set[str] = field(default_factory=set)
    metadata: dict[str, str] = field(default_factory=dict)
    # scaled fp8: BFL weight key -> (file, file key of its scale, scale shape); empty for any other file
    scales: dict[str, tuple[Path, str, tuple[int, ...]]] = field(default_factory=dict)

    @property
    def fp8_scaled(self) -> bool:
        return bool(self.scales)

    @property
    def family(self) -> str:
        """"chroma" for a Chroma file (its approximator keys), else "flux"."""
        return "chroma" if isinstance(self.params, ChromaParams) else "flux"

    @property
    def is_schnell(self) -> bool:
        return not self.params.guidance_embed

    @property
    def has_guidance_input(self) -> bool:
        return bool(self.params.guidance_embed)

    @property
    def model_type(self) -> str:
        if self.family == "chroma":
            return "chroma"
        return "schnell" if self.is_schnell else "dev"


def resolve_transformer_files(path: str | Path) -> list[Path]:
    """The safetensors file(s) holding a transformer: a file, all shards of a sharded file, or a diffusers folder
    (a pipeline root with transformer/, or the transformer folder itself)."""
    path = Path(path)
    if path.is_dir():
        folder = path / "transformer" if (path / "transformer").is_dir() else path
        files = sorted(folder.glob("diffusion_pytorch_model*.safetensors")) or sorted(folder.glob("*.safetensors"))
        if not files:
            pickles = sorted(folder.glob("*.bin"))
            hint = " (only pickled .bin files, which this suite never loads)" if pickles else ""
            raise ModelFileError(f"{path}: folder holds no .safetensors transformer files{hint}")
        return files
    if m := _SHARD.search(path.name):
        total = int(m.group(2))
        stem = path.name[: m.start()]
        files = [path.with_name(f"{stem}-{i:05d}-of-{total:05d}.safetensors") for i in range(1, total + 1)]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise ModelFileError(f"{path}: sharded checkpoint is incomplete, missing {', '.join(missing)}")
        return files
    return [path]


def _merged_header(path: Path, files: list[Path]) -> tuple[SafetensorsHeader, dict[str, Path]]:
    tensors, owner, metadata = {}, {}, {}
    for f in files:
        h = read_header(f)
        tensors.update(h.tensors)
        metadata.update(h.metadata)
        owner.update((k, f) for k in h.tensors)
    return SafetensorsHeader(path, tensors, metadata), owner


def _transformer_prefix(keys: list[str]) -> str:
    for p in TRANSFORMER_PREFIXES:
        if any(k.startswith(p + "double_blocks.") or k.startswith(p + "single_blocks.") for k in keys):
            return p
    return ""


def infer_flux_params(shapes: dict[str, tuple[int, ...]]) -> FluxParams:
    """FLUX hyper-parameters from BFL key shapes: widths, block counts, guidance embedder, head size; a Chroma file
    (its approximator, `distilled_guidance_layer.*`) gives ChromaParams."""
    if APPROXIMATOR_KEY in shapes:
        return _infer_chroma_params(shapes)
    try:
        hidden, in_channels = shapes["img_in.weight"]
        norm_key = next(k for k in shapes if k.endswith("norm.query_norm.scale"))
        head_dim = shapes[norm_key][0]
        if "double_blocks.0.img_mlp.0.weight" in shapes:
            mlp_hidden = shapes["double_blocks.0.img_mlp.0.weight"][0]
        else:
            mlp_hidden = shapes["single_blocks.0.linear1.weight"][0] - 3 * hidden
        params = FluxParams(
            in_channels=in_channels,
            out_channels=shapes["final_layer.linear.weight"][0],
            vec_in_dim=shapes["vector_in.in_layer.weight"][1],
            context_in_dim=shapes["txt_in.weight"][1],
            hidden_size=hidden,
            mlp_ratio=mlp_hidden / hidden,
            num_heads=hidden // head_dim,
            depth=_count_blocks(shapes, "double_blocks"),
            depth_single_blocks=_count_blocks(shapes, "single_blocks"),
            axes_dim=default_axes_dim(head_dim),
            qkv_bias=any(k.endswith("attn.qkv.bias") for k in shapes) or "single_blocks.0.linear1.bias" in shapes,
            guidance_embed="guidance_in.in_layer.weight" in shapes,
        )
    except (KeyError, StopIteration, ValueError) as e:
        raise ValueError(f"incomplete FLUX transformer: cannot read its size ({e})") from None
    return params


def _infer_chroma_params(shapes: dict[str, tuple[int, ...]]) -> ChromaParams:
    try:
        hidden, in_channels = shapes["img_in.weight"]
        head_dim = shapes[next(k for k in shapes if k.endswith("norm.query_norm.scale"))][0]
        approx_hidden, approx_in = shapes[APPROXIMATOR_KEY]
        mlp_hidden = shapes["double_blocks.0.img_mlp.0.weight"][0]
        params = ChromaParams(
            in_channels=in_channels, out_channels=shapes["final_layer.linear.weight"][0],
            context_in_dim=shapes["txt_in.weight"][1], hidden_size=hidden, mlp_ratio=mlp_hidden / hidden,
            num_heads=hidden // head_dim, depth=_count_blocks(shapes, "double_blocks"),
            depth_single_blocks=_count_blocks(shapes, "single_blocks"), axes_dim=default_axes_dim(head_dim),
            qkv_bias="double_blocks.0.img_attn.qkv.bias" in shapes, approximator_in_dim=approx_in,
            approximator_hidden_size=approx_hidden,
            approximator_depth=_count_blocks(shapes, "distilled_guidance_layer.layers"))
        out_proj = tuple(shapes["distilled_guidance_layer.out_proj.weight"])
        if out_proj != (hidden, approx_hidden):
            raise ValueError(f"distilled_guidance_layer.out_proj.weight is {out_proj}, "
                             f"expected {(hidden, approx_hidden)}")
        params.validate()
    except (KeyError, StopIteration, ValueError) as e:
        raise ValueError(f"incomplete Chroma transformer: cannot read its size ({e})") from None
    return params


def build_transformer(params: FluxParams) -> Flux:
    """The transformer class of `params` (Chroma for ChromaParams), built on the current default device."""
    return Chroma(params) if isinstance(params, ChromaParams) else Flux(params)


def _count_blocks(shapes, name: str) -> int:
    idx = {int(m.group(1)) for k in shapes if (m := re.match(rf"{name}\.(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def analyze_checkpoint(path: str | Path) -> FluxCheckpointInfo:
    """Recognise a transformer checkpoint from its header(s) only: layout, dev or schnell, sizes, dtypes."""
    path = Path(path)
    if is_gguf(path):
        return _analyze_gguf(path)
    files = resolve_transformer_files(path)
    header, owner = _merged_header(path, files)
    kind = detect_kind(header.keys)
    if kind not in ("flux_bfl", "flux_diffusers"):
        expect_kind(header, "flux_bfl", ROLE)  # raises, saying what the file looks like
    raw_shapes = {k: v.shape for k, v in header.tensors.items()}
    if kind == "flux_diffusers":
        layout, prefix = "diffusers", ""
        try:
            shapes = diffusers_shapes_to_bfl(raw_shapes)
        except UnknownKeysError as e:
            raise ModelFileError(f"{path}: diffusers transformer with keys this suite cannot map: "
                                 f"{sample_keys(e.keys, 5)}") from None
        keys, scale_keys = list(raw_shapes), []
    else:
        layout, prefix = "bfl", _transformer_prefix(header.keys)
        keys = [k for k in raw_shapes if k.startswith(prefix)]
        scale_keys = [k for k in keys if fp8_scaled.is_scale_key(k[len(prefix):])]
        keys = [k for k in keys if k not in set(scale_keys)]
        shapes = {k[len(prefix):]: raw_shapes[k] for k in keys}
    try:
        params = infer_flux_params(shapes)
    except ValueError as e:
        raise ModelFileError(f"{path}: {e}; sample keys: {sample_keys(shapes, 5)}") from None
    file_keys: dict[Path, list[str]] = {}
    for k in keys:
        file_keys.setdefault(owner[k], []).append(k)
    dtypes = {header.tensors[k].dtype for k in keys}
    scales = _scales(path, prefix, scale_keys, shapes, owner, raw_shapes)
    return FluxCheckpointInfo(path, layout, params, shapes, file_keys, prefix, dtypes, header.metadata, scales)


def _scales(path: Path, prefix: str, scale_keys: list[str], shapes, owner, raw_shapes):
    """Each scaled weight's scale, checked against the weight's shape (header only)."""
    out = {}
    for k in scale_keys:
        name = k[len(prefix):]
        if not name.endswith("." + fp8_scaled.SCALE):
            continue  # the marker and activation scales: nothing to load
        weight = name[: -len(fp8_scaled.SCALE)] + "weight"
        if weight not in shapes:
            raise ModelFileError(f"{path}: {k} scales {prefix}{weight}, which the file does not hold")
        try:
            fp8_scaled.check_scale_shape(k, raw_shapes[k], shapes[weight])
        except ValueError as e:
            raise ModelFileError(f"{path}: {e}") from None
        out[weight] = (owner[k], k, tuple(raw_shapes[k]))
    return out


def _analyze_gguf(path: Path) -> FluxCheckpointInfo:
    header = read_gguf_header(path)
    kind = detect_kind(header.tensors)
    if kind != "flux_bfl":
        arch = header.architecture or "none"
        raise ModelFileError(f"{path}: GGUF file of architecture {arch!r} whose tensors look like {kind} "
                             f"({sample_keys(header.tensors, 3)}); {ROLE} needs a FLUX transformer with BFL names")
    prefix = _transformer_prefix(list(header.tensors))
    keys = [k for k in header.tensors if k.startswith(prefix)]
    shapes = {k[len(prefix):]: header.tensors[k].shape for k in keys}
    try:
        params = infer_flux_params(shapes)
    except ValueError as e:
        raise ModelFileError(f"{path}: {e}; sample keys: {sample_keys(shapes, 5)}") from None
    dtypes = {header.tensors[k].qtype.name for k in keys}
    return FluxCheckpointInfo(path, "gguf", params, shapes, {path: keys}, prefix, dtypes, header.metadata)


def load_transformer(ckpt_path: str | Path, dtype: torch.dtype | None = None,
                     device: str | torch.device = "cpu", info: FluxCheckpointInfo | None = None) -> Flux:
    """Load a FLUX transformer: built on `meta`, then each tensor read once and assigned (no second copy).

    dtype None keeps the stored dtype (fp8 files stay fp8; a scaled fp8 file's scales become `scale_weight` buffers
    of their Linears, which Fp8Linear applies; GGUF files are dequantized to bfloat16); a dtype dequantises scaled
    weights to it (ComfyUI's formula). Raises ModelFileError with the file name for anything that is not a complete
    FLUX transformer.
    """
    info = info or analyze_checkpoint(ckpt_path)
    with torch.device("meta"):
        model = build_transformer(info.params)
    if info.layout == "gguf":  # every tensor dequantized (GGUFLinear keeps them quantized instead)
        with GGUFTensorReader(read_gguf_header(info.path)) as reader:
            state_dict = {k[len(info.prefix):]: reader.dequantized(k, dtype or torch.bfloat16)
                          for k in info.file_keys[info.path]}
    elif info.layout == "bfl":
        state_dict = {}
        for f, keys in info.file_keys.items():
            state_dict.update(load_tensors(f, keys, dtype, rename={k: k[len(info.prefix):] for k in keys}))
    else:
        readers = {f: TensorReader(f) for f in info.file_keys}
        owner = {k: f for f, keys in info.file_keys.items() for k in keys}

        def get(key: str) -> torch.Tensor:
            t = readers[owner[key]].get(key)
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t

        try:
            state_dict = diffusers_to_bfl(owner, get)
        finally:
            for r in readers.values():
                r.close()
    if info.scales:
        _apply_scales(model, state_dict, info, dtype)
    assign_weights(model, state_dict, info.path)
    del state_dict
    return model.to(device).eval()


def _apply_scales(model: Flux, state_dict: dict[str, torch.Tensor], info: FluxCheckpointInfo,
                  dtype: torch.dtype | None) -> None:
    by_file: dict[Path, list[str]] = {}
    for f, key, _ in info.scales.values():
        by_file.setdefault(f, []).append(key)
    scales = {}
    for f, keys in by_file.items():
        scales.update(load_tensors(f, keys))
    fp8_scaled.apply_scales(model, state_dict, {w: scales[key] for w, (_, key, _) in info.scales.items()}, dtype)
