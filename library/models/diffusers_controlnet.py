"""diffusers-layout FLUX ControlNets (diffusers' `FluxControlNetModel`: InstantX Union, Shakker Union-Pro,
alimama Inpainting Alpha/Beta, jasperai Upscaler/Depth/Normals), built from our transformer blocks.

The file's keys are diffusers' names; inside, the module holds BFL names (`img_in`, `double_blocks.{i}`, ...) so the
input stack and blocks are the transformer's own classes (library/models/transformer.py) and a new ControlNet starts
from the transformer by plain copies. library/formats/diffusers_keys.py maps the shared names; the ControlNet's own
tensors (`controlnet_blocks.*`, `controlnet_single_blocks.*`, `controlnet_x_embedder.*`,
`controlnet_mode_embedder.weight`) keep their diffusers names in both layouts.

Forward (diffusers' `FluxControlNetModel.forward`): `img_in(noisy) + controlnet_x_embedder(condition)`, where the
condition is the packed AE latent of the control image (64 features per token; alimama's inpainting models take 68:
the masked image's latent and the keep-mask); Union models prepend a mode token (`controlnet_mode_embedder(mode)`)
to the text tokens, with one more zero text id; n double and m single blocks; one zero-initialised Linear per block
output, single-block outputs taken on the image tokens only. The base adds them with the interval rule
(library/models/controlled.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from library.formats.atomic_io import atomic_write
from library.formats.diffusers_keys import UnknownKeysError, bfl_to_diffusers, diffusers_to_bfl
from library.formats.safetensors_io import ModelFileError, assign_weights, read_header, TensorReader
from library.models.controlnet import block_depths, controlnet_residuals, unconsumed_parameters
from library.models.transformer import DoubleStreamBlock, Flux, FluxParams, SingleStreamBlock, add_input_layers

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
OWN_PREFIX = "controlnet_"  # controlnet_blocks, controlnet_single_blocks, controlnet_x_embedder, controlnet_mode_...


@dataclass(frozen=True)
class DiffusersControlNetShape:
    """What a diffusers-layout ControlNet file is: block counts, Union modes, condition width, guidance input."""

    depth: int
    single_depth: int
    num_mode: int | None = None
    condition_channels: int = 64  # controlnet_x_embedder's in-features: 64, or 68 for alimama's inpainting models
    guidance_embed: bool = True

    def describe(self) -> str:
        extra = f", {self.num_mode} modes" if self.num_mode else ""
        return (f"{self.depth} double / {self.single_depth} single blocks{extra}, {self.condition_channels} "
                f"condition features{', guidance input' if self.guidance_embed else ''}")


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class DiffusersControlNet(nn.Module):
    """forward returns (double-block residuals, single-block residuals), each a list of (B, N_img, hidden)."""

    residual_mapping = "interval"  # diffusers / InstantX: base block b <- r[b // ceil(D / n)]

    def __init__(self, params: FluxParams, shape: DiffusersControlNetShape):
        super().__init__()
        params = replace(params, guidance_embed=shape.guidance_embed)
        params.validate()
        self.params, self.shape = params, shape
        h = params.hidden_size
        add_input_layers(self, params)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(h, params.num_heads, params.mlp_hidden_dim, params.qkv_bias)
            for _ in range(shape.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(h, params.num_heads, params.mlp_hidden_dim) for _ in range(shape.single_depth))
        self.controlnet_blocks = nn.ModuleList(_zero(nn.Linear(h, h)) for _ in range(shape.depth))
        self.controlnet_single_blocks = nn.ModuleList(_zero(nn.Linear(h, h)) for _ in range(shape.single_depth))
        self.controlnet_x_embedder = _zero(nn.Linear(shape.condition_channels, h))
        if shape.num_mode:
            self.controlnet_mode_embedder = nn.Embedding(shape.num_mode, h)

    conditioning_vector = Flux.conditioning_vector
    unconsumed_parameters = unconsumed_parameters
    dtype = Flux.dtype
    device = Flux.device

    @property
    def depths(self) -> tuple[int, int]:
        return self.shape.depth, self.shape.single_depth

    def forward(self, img, img_ids, controlnet_cond, txt, txt_ids, timesteps, y, guidance=None,
                txt_attention_mask=None, mode: torch.Tensor | int | None = None):
        """img (B, N, 64) packed noisy latents; controlnet_cond (B, N, condition_channels) packed condition latents;
        mode: the Union mode (int or (B,) long), required exactly when the model has a mode embedder."""
        if controlnet_cond.shape[1:] != (img.shape[1], self.shape.condition_channels):
            raise ValueError(f"ControlNet condition {tuple(controlnet_cond.shape)} does not fit: expected (B, "
                             f"{img.shape[1]}, {self.shape.condition_channels}) packed latents")
        vec = self.conditioning_vector(timesteps, y, guidance, dtype=img.dtype)
        img = self.img_in(img) + self.controlnet_x_embedder(controlnet_cond.to(img.dtype))
        txt = self.txt_in(txt)
        if self.shape.num_mode:
            if mode is None:
                raise ValueError(f"this Union ControlNet ({self.shape.num_mode} modes) needs a control mode")
            check = torch.as_tensor(mode).reshape(-1)
            if check.device.type == "cpu" and (int(check.max()) >= self.shape.num_mode or int(check.min()) < 0):
                raise ValueError(f"control mode {check.tolist()} is out of range: the model has "
                                 f"{self.shape.num_mode} modes (0 to {self.shape.num_mode - 1})")  # (no GPU sync)
            mode = check.to(img.device, torch.long).expand(img.shape[0])
            txt = torch.cat((self.controlnet_mode_embedder(mode)[:, None].to(txt.dtype), txt), dim=1)
            txt_ids = torch.cat((txt_ids[:, :1], txt_ids), dim=1)
            if txt_attention_mask is not None:
                txt_attention_mask = torch.cat((torch.ones_like(txt_attention_mask[:, :1]), txt_attention_mask), 1)
        elif mode is not None:
            raise ValueError("a control mode was given, but this ControlNet has no mode embedder (not a Union model)")
        return controlnet_residuals(self, img, txt, img_ids, txt_ids, vec, txt_attention_mask,
                                    self.controlnet_blocks, self.controlnet_single_blocks)


def diffusers_controlnet_from_transformer(flux: Flux, shape: DiffusersControlNetShape,
                                          dtype: torch.dtype = torch.float32,
                                          device: torch.device | str | None = None) -> DiffusersControlNet:
    """A new ControlNet as diffusers' `FluxControlNetModel.from_transformer`: input stack and first blocks copied
    from the transformer, zero output projections and condition embedder, a random mode embedding (Union)."""
    p = flux.params
    if shape.depth > p.depth or shape.single_depth > p.depth_single_blocks:
        raise ValueError(f"a ControlNet of {shape.depth} double / {shape.single_depth} single blocks needs a "
                         f"transformer with at least as many (it has {p.depth} / {p.depth_single_blocks})")
    shape = replace(shape, guidance_embed=p.guidance_embed)
    cn = DiffusersControlNet(p, shape)
    source = flux.state_dict()
    with torch.no_grad():
        for name, t in cn.state_dict().items():
            if name in source:
                t.copy_(source[name].to(t.dtype))
    return cn.to(device or flux.device, dtype)


# --- files ---------------------------------------------------------------------------------------------------


def weights_file(path: str | os.PathLike) -> Path:
    """A diffusers folder's weights file, or the file itself."""
    path = Path(path)
    if path.is_dir():
        if not (path / WEIGHTS_NAME).is_file():
            found = ", ".join(sorted(p.name for p in path.glob("*.safetensors"))) or "no .safetensors file"
            raise ModelFileError(f"{path}: a diffusers ControlNet folder needs {WEIGHTS_NAME} (found {found})")
        return path / WEIGHTS_NAME
    return path


