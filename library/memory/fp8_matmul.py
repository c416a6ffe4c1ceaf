"""The fp8 compute path: a frozen fp8 Linear multiplied with `torch._scaled_mm` instead of upcasting its weight.

The activations are quantised to float8_e4m3fn on the fly (per tensor, or per row when the weight has per-channel
scales) and the product comes back in the compute dtype with both scales applied inside the matmul. Only where the
hardware and torch support it: CUDA with compute capability 8.9 or newer (Ada, Hopper, Blackwell), in_features and
out_features multiples of 16, a bf16/fp16 output; per-channel (row-wise) scaling needs 9.0 and a bf16 output.
Anything else returns None and the caller upcasts. Which path ran is logged once per process and device.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from library.formats.fp8_scaled import E4M3_MAX

logger = logging.getLogger(__name__)
_logged: set[tuple[str, str]] = set()


def _log_once(device: torch.device, path: str) -> None:
    key = (str(device), path)
    if key not in _logged:
        _logged.add(key)
        logger.info("fp8 Linears on %s: %s", device, path)


def scaled_mm_reason(device: torch.device) -> str | None:
    """Why `torch._scaled_mm` cannot run on `device` (None: it can)."""
    if device.type != "cuda":
        return f"{device.type} has no fp8 matmul"
    if not hasattr(torch, "_scaled_mm"):
        return "this torch has no torch._scaled_mm"
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        return f"compute capability {cap[0]}.{cap[1]} < 8.9"
    return None


def scaled_mm_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None,
                     out_dtype: torch.dtype) -> torch.Tensor | None:
    """x @ (weight * scale).T + bias through torch._scaled_mm, or None when this layer or device cannot use it
    (the caller then upcasts; the reason is logged once)."""
    reason = scaled_mm_reason(x.device) or _shape_reason(weight, scale, out_dtype, x.device)
    if reason is not None:
        _log_once(x.device, f"upcast to {out_dtype} ({reason})")
        return None
    out_features, in_features = weight.shape
    x2 = x.reshape(-1, in_features)
    rows = x2.shape[0]
    pad = -rows % 16  # some torch versions want every side of mat1 a multiple of 16: zero rows, sliced off below
    if scale is not None and scale.numel() > 1:  # row-wise: one activation scale per row, weight scale per column
        x_scale = (x2.abs().amax(dim=1, keepdim=True).float() / E4M3_MAX).clamp(min=1e-12)
        x_scale = torch.cat((x_scale, x_scale.new_ones(pad, 1))) if pad else x_scale
        w_scale = scale.to(device=x.device, dtype=torch.float32).reshape(1, out_features)
    else:
        x_scale = (x2.abs().amax().float() / E4M3_MAX).clamp(min=1e-12)
        w_scale = (scale.to(device=x.device, dtype=torch.float32).reshape(()) if scale is not None
                   else torch.ones((), device=x.device, dtype=torch.float32))
    q = x2.float() / (x_scale[:rows] if x_scale.dim() else x_scale)
    q = F.pad(q, (0, 0, 0, pad)) if pad else q
    xq = q.clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    del q
    # mat2 must be column-major: the transpose of the row-major (out, in) weight is exactly that, no copy
    out = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=out_dtype)
    if isinstance(out, tuple):  # torch < 2.5 also returned the amax
        out = out[0]
    if pad:
        out = out[:rows].clone()  # a tensor of its own: the caller hands out a non-view of it
    if bias is not None:  # added here rather than by _scaled_mm, whose bias support varies with the scaling mode
        out += bias.to(out_dtype)
    _log_once(x.device, "torch._scaled_mm (fp8 matmul, activations quantised on the fly)")
    return out.reshape(*x.shape[:-1], out_features)


def _shape_reason(weight: torch.Tensor, scale: torch.Tensor | None, out_dtype: torch.dtype,
                  device: torch.device) -> str | None:
    if weight.dtype != torch.float8_e4m3fn:
        return f"weights in {weight.dtype}"
    out_features, in_features = weight.shape
    if in_features % 16 or out_features % 16:
        return f"a {out_features}x{in_features} weight (both sides must be multiples of 16)"
    if out_dtype not in (torch.bfloat16, torch.float16):
        return f"compute dtype {out_dtype}"
    if scale is not None and scale.dim() == 3:
        return "block-wise scales"
    if scale is not None and scale.numel() > 1 and (
            torch.cuda.get_device_capability(device) < (9, 0) or out_dtype != torch.bfloat16):
        return "per-channel scales need compute capability 9.0 and bf16"
    return None
