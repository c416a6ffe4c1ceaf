"""LyCORIS files in kohya names (what `--network_module lycoris.kohya` saves): the weight update of each module.

`lora_unet_double_blocks_0_img_attn_qkv.lokr_w1` and so on. The updates are those ComfyUI's loader computes and
lycoris' own forward applies while training (tests/test_lycoris.py checks both), for a Linear weight W (out, in):

* LoKr: ΔW = s · kron(w1, w2), w1 = lokr_w1 or lokr_w1_a @ lokr_w1_b, w2 likewise; s = alpha / r where r is the
  rank of the factored half (w2's when both are factored), s = 1 when neither is (lycoris stores alpha = dim then).
* LoHa: ΔW = (alpha / r) · (hada_w1_a @ hada_w1_b) ⊙ (hada_w2_a @ hada_w2_b), r = hada_w1_b's rows.
* LoCon (algo=lora/locon on Linears): ΔW = (alpha / r) · lora_up @ lora_down, a kohya LoRA.

A missing or zero alpha means alpha = r (scale 1), as for kohya LoRAs. With DoRA (`dora_wd=True`, a `dora_scale`
tensor) the update depends on the base weight: W' = (W + ΔW) · m / ‖W + ΔW‖ (norm of each output row, or of each
input column when dora_scale is (1, in)); at multiplier k the change is k · (W' − W), as ComfyUI applies it, so
k = 0 is the base model. lycoris' own forward scales only the rescaling, (W + ΔW) · (k · (m / ‖W + ΔW‖ − 1) + 1),
which agrees at k = 1 (the trained weight) but keeps ΔW at k = 0. Tucker factors (lokr_t2, hada_t1/t2) only
occur on convolutions, which FLUX.1 has none of; they are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from library.formats.lora_formats import LoRAFormatError, kohya_to_bfl, kohya_to_te_path

LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOCON = ("lora_down.weight", "lora_up.weight")
TUCKER = ("lokr_t2", "hada_t1", "hada_t2", "lora_mid.weight")
LEAVES = frozenset(LOKR + LOHA + LOCON + TUCKER + ("alpha", "dora_scale"))
# tensors only LyCORIS files have: a file with any of them is read here, not as a plain LoRA
MARKERS = frozenset(LOKR + LOHA + ("dora_scale",))


def is_lycoris(keys) -> bool:
    """Whether a state dict's keys are a LyCORIS file (LoKr, LoHa or DoRA tensors)."""
    return any(k.partition(".")[2] in MARKERS for k in keys)


@dataclass
class LycorisWeights:
    """One module of a LyCORIS file: its tensors by leaf name (`lokr_w1`, `alpha`, ...)."""

    name: str
    tensors: dict[str, torch.Tensor]

    @property
    def algo(self) -> str:
        leaves = self.tensors.keys()
        return "lokr" if leaves & set(LOKR) else "loha" if leaves & set(LOHA) else "lora"

    def _t(self, leaf: str) -> torch.Tensor | None:
        t = self.tensors.get(leaf)
        return None if t is None else t.float()

    def _half(self, i: int) -> tuple[torch.Tensor, int | None]:
        """LoKr's w1 or w2 and the rank it was factored with (None: stored whole)."""
        whole = self._t(f"lokr_w{i}")
        if whole is not None:
            return whole, None
        a, b = self._t(f"lokr_w{i}_a"), self._t(f"lokr_w{i}_b")
        if a is None or b is None:
            raise LoRAFormatError(f"{self.name}: LoKr needs lokr_w{i} or both lokr_w{i}_a and lokr_w{i}_b")
        return a @ b, b.shape[0]

    def _scale(self, rank: int | None) -> float:
        alpha = self.tensors.get("alpha")
        alpha = float(alpha) if alpha is not None else 0.0
        return alpha / rank if rank and alpha else 1.0

    def delta(self) -> torch.Tensor:
        """ΔW in float32, without DoRA's rescaling (see `updated`)."""
        if self.tensors.keys() & set(TUCKER):
            raise LoRAFormatError(f"{self.name}: Tucker factors are for convolutions; FLUX.1 has only Linear layers")
        if self.algo == "lokr":
            (w1, r1), (w2, r2) = self._half(1), self._half(2)
            return self._scale(r2 if r2 is not None else r1) * torch.kron(w1, w2)
        if self.algo == "loha":
            missing = [leaf for leaf in LOHA if leaf not in self.tensors]
            if missing:
                raise LoRAFormatError(f"{self.name}: LoHa module without {', '.join(missing)}")
            w1a, w1b, w2a, w2b = (self._t(leaf) for leaf in LOHA)
            return self._scale(w1b.shape[0]) * (w1a @ w1b) * (w2a @ w2b)
        down, up = self._t("lora_down.weight"), self._t("lora_up.weight")
        if down is None or up is None:
            raise LoRAFormatError(f"{self.name}: has {sorted(self.tensors)}, no LoKr, LoHa or LoRA weights")
        return self._scale(down.shape[0]) * (up @ down)

    @property
    def has_dora(self) -> bool:
        return "dora_scale" in self.tensors

    def lokr_product(self, x: torch.Tensor) -> torch.Tensor:
        """ΔW applied to x (..., in) for a LoKr without DoRA, never building ΔW: with in = m·n and x viewed as
        X (m, n), kron(w1, w2) x = vec(w1 X w2ᵀ). Computed in x's dtype."""
        (w1, r1), (w2, r2) = self._half(1), self._half(2)
        w1, w2 = w1.to(x.device, x.dtype), w2.to(x.device, x.dtype)
        y = w1 @ x.reshape(*x.shape[:-1], w1.shape[1], w2.shape[1]) @ w2.T
        return self._scale(r2 if r2 is not None else r1) * y.reshape(*x.shape[:-1], w1.shape[0] * w2.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.delta().shape)

    def updated(self, weight: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
        """The base weight with this module applied at `multiplier`, in float32."""
        w = weight.float()
        delta = self.delta().to(w.device)
        if delta.shape != w.shape:
            raise LoRAFormatError(f"{self.name}: updates a {tuple(delta.shape)} weight, the model's is "
                                  f"{tuple(w.shape)}")
        m = self._t("dora_scale")
        if not self.has_dora:
            return w + multiplier * delta
        merged = w + delta
        m = m.to(w.device)
        on_out = m.shape[0] == w.shape[0] and m.numel() == w.shape[0]
        norm = merged.norm(dim=1, keepdim=True) if on_out else merged.norm(dim=0, keepdim=True)
        full = merged * (m.view_as(norm) / (norm + torch.finfo(torch.float32).eps))
        return full if multiplier == 1 else w + multiplier * (full - w)


def read_lycoris(state_dict: Mapping[str, torch.Tensor]) -> dict[str, LycorisWeights]:
    """A LyCORIS state dict in kohya names -> {kohya module name: LycorisWeights}. Errors name the module."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        name, _, leaf = key.partition(".")
        if leaf not in LEAVES:
            raise LoRAFormatError(f"{key}: not a LyCORIS tensor this suite reads (LoKr, LoHa, LoCon, DoRA)")
        modules.setdefault(name, {})[leaf] = value
    out = {}
    for name, tensors in modules.items():
        if kohya_to_bfl(name) is None and kohya_to_te_path(name) is None:
            raise LoRAFormatError(f"{name}: not a FLUX.1 / CLIP-L / T5 layer in kohya names (a LyCORIS file for "
                                  "another model?)")
        out[name] = LycorisWeights(name, tensors)
    return out