def is_diffusers_controlnet(keys) -> bool:
    keys = set(keys)
    return "controlnet_blocks.0.weight" in keys and "transformer_blocks.0.attn.to_q.weight" in keys


def diffusers_controlnet_shape(path: str | os.PathLike, base: FluxParams) -> DiffusersControlNetShape:
    """The file's shape from its header (flux-family.md 1.5 step 2), checked against the base transformer."""
    header = read_header(weights_file(path))
    t, keys = header.tensors, header.keys
    if not is_diffusers_controlnet(keys):
        raise ModelFileError(f"{path}: expected a diffusers-layout FLUX ControlNet (keys controlnet_blocks.0.weight "
                             "and transformer_blocks.0.attn.to_q.weight)")
    if any(k.startswith("input_hint_block.") for k in keys):
        raise ModelFileError(f"{path}: a diffusers ControlNet with a pixel-space input_hint_block (XLabs-style) is "
                             "not supported here")
    width = t["controlnet_blocks.0.weight"].shape[0]
    head_dim = t["transformer_blocks.0.attn.norm_q.weight"].shape[0]
    if (width, width // head_dim) != (base.hidden_size, base.num_heads):
        raise ModelFileError(f"{path}: ControlNet width {width} ({width // head_dim} heads x {head_dim}) does not fit "
                             f"the transformer's {base.hidden_size} ({base.num_heads} heads x {base.head_dim})")
    context = t["context_embedder.weight"].shape[1]
    if context != base.context_in_dim:
        raise ModelFileError(f"{path}: context_embedder takes {context} text features, the transformer "
                             f"{base.context_in_dim}")
    depth, single = block_depths(path, keys, ("transformer_blocks", "single_transformer_blocks"),
                                 ("controlnet_blocks", "controlnet_single_blocks"))
    mode = t.get("controlnet_mode_embedder.weight")
    return DiffusersControlNetShape(
        depth, single, num_mode=mode.shape[0] if mode is not None else None,
        condition_channels=t["controlnet_x_embedder.weight"].shape[1],
        guidance_embed="time_text_embed.guidance_embedder.linear_1.weight" in t)


def to_bfl_names(keys, get) -> dict[str, torch.Tensor]:
    """diffusers-named tensors -> the module's names (`get(key)` reads one tensor)."""
    keys = list(keys)
    own = {k: get(k) for k in keys if k.startswith(OWN_PREFIX)}
    try:
        return {**diffusers_to_bfl([k for k in keys if not k.startswith(OWN_PREFIX)], get), **own}
    except UnknownKeysError as e:
        raise ModelFileError(f"unexpected tensors for a diffusers FLUX ControlNet: {', '.join(e.keys[:5])}") from None


def load_diffusers_controlnet(path: str | os.PathLike, base: FluxParams, dtype: torch.dtype | None = torch.float32,
                              device: torch.device | str = "cpu") -> DiffusersControlNet:
    """A diffusers-layout ControlNet file or folder; strict (every tensor present, right shapes)."""
    shape = diffusers_controlnet_shape(path, base)
    file = weights_file(path)
    with torch.device("meta"):
        cn = DiffusersControlNet(base, shape)
    with TensorReader(file) as reader:
        tensors = to_bfl_names(reader.keys(), lambda k: reader.get(k).to(dtype) if dtype else reader.get(k))
    assign_weights(cn, tensors, file)
    return cn.to(device)


def diffusers_state_dict(cn: DiffusersControlNet, dtype: torch.dtype | None = None,
                         state: dict | None = None) -> dict[str, torch.Tensor]:
    """Tensors to save under diffusers' names (ComfyUI's and diffusers' loaders read these); detached CPU copies.
    `state`: the ControlNet's weights when they are not its own state_dict (gathered from shards)."""
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu()
          for k, v in (cn.state_dict() if state is None else state).items()}
    own = {k: v.contiguous() for k, v in sd.items() if k.startswith(OWN_PREFIX)}
    shared = bfl_to_diffusers({k: v for k, v in sd.items() if not k.startswith(OWN_PREFIX)}, cn.params.hidden_size)
    return {**{k: v.contiguous() for k, v in shared.items()}, **own}


