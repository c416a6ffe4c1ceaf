"""Scaled fp8 ("fp8_scaled") weights: each Linear weight stored as float8_e4m3fn plus a float32 scale.

The file layout is the one ComfyUI loads (its legacy `scaled_fp8` format, also what musubi-tuner's `--fp8_scaled`
builds in memory): `<layer>.weight` in fp8, `<layer>.scale_weight` beside it, and a marker tensor `scaled_fp8` at
the model's key prefix whose dtype names the fp8 dtype. Optional `<layer>.scale_input` tensors (ComfyUI's
activation scales for its own fp8 matmul) are accepted and not needed here.

The dequantised weight is `weight.to(dtype) * scale_weight.to(dtype)` -- ComfyUI's formula, the scale cast to the
compute dtype first -- with a scale of one element (per tensor), one per output row (`(out, 1)`, per channel) or
musubi's block-wise `(out, blocks, 1)` (each run of in_features / blocks inputs of a row shares one).
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch

MARKER = "scaled_fp8"
SCALE = "scale_weight"
INPUT_SCALE = "scale_input"
E4M3_MAX = 448.0  # largest finite float8_e4m3fn
MODES = ("tensor", "channel")


def scale_key(weight_key: str) -> str:
    """`a.b.weight` -> `a.b.scale_weight`."""
    return weight_key[: -len("weight")] + SCALE


def is_scale_key(key: str) -> bool:
    """A key that belongs to the scaled-fp8 layout rather than to the model (scales and the marker)."""
    return key.endswith(("." + SCALE, "." + INPUT_SCALE)) or key.rsplit(".", 1)[-1] == MARKER


def is_fp8_scaled(keys: Iterable[str]) -> bool:
    """Whether a file's keys (its header) are the scaled-fp8 layout."""
    return any(k.endswith("." + SCALE) or k.rsplit(".", 1)[-1] == MARKER for k in keys)


