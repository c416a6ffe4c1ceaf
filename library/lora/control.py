"""BFL control LoRAs on a FLUX.1-dev transformer (library/formats/control_lora.py has the file layout): hooked or
merged at inference, and the trainable network of `flux_train_network.py --control_lora`.

What applying does (BFL's `FluxLoraWrapper`, diffusers' FluxControlPipeline):
- img_in is widened from 64 to 128 input features, the new columns zero (so the control features start ignored);
- every Linear gets W' = W + s * B A and b' = b + s * b_B (BFL scales the whole LoRA branch, bias included);
- every QK-norm scale is REPLACED by the file's value (not scaled by s).

Hooked (`ControlLoRA.apply_to`): img_in is swapped for the widened Linear, each Linear's forward adds
s * (B (A x) + b_B), and each QK norm's forward multiplies by the file's scale instead of its own (its parameter
stays in place, untouched: block swapping and state dicts see the base model); `restore()` undoes all three
(the original img_in and forwards come back, bit for bit). `set_multiplier` changes s (the norm replacement
does not depend on s). Merged (`merge_to`): the same arithmetic written into the weights, once.
Training uses the hooked form: A (Kaiming), B and b_B (zeros) and the norm scales (copies of the base's) train.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from library.formats.control_lora import ControlLoRAWeights, is_control_lora
from library.formats.safetensors_io import read_header

DEFAULT_STRENGTH = 0.85  # BFL's CLI default lora_scale for the Canny/Depth LoRAs
CONTROL_IN_CHANNELS = 128


def control_linears(flux: nn.Module) -> dict[str, nn.Linear]:
    """Every Linear of the transformer by its BFL name (img_in included)."""
    return {name: m for name, m in flux.named_modules() if isinstance(m, nn.Linear)}


def norm_scales(flux: nn.Module) -> dict[str, nn.Parameter]:
    """Every QK-norm scale by its BFL state-dict name."""
    return {name: p for name, p in flux.named_parameters() if name.endswith(("query_norm.scale", "key_norm.scale"))}


def widened_img_in(img_in: nn.Linear, in_channels: int = CONTROL_IN_CHANNELS) -> nn.Linear:
    """img_in with `in_channels` inputs: the old columns, then zeros (a frozen copy on img_in's device/dtype)."""
    dtype = img_in.bias.dtype if img_in.bias is not None else torch.float32
    dequantize = getattr(img_in, "dequantized_weight", None)  # fp8 (scaled), nf4/int8, GGUF storage: upcast
    weight = dequantize(dtype).detach() if dequantize is not None else img_in.weight.detach()
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        weight = weight.to(dtype)
    if weight.shape[1] > in_channels:
        raise ValueError(f"img_in takes {weight.shape[1]} features, more than the control LoRA's {in_channels}")
    wide = nn.Linear(in_channels, weight.shape[0], bias=img_in.bias is not None, device="meta")
    wide.weight = nn.Parameter(F.pad(weight, (0, in_channels - weight.shape[1])), requires_grad=False)
    if img_in.bias is not None:
        wide.bias = nn.Parameter(img_in.bias.detach().clone(), requires_grad=False)
    return wide


def _forward_restorer(module: nn.Module):
    """A function putting back `module`'s current forward (an instance attribute another hook set, e.g. a kohya
    LoRA applied before this one, or none: the class's)."""
    previous = module.__dict__.get("forward")

    def restore():
        if previous is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = previous

    return restore


class ControlLoRAModule(nn.Module):
    """One Linear's LoRA branch with a bias: s * (B (A x) + b)."""

    def __init__(self, name: str, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.name = name
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        self.bias = nn.Parameter(torch.zeros(out_features))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype), self.bias.to(x.dtype))