def diffusers_config(cn: DiffusersControlNet) -> dict:
    """diffusers' config.json of `FluxControlNetModel` for this ControlNet. A 68-feature (alimama) embedder is
    written as diffusers 0.30's `extra_condition_channels`, which current diffusers no longer has."""
    p, s = cn.params, cn.shape
    config = {"_class_name": "FluxControlNetModel", "_diffusers_version": "0.30.0", "patch_size": 1,
              "in_channels": p.in_channels, "num_layers": s.depth, "num_single_layers": s.single_depth,
              "attention_head_dim": p.head_dim, "num_attention_heads": p.num_heads,
              "joint_attention_dim": p.context_in_dim, "pooled_projection_dim": p.vec_in_dim,
              "guidance_embeds": s.guidance_embed, "axes_dims_rope": list(p.axes_dim), "num_mode": s.num_mode,
              "conditioning_embedding_channels": None}
    if s.condition_channels != p.in_channels:
        config["extra_condition_channels"] = s.condition_channels - p.in_channels
    return config


def write_diffusers_folder(weights: Path, cn: DiffusersControlNet, folder: Path | None = None) -> Path:
    """Beside a saved single file, the folder diffusers' `from_pretrained` reads: config.json and the weights
    (a hard link to the file, a copy where links are impossible). Returns the folder (`<file stem>/` by default)."""
    folder = folder or weights.with_suffix("")
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(diffusers_config(cn), indent=2) + "\n"
    atomic_write(folder / "config.json", lambda tmp: Path(tmp).write_text(text), suffix=".json")
    target = folder / WEIGHTS_NAME
    target.unlink(missing_ok=True)
    try:
        os.link(weights, target)
    except OSError:
        import shutil

        atomic_write(target, lambda tmp: shutil.copyfile(weights, tmp), suffix=".safetensors")
    return folder