def check_scale_shape(key: str, scale_shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> None:
    """Raise a one-line ValueError unless `scale_shape` is a per-tensor, per-channel or block-wise scale of a
    weight of `weight_shape`."""
    out = weight_shape[0] if weight_shape else 0
    n = 1
    for s in scale_shape:
        n *= s
    ok = (n == 1 or tuple(scale_shape) in ((out, 1), (out,))
          or (len(scale_shape) == 3 and len(weight_shape) == 2 and scale_shape[0] == out and scale_shape[2] == 1
              and scale_shape[1] > 0 and weight_shape[1] % scale_shape[1] == 0))
    if not ok:
        raise ValueError(f"{key}: scale of shape {tuple(scale_shape)} does not fit a weight of shape "
                         f"{tuple(weight_shape)} (expected one value, ({out}, 1) or ({out}, blocks, 1))")


def dequantize(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """`weight.to(dtype) * scale.to(dtype)`, broadcast per tensor, per output row or per block; `scale` None: a
    plain cast (unscaled fp8)."""
    w = weight.to(dtype)
    if scale is None:
        return w
    if w is weight:  # already in `dtype`: multiply into a copy, never into the caller's tensor
        w = w.clone()
    s = scale.to(device=w.device, dtype=dtype)
    # in place on the fresh cast: one layer-sized temporary, not two (the same products as out of place)
    if s.dim() == 3:  # block-wise: (out, blocks, 1) against the weight viewed as (out, blocks, block size)
        w.view(s.shape[0], s.shape[1], -1).mul_(s)
        return w
    return w.mul_(s.reshape(()) if s.numel() == 1 else s.reshape(-1, 1))


def apply_scales(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], scales: Mapping[str, torch.Tensor],
                 dtype: torch.dtype | None) -> None:
    """Put a scaled file's `scales` (model weight key -> scale) to use before `state_dict` is assigned to `model`:
    with a `dtype`, each weight in `state_dict` is replaced by its dequantised value; with None, the weights stay
    fp8 and each scale becomes a non-persistent `scale_weight` buffer of its Linear (the model's state-dict keys
    stay as they were; library/memory/fp8.py's Fp8Linear applies it)."""
    for weight, scale in scales.items():
        module = model.get_submodule(weight[: -len(".weight")])
        if dtype is not None or not isinstance(module, torch.nn.Linear):
            # an embedding would ignore a scale buffer: dequantised (to float32 when the dtype is kept as stored)
            state_dict[weight] = dequantize(state_dict[weight], scale, dtype or torch.float32)
        else:
            module.register_buffer(SCALE, scale.float(), persistent=False)


def _ceil_to_bf16(x: torch.Tensor) -> torch.Tensor:
    # ComfyUI casts the scale to the compute dtype before multiplying: a scale exactly representable in bf16 (and
    # so in fp32) dequantises identically in either. Rounding the positive fp32 value up on the bf16 grid keeps
    # every |w| / scale within the fp8 range.
    bits = x.float().contiguous().view(torch.int32)
    return ((bits + 0xFFFF) & ~0xFFFF).view(torch.float32)


def quantize_weight(weight: torch.Tensor, mode: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, float32 scale) with scale = max|W| / 448 (rounded up to a bf16 value) over the whole tensor
    (`mode` "tensor": a 0-dim scale, as ComfyUI's layers hold it) or over each output row ("channel": `(out, 1)`,
    musubi-tuner's per-channel shape)."""
    if mode not in MODES:
        raise ValueError(f"fp8_scaled mode {mode!r}: expected one of {', '.join(MODES)}")
    w = weight.detach().float()
    amax = w.abs().amax() if mode == "tensor" else w.abs().amax(dim=1, keepdim=True)
    scale = _ceil_to_bf16(torch.clamp(amax / E4M3_MAX, min=2.0 ** -120))  # an all-zero weight keeps a finite scale
    q = (w / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def is_quantizable(key: str, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
    """A Linear weight of a FLUX transformer's state dict: a 2-D floating `.weight` (every 2-D weight there is one;
    not so in text encoders, whose embeddings are 2-D too)."""
    return key.endswith(".weight") and len(shape) == 2 and dtype.is_floating_point and dtype.itemsize > 1


def marker_tensor() -> torch.Tensor:
    # ComfyUI reads the fp8 dtype from the marker; a two-element marker asks it to multiply in the compute dtype
    # (its fp8 matmul with unscaled activations otherwise), which keeps its results equal to ours
    return torch.zeros(2, dtype=torch.float8_e4m3fn)


def quantize_state_dict_fp8_scaled(state_dict: Mapping[str, torch.Tensor], mode: str = "tensor",
                                   prefix: str = "", other_dtype: torch.dtype | None = None,
                                   linear_keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """A bf16/fp16/fp32 state dict as an fp8_scaled one: every Linear weight quantised (`quantize_weight`) with its
    `scale_weight`, the `<prefix>scaled_fp8` marker added, other tensors kept (cast to `other_dtype` when given).
    `linear_keys`: the Linear weights (None: every 2-D `.weight`, right for a FLUX transformer). Weights already in
    fp8 are refused: re-quantising them would compound the rounding."""
    linear = set(linear_keys) if linear_keys is not None else None
    out: dict[str, torch.Tensor] = {}
    for key, t in state_dict.items():
        if t.dtype.itemsize == 1 and t.is_floating_point():
            raise ValueError(f"{key}: already {t.dtype}; quantise to fp8_scaled from bf16/fp16/fp32 weights")
        if key in linear if linear is not None else is_quantizable(key, tuple(t.shape), t.dtype):
            out[key], out[scale_key(key)] = quantize_weight(t, mode)
        else:
            out[key] = t.to(other_dtype) if other_dtype is not None and t.is_floating_point() else t
    out[prefix + MARKER] = marker_tensor()
    return out


def scale_mode(scale_shapes: Iterable[tuple[int, ...]]) -> str:
    """"tensor" when every scale has one value, else "channel" (how a file was quantised, for re-writing it)."""
    return "tensor" if all(torch.Size(s).numel() == 1 for s in scale_shapes) else "channel"


# Streamed writing (library/formats/streaming_writer.py): the header lists each scaled weight, its scale right after
# it and the marker last; the producer quantises a weight when it is asked for and hands out its scale next.

def scaled_layout(layout: Iterable[tuple[str, tuple[int, ...], torch.dtype]], modes: Mapping[str, str]
                  ) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """A writer's (key, shape, dtype) layout with the weights in `modes` (key -> "tensor" / "channel") as scaled
    fp8 plus their scales, and the marker when any is."""
    out = []
    for key, shape, dtype in layout:
        if key in modes:
            scale_shape = () if modes[key] == "tensor" else (shape[0], 1)
            out += [(key, shape, torch.float8_e4m3fn), (scale_key(key), scale_shape, torch.float32)]
        else:
            out.append((key, shape, dtype))
    if modes:
        out.append((MARKER, (2,), torch.float8_e4m3fn))
    return out


def scaled_producer(produce: Callable[[str], torch.Tensor], modes: Mapping[str, str]) -> Callable[[str], torch.Tensor]:
    """`produce` for a `scaled_layout`: the weights in `modes` quantised (from whatever dtype `produce` gives them
    in, best float32 or the trained dtype: casting first would round twice), their scales, the marker."""
    scales: dict[str, torch.Tensor] = {}

    def wrapped(key: str) -> torch.Tensor:
        if key in scales:
            return scales.pop(key)
        if key == MARKER:
            return marker_tensor()
        t = produce(key)
        if key not in modes:
            return t
        q, s = quantize_weight(t, modes[key])
        scales[scale_key(key)] = s.cpu()
        return q.cpu()

    return wrapped
