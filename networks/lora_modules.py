"""LoRA modules with kohya sd-scripts' math and file layout (reference 9.3, 9.7, 18.1).

One `LoRAModule` wraps one `nn.Linear` by replacing its `forward` (the original is kept and can be restored):

    y = org_forward(x) + multiplier * (alpha / r) * up(down(x))

with `down` (r, in) Kaiming-uniform (a = sqrt(5)) and `up` (out, r) zero-initialised, so a fresh LoRA changes
nothing. Its state dict is always the kohya layout: `lora_down.weight`, `lora_up.weight`, `alpha` (float32, 0-dim).

`split_dims` gives a module one (down, up) pair per output slice of a fused weight (q, k, v of a double block's
`qkv`; q, k, v, mlp of a single block's `linear1`). It is trained split but saved fused, so every kohya loader reads
it: down = the parts' downs stacked (k*r, in), up = block-diagonal (out, k*r), and alpha = (alpha / r) * k*r, which
makes the fused scale alpha_saved / (k*r) equal to the trained per-part scale alpha / r (all parts of a module share
r and alpha, so one scale fits all of them). sd-scripts keeps alpha unchanged instead, so non-split loaders apply
only 1/k of what was trained (its bug 4); loading a fused file back into a split module reverses the rule exactly.

DoRA (`dora=True`, network_args dora_wd=True): a trained magnitude m (`dora_scale`, (out, 1) float32, initialised to
the base weight's row norms, lycoris' layout for a Linear) rescales each output row of the updated weight,
W' = m * (W + s*dW) / (||W + s*dW||_row + eps), s = alpha / r, as lycoris trains it (the norm is not detached there,
nor here). At multiplier k the change is k * (W' - W), as ComfyUI and library/formats/lycoris_weights.py apply such
files, so a saved file reads back the same at every strength. The forward never builds W' x: it is
(m / n) * (W x + s * up(down(x))), W x being the wrapped layer's own output less its bias.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from library.formats import fp8_scaled


def fuse_split_weights(downs: Sequence[torch.Tensor], ups: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Parts (r, in) and (out_i, r) -> fused down (k*r, in) and block-diagonal up (sum out_i, k*r)."""
    return torch.cat(list(downs), dim=0), torch.block_diag(*ups)