class ControlLoRA(nn.Module):
    """A control LoRA over every Linear of a FLUX.1-dev transformer plus its QK-norm scales (see module docstring).
    Built fresh (`rank`: training) or from a file's weights (`weights`)."""

    def __init__(self, flux: nn.Module, rank: int = 128, multiplier: float = 1.0,
                 weights: ControlLoRAWeights | None = None, source: str = "the control LoRA"):
        super().__init__()
        self.multiplier = multiplier
        self.source = source
        linears = control_linears(flux)
        names = sorted(linears) if weights is None else sorted(weights.loras)
        self.names = names
        self.loras = nn.ModuleList()
        for name in names:
            if name not in linears:
                raise ValueError(f"{source}: {name} is no Linear of this transformer")
            base = linears[name]
            in_features = CONTROL_IN_CHANNELS if name == "img_in" else base.in_features
            if weights is None:
                module = ControlLoRAModule(name, in_features, base.out_features, min(rank, in_features,
                                                                                     base.out_features))
            else:
                a, b, bias = weights.loras[name]
                if (a.shape[1], b.shape[0]) != (in_features, base.out_features):
                    raise ValueError(f"{source}: {name} maps {a.shape[1]} -> {b.shape[0]} features; this "
                                     f"transformer's takes {in_features} -> {base.out_features} (a LoRA for "
                                     "another model size?)")
                module = ControlLoRAModule(name, in_features, base.out_features, a.shape[0])
                with torch.no_grad():
                    module.lora_A.copy_(a)
                    module.lora_B.copy_(b)
                    module.bias.copy_(bias if bias is not None else torch.zeros(b.shape[0]))
            self.loras.append(module)
        bases = norm_scales(flux)
        if weights is not None:
            unknown = sorted(set(weights.norms) - set(bases))
            if unknown:
                raise ValueError(f"{source}: {unknown[0]} is no QK-norm scale of this transformer")
        self.norm_names = sorted(bases) if weights is None else sorted(weights.norms)
        self.norms = nn.ParameterList()
        for name in self.norm_names:
            value = bases[name].detach() if weights is None else weights.norms[name]
            if value.shape != bases[name].shape:
                raise ValueError(f"{source}: {name} has shape {tuple(value.shape)}, the transformer's "
                                 f"{tuple(bases[name].shape)}")
            self.norms.append(nn.Parameter(value.detach().float().clone()))
        self._restore: list = []

    # ---------------------------------------------------------------------------------------------- hooked
    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier

    def apply_to(self, flux: nn.Module) -> None:
        """Hook onto `flux`: img_in widened, LoRA branches added to each Linear's output, norm scales swapped."""
        if self._restore:
            raise RuntimeError("this control LoRA is already applied")
        self._widen(flux)
        linears = control_linears(flux)
        for module in self.loras:
            linear = linears[module.name]
            original = linear.forward

            def forward(x, original=original, module=module):
                return original(x) + self.multiplier * module.branch(x)

            self._restore.append(_forward_restorer(linear))
            linear.forward = forward
        owners = dict(flux.named_modules())
        for name, param in zip(self.norm_names, self.norms):
            norm = owners[name.rpartition(".")[0]]

            def norm_forward(x, param=param):  # RMSNorm's arithmetic with the replacement scale
                xf = x.float()
                return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * param.to(x.dtype)

            self._restore.append(_forward_restorer(norm))
            norm.forward = norm_forward

    def restore(self) -> None:
        """Undo `apply_to`: the original img_in, forwards, norm parameters and params come back."""
        for undo in reversed(self._restore):
            undo()
        self._restore = []

    def _widen(self, flux: nn.Module) -> None:
        old_img_in, old_params = flux.img_in, flux.params
        if old_img_in.in_features != CONTROL_IN_CHANNELS:
            flux.img_in = widened_img_in(old_img_in)
            flux.params = replace(old_params, in_channels=CONTROL_IN_CHANNELS)

        def undo():
            flux.img_in, flux.params = old_img_in, old_params

        self._restore.append(undo)

    # ---------------------------------------------------------------------------------------------- merged
    @torch.no_grad()
    def merge_to(self, flux: nn.Module) -> None:
        """Write the control LoRA into `flux`'s weights at `multiplier` (img_in widened first; norms replaced).
        Quantized or fp8 weights are refused (the merged delta would be rounded into them)."""
        linears = control_linears(flux)
        stored = [n for n in (m.name for m in self.loras) if n != "img_in" and (
            hasattr(linears[n], "dequantized_weight")
            or linears[n].weight.dtype not in (torch.float32, torch.float16, torch.bfloat16))]
        if stored:
            raise ValueError(f"{self.source}: cannot merge into quantized/fp8 weights ({stored[0]}, ...); leave out "
                             "--merge_lora_weights to hook it")
        if flux.img_in.in_features != CONTROL_IN_CHANNELS:
            flux.img_in = widened_img_in(flux.img_in)
            flux.params = replace(flux.params, in_channels=CONTROL_IN_CHANNELS)
        linears = control_linears(flux)
        s = self.multiplier
        for module in self.loras:
            linear = linears[module.name]
            w = linear.weight
            delta = module.lora_B.float().to(w.device) @ module.lora_A.float().to(w.device)
            w.copy_((w.float() + s * delta).to(w.dtype))
            if linear.bias is None:
                linear.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                                           requires_grad=False)
            b = linear.bias
            b.copy_((b.float() + s * module.bias.float().to(b.device)).to(b.dtype))
        params = dict(flux.named_parameters())
        for name, value in zip(self.norm_names, self.norms):
            params[name].copy_(value.to(params[name].device, params[name].dtype))

    # ---------------------------------------------------------------------------------------------- saving
    def to_weights(self, dtype: torch.dtype | None = None) -> ControlLoRAWeights:
        def cast(t):
            t = t.detach().cpu()
            return t.to(dtype) if dtype is not None else t

        return ControlLoRAWeights({m.name: (cast(m.lora_A), cast(m.lora_B), cast(m.bias)) for m in self.loras},
                                  {n: cast(p) for n, p in zip(self.norm_names, self.norms)})


def find_control_lora(specs: list[str]) -> tuple[Path, dict[str, str]] | None:
    """The control LoRA among `--lora_weights` specs (`path` or `path;multiplier`), by its keys: (path, the
    metadata that names its model), or None. The model is the file's ModelSpec architecture, else its file name
    (BFL's files carry none: flux1-depth-dev-lora.safetensors), else none (canny is then taken, with a log line).
    More than one control LoRA is refused."""
    found = []
    for spec in specs:
        path = Path(spec.rpartition(";")[0] if ";" in spec else spec)
        header = read_header(path)
        if is_control_lora(header.tensors):
            found.append((path, dict(header.metadata)))
    if len(found) > 1:
        raise ValueError(f"--lora_weights: {found[0][0]} and {found[1][0]} are both control LoRAs (Canny/Depth); "
                         "give one")
    if not found:
        return None
    path, metadata = found[0]
    if "modelspec.architecture" not in metadata:
        name = path.name.lower()
        for kind in ("depth", "canny"):
            if kind in name:
                metadata["modelspec.architecture"] = f"flux-1-{kind}-dev/lora"
    return path, metadata