def split_fused_weights(down: torch.Tensor, up: torch.Tensor, split_dims: Sequence[int]
                        ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Inverse of fuse_split_weights. Raises ValueError when `up` is not block-diagonal over `split_dims` (a LoRA
    trained on the whole fused weight, which a split module cannot represent)."""
    k = len(split_dims)
    rank = down.shape[0]
    if rank % k:
        raise ValueError(f"rank {rank} is not divisible into {k} parts")
    r = rank // k
    downs = list(down.split(r, dim=0))
    ups, row = [], 0
    for i, d in enumerate(split_dims):
        ups.append(up[row:row + d, i * r:(i + 1) * r])
        row += d
    if not torch.equal(torch.block_diag(*ups), up):
        raise ValueError("its lora_up is not block-diagonal over the q/k/v(/mlp) parts: it was not trained with "
                         "split_qkv (load it into a network without split_qkv)")
    return downs, ups


def dequantized_weight(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The weight a frozen base Linear computes with, in `dtype`: fp8 (scaled or not), bitsandbytes and GGUF layers
    expose `dequantized_weight(dtype)` (duck-typed: library.memory is above this layer); a plain Linear is cast, and
    a scaled fp8 weight on a plain Linear multiplied by its `scale_weight`."""
    dequantize = getattr(module, "dequantized_weight", None)
    if dequantize is not None:
        return dequantize(dtype)
    return fp8_scaled.dequantize(module.weight, module._buffers.get(fp8_scaled.SCALE), dtype)


DORA_EPS = torch.finfo(torch.float32).eps  # lycoris adds it to the norm


def dora_rescale(updated: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's per-row factor m / (||W + dW||_row + eps), (out, 1) float32, for `updated` = W + dW."""
    return magnitude.float().view(-1, 1) / (updated.float().norm(dim=1, keepdim=True) + DORA_EPS)


def _rank_dropout_mask(lx: torch.Tensor, p: float) -> torch.Tensor:
    """Keep-mask over ranks, one draw per sample, broadcast over the sequence dimensions."""
    shape = (lx.shape[0],) + (1,) * (lx.dim() - 2) + (lx.shape[-1],)
    return (torch.rand(shape, device=lx.device) > p).to(lx.dtype)


class LoRAModule(nn.Module):
    """A trainable LoRA over one Linear (or its fused parts, see the module docstring)."""

    def __init__(self, lora_name: str, org_module: nn.Module, multiplier: float = 1.0, lora_dim: int = 4,
                 alpha: float | torch.Tensor | None = 1.0, dropout: float | None = None,
                 rank_dropout: float | None = None, module_dropout: float | None = None,
                 split_dims: Sequence[int] | None = None, dora: bool = False):
        super().__init__()
        self.lora_name = lora_name
        if dora and split_dims is not None:
            raise ValueError(f"{lora_name}: dora_wd=True cannot be combined with split_qkv (DoRA normalises whole "
                             "rows of the fused weight)")
        in_dim, out_dim = org_module.in_features, org_module.out_features
        if split_dims is not None and sum(split_dims) != out_dim:
            raise ValueError(f"{lora_name}: split dims {list(split_dims)} do not add up to {out_dim} outputs")
        self.lora_dim = int(lora_dim)
        self.split_dims = list(split_dims) if split_dims is not None else None

        def linear(i: int, o: int) -> nn.Linear:
            return nn.Linear(i, o, bias=False)

        if self.split_dims is None:
            self.lora_down = linear(in_dim, self.lora_dim)
            self.lora_up = linear(self.lora_dim, out_dim)
            downs, ups = [self.lora_down], [self.lora_up]
        else:
            self.lora_down = nn.ModuleList(linear(in_dim, self.lora_dim) for _ in self.split_dims)
            self.lora_up = nn.ModuleList(linear(self.lora_dim, d) for d in self.split_dims)
            downs, ups = list(self.lora_down), list(self.lora_up)
        for d in downs:
            nn.init.kaiming_uniform_(d.weight, a=math.sqrt(5))
        for u in ups:
            nn.init.zeros_(u.weight)

        # float32 always: sd-scripts stores an int64 alpha when it came from the int CLI default (its bug 25).
        alpha = float(alpha) if alpha is not None else 0.0
        self.register_buffer("alpha", torch.tensor(alpha or float(self.lora_dim), dtype=torch.float32))
        if dora:
            with torch.no_grad():
                norms = dequantized_weight(org_module, torch.float32).norm(dim=1, keepdim=True)
            self.dora_scale = nn.Parameter(norms)
        else:
            self.dora_scale = None
        self._set_alpha(alpha or float(self.lora_dim))
        self.multiplier = multiplier
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self.enabled = True
        # Plain attributes, not submodules: the wrapped Linear must not enter the LoRA state dict.
        self.__dict__["org_module"] = org_module
        self.__dict__["org_forward"] = None
        self.register_state_dict_post_hook(_save_kohya_layout)
        self.register_load_state_dict_pre_hook(_load_kohya_layout)

    # -- alpha and scale ------------------------------------------------------------------------------------------

    @property
    def num_parts(self) -> int:
        return len(self.split_dims) if self.split_dims else 1

    def _set_alpha(self, alpha: float) -> None:
        """Keep the exact alpha as a Python float: the buffer may be cast with the network (bf16) and reading it
        back each step would sync the GPU."""
        self.alpha_value = float(alpha)
        self.scale = self.alpha_value / self.lora_dim
        if not self.alpha.is_meta:
            with torch.no_grad():
                self.alpha.fill_(self.alpha_value)

    def saved_alpha(self) -> float:
        """The alpha written to files: per-part scale times the fused rank (equals alpha when not split)."""
        return self.scale * self.lora_dim * self.num_parts

    # -- hooking --------------------------------------------------------------------------------------------------

    def apply_to(self) -> None:
        """Route the wrapped Linear's forward through this module (the original forward is kept)."""
        if self.org_forward is not None:
            return
        org = self.org_module
        self.__dict__["_had_own_forward"] = "forward" in org.__dict__
        self.__dict__["org_forward"] = org.forward
        org.forward = self.forward

    def restore(self) -> None:
        """Give the wrapped Linear its original forward back."""
        if self.org_forward is None:
            return
        org = self.org_module
        if self.__dict__.pop("_had_own_forward"):
            org.forward = self.org_forward
        else:
            del org.forward
        self.__dict__["org_forward"] = None

    # -- forward --------------------------------------------------------------------------------------------------

    def _lora(self, x: torch.Tensor, down: nn.Linear, up: nn.Linear, scale: float) -> torch.Tensor:
        # The branch runs in the input's dtype: the wrapped layer may store fp8 and the LoRA fp32 master weights.
        lx = F.linear(x, down.weight.to(x.dtype))
        if self.training and self.dropout:
            lx = F.dropout(lx, p=self.dropout)
        if self.training and self.rank_dropout:
            lx = lx * _rank_dropout_mask(lx, self.rank_dropout)
        return F.linear(lx, up.weight.to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        org_out = self.org_forward(x)
        if not self.enabled or self.multiplier == 0:
            return org_out
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return org_out
        scale = self.scale
        if self.training and self.rank_dropout:
            scale = scale / (1.0 - self.rank_dropout)  # keeps the expected update unchanged
        if self.dora_scale is not None:
            return self._dora_forward(x, org_out, scale)
        if self.split_dims is None:
            lx = self._lora(x, self.lora_down, self.lora_up, scale)
        else:
            lx = torch.cat([self._lora(x, d, u, scale) for d, u in zip(self.lora_down, self.lora_up)], dim=-1)
        # the sum in place, and the unscaled branch output not kept: at the output's size (an MLP's 12288 features,
        # 96 MiB per 4096 tokens) two such tensors exist at once instead of four. The same values, bit for bit.
        lx = (lx * (self.multiplier * scale)).to(org_out.dtype)
        return org_out.add_(lx)

    def _dora_forward(self, x: torch.Tensor, org_out: torch.Tensor, scale: float) -> torch.Tensor:
        # the dequantised base weight once per call (the transient the base layer's own forward also makes)
        weight = dequantized_weight(self.org_module, torch.float32).to(x.device)
        delta = self.lora_up.weight.float() @ self.lora_down.weight.float()
        rescale = dora_rescale(weight + self.scale * delta, self.dora_scale).view(-1)
        bias = self.org_module.bias
        wx = org_out if bias is None else org_out - bias.to(org_out.dtype)
        lx = self._lora(x, self.lora_down, self.lora_up, scale)
        # W x + k (W' x - W x), W' x = (m / n) (W x + s up(down(x))); the rescale stays float32 (it is near 1, which
        # bf16 would round to steps of 1/128)
        k = self.multiplier
        return (org_out + (wx * (k * (rescale - 1)) + lx * (k * scale * rescale))).to(org_out.dtype)

    # -- weights --------------------------------------------------------------------------------------------------

    def fused_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) in the saved layout, detached."""
        with torch.no_grad():
            if self.split_dims is None:
                return self.lora_down.weight.detach(), self.lora_up.weight.detach()
            return fuse_split_weights([d.weight for d in self.lora_down], [u.weight for u in self.lora_up])

    def get_weight(self, multiplier: float | None = None) -> torch.Tensor:
        """The update this module adds to the wrapped weight, in fp32: multiplier * scale * up @ down."""
        down, up = self.fused_weights()
        m = self.multiplier if multiplier is None else multiplier
        return m * self.scale * (up.float() @ down.float())

    @torch.no_grad()
    def merge_to(self, sd: dict[str, torch.Tensor] | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        """W += multiplier * (alpha / rank) * up @ down, computed in fp32 on `device`, stored back in the weight's
        own dtype and device (`dtype` is accepted for sd-scripts' signature; an fp8 or bf16 base stays so).
        `sd` holds this module's tensors in the file layout (fused); None merges the module's own weights. With DoRA
        (a dora_scale) W += multiplier * (W' - W), W' = (W + dW) * dora_rescale(W + dW, dora_scale)."""
        if sd is None:
            down, up = self.fused_weights()
            scale = self.scale
            magnitude = self.dora_scale
        else:
            magnitude = sd.get("dora_scale")
            down, up = sd["lora_down.weight"], sd["lora_up.weight"]
            rank = down.shape[0]
            alpha = float(sd["alpha"]) if "alpha" in sd else 0.0
            scale = (alpha or rank) / rank
        weight = self.org_module.weight
        w_scale = self.org_module._buffers.get(fp8_scaled.SCALE)  # a scaled fp8 base
        device = torch.device(device) if device is not None else weight.device
        base = fp8_scaled.dequantize(weight.to(device), w_scale, torch.float32)
        delta = scale * (up.to(device, torch.float32) @ down.to(device, torch.float32))
        if magnitude is not None:
            updated = base + delta
            delta = updated * dora_rescale(updated, magnitude.to(device)) - base  # W' - W
        merged = base + self.multiplier * delta
        if w_scale is None:
            weight.copy_(merged.to(weight.dtype).to(weight.device))
            return
        if w_scale.dim() == 3:
            raise ValueError(f"{self.lora_name}: merging into block-wise scaled fp8 weights is not supported")
        # re-quantised with a fresh scale of the same kind: the merged weight may outgrow the old range
        q, s = fp8_scaled.quantize_weight(merged, "tensor" if w_scale.numel() == 1 else "channel")
        weight.copy_(q.to(weight.device))
        w_scale.copy_(s.reshape(w_scale.shape).to(w_scale.device))

    @torch.no_grad()
    def apply_max_norm(self, max_norm: float, device: torch.device | str | None = None) -> tuple[bool, float]:
        """Scale up and down by sqrt(ratio) so that ||scale * up @ down||_F <= max_norm (reference 9.8).
        Returns (scaled, the update's norm after scaling)."""
        pairs = ([(self.lora_down, self.lora_up)] if self.split_dims is None
                 else list(zip(self.lora_down, self.lora_up)))
        # The fused update is block-diagonal: its squared norm is the sum of the parts' squared norms.
        norm = math.sqrt(sum(float(((u.weight.to(device, torch.float32) @ d.weight.to(device, torch.float32))
                                    * self.scale).square().sum()) for d, u in pairs))
        n = max(norm, max_norm / 2)  # tiny norms are left alone (and never divided by)
        ratio = min(n, max_norm) / n
        if ratio != 1.0:
            root = math.sqrt(ratio)
            for d, u in pairs:
                d.weight.mul_(root)
                u.weight.mul_(root)
        return ratio != 1.0, norm * ratio


class LoRAInfModule(LoRAModule):
    """Inference variant (`for_inference=True`): no dropout; `enabled` switches the LoRA off without unhooking."""

    def __init__(self, lora_name: str, org_module: nn.Module, multiplier: float = 1.0, lora_dim: int = 4,
                 alpha: float | torch.Tensor | None = 1.0, dropout: float | None = None,
                 rank_dropout: float | None = None, module_dropout: float | None = None,
                 split_dims: Sequence[int] | None = None, dora: bool = False):
        super().__init__(lora_name, org_module, multiplier, lora_dim, alpha, split_dims=split_dims, dora=dora)


# -- state-dict hooks: the kohya file layout for every module ---------------------------------------------------


@torch.no_grad()
def _save_kohya_layout(module: LoRAModule, state_dict: dict, prefix: str, local_metadata) -> None:
    state_dict[prefix + "alpha"] = torch.tensor(module.saved_alpha(), dtype=torch.float32, device=module.alpha.device)
    if module.split_dims is None:
        return
    for i in range(module.num_parts):
        state_dict.pop(f"{prefix}lora_down.{i}.weight")
        state_dict.pop(f"{prefix}lora_up.{i}.weight")
    down, up = module.fused_weights()
    state_dict[prefix + "lora_down.weight"] = down
    state_dict[prefix + "lora_up.weight"] = up


def _load_kohya_layout(module: LoRAModule, state_dict: dict, prefix: str, local_metadata, strict: bool,
                       missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    """Runs before the module's own loading: sets alpha/scale from the file and splits fused weights."""
    down_key, up_key, alpha_key = prefix + "lora_down.weight", prefix + "lora_up.weight", prefix + "alpha"
    k = module.num_parts
    file_rank = state_dict[down_key].shape[0] if down_key in state_dict else None
    if alpha_key in state_dict:
        alpha = float(state_dict[alpha_key])  # int64 alpha files (sd-scripts' default) load as well
    elif file_rank is not None:
        alpha = float(file_rank)  # kohya: no alpha means alpha = rank (scale 1)
    else:
        alpha = None
    if alpha is not None:
        # alpha / (the file's rank) is the scale every kohya loader applies: keep it with our per-part rank.
        per_part = alpha * module.lora_dim / (file_rank or module.lora_dim * k)
        module._set_alpha(per_part or float(module.lora_dim))
        state_dict[alpha_key] = torch.tensor(module.alpha_value, dtype=torch.float32)
    if module.split_dims is None or down_key not in state_dict or up_key not in state_dict:
        return
    down, up = state_dict.pop(down_key), state_dict.pop(up_key)
    if down.shape[0] != module.lora_dim * k:
        error_msgs.append(f"{prefix[:-1]}: the file's rank {down.shape[0]} is not {k} x {module.lora_dim} "
                          "(the split_qkv network's parts)")
        return
    try:
        downs, ups = split_fused_weights(down, up, module.split_dims)
    except ValueError as e:
        error_msgs.append(f"{prefix[:-1]}: {e}")
        return
    for i, (d, u) in enumerate(zip(downs, ups)):
        state_dict[f"{prefix}lora_down.{i}.weight"] = d
        state_dict[f"{prefix}lora_up.{i}.weight"] = u
