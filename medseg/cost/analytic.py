"""Closed-form costs of self-attention and convolution. Pure Python: no torch import, so
``medseg flops --shape ...`` answers instantly.

Convention, everywhere in medseg: FLOPs = 2 x multiply-accumulates (MACs). Only matrix products
and convolutions are counted (as torch's FlopCounterMode does); softmax, norms, biases and
activations are not.

Self-attention over L tokens of d channels (one layer, all heads together):
  Q, K, V and output projections: 4 x (2 d^2 L)  = 8 d^2 L
  Q K^T and (softmax) V:          2 x (2 L^2 d)  = 4 d L^2
  total                                          = 8 d^2 L + 4 d L^2
Shifted-window attention applies the same formula inside each window of W tokens, times the number
of windows; a shape that the window does not divide is padded up to a multiple (as Swin does), and
an axis shorter than the window uses the whole axis as the window (as MONAI's Swin does).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


def attention_flops(tokens: int, channels: int) -> int:
    """FLOPs of one global self-attention layer: 8 d^2 L + 4 d L^2."""
    return 8 * channels**2 * tokens + 4 * channels * tokens**2


@dataclass(frozen=True)
class WindowPlan:
    window: tuple[int, ...]  # the window actually used per axis
    padded: tuple[int, ...]  # the shape after padding to a multiple of the window
    windows: int  # number of windows
    tokens_per_window: int

    @property
    def padded_tokens(self) -> int:
        return self.windows * self.tokens_per_window


def window_plan(spatial: tuple[int, ...], window: tuple[int, ...]) -> WindowPlan:
    if len(spatial) != len(window):
        raise ValueError(f"window {window} has {len(window)} axes, the shape has {len(spatial)}")
    used = tuple(min(w, s) for s, w in zip(spatial, window))
    padded = tuple(math.ceil(s / w) * w for s, w in zip(spatial, used))
    count = math.prod(p // w for p, w in zip(padded, used))
    return WindowPlan(used, padded, count, math.prod(used))


def window_attention_flops(spatial: tuple[int, ...], channels: int, window: tuple[int, ...]) -> int:
    plan = window_plan(spatial, window)
    return plan.windows * attention_flops(plan.tokens_per_window, channels)


def attention_matrix_bytes(tokens_per_block: int, blocks: int = 1, bytes_per_value: int = 4) -> int:
    """Memory of the L x L attention matrix (one head), summed over blocks (windows)."""
    return blocks * tokens_per_block**2 * bytes_per_value


@dataclass(frozen=True)
class ConvCost:
    dims: int
    input_shape: tuple[int, ...]  # spatial..., channels (channels last, as in the course)
    output_shape: tuple[int, ...]
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    params: int  # weights + bias
    weights: int  # without bias
    macs: int
    flops: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def conv_cost(input_shape: tuple[int, ...], out_channels: int, kernel: int | tuple[int, ...], stride: int | tuple[int, ...] = 1,
              padding: int | tuple[int, ...] | str = 0, bias: bool = True) -> ConvCost:
    """A dense convolution on a channels-last input (spatial..., C_in). ``padding="same"`` keeps the
    spatial size at stride 1 (k // 2 on each side for odd k)."""
    *spatial, c_in = input_shape
    n = len(spatial)
    if n not in (1, 2, 3):
        raise ValueError(f"input shape {tuple(input_shape)} must be 1 to 3 spatial sizes then channels")
    k = _tuple(kernel, n, "kernel")
    s = _tuple(stride, n, "stride")
    p = tuple(kk // 2 for kk in k) if padding == "same" else _tuple(padding, n, "padding")
    out = tuple((size + 2 * pp - kk) // ss + 1 for size, kk, ss, pp in zip(spatial, k, s, p))
    if min(out) < 1:
        raise ValueError(f"kernel {k} does not fit the input {tuple(spatial)} with padding {p}")
    weights = out_channels * c_in * math.prod(k)
    macs = math.prod(out) * out_channels * c_in * math.prod(k)
    return ConvCost(n, tuple(input_shape), (*out, out_channels), k, s, p, weights + (out_channels if bias else 0), weights, macs, 2 * macs)


def _tuple(v, n: int, name: str) -> tuple[int, ...]:
    t = (v,) * n if isinstance(v, int) else tuple(v)
    if len(t) != n or any(x < 0 for x in t) or (name != "padding" and any(x < 1 for x in t)):
        raise ValueError(f"{name} {v} must be {n} {'non-negative' if name == 'padding' else 'positive'} integers")
    return t


def attention_report(shape: tuple[int, ...], window: tuple[int, ...], kernel: int = 3, stride: int = 1) -> dict[str, Any]:
    """The comparison ``medseg flops --shape`` prints: global vs windowed attention vs Conv3D
    (d -> d channels, ``kernel``, ``stride``, "same" padding) at one feature-map shape."""
    *spatial, d = shape
    spatial = tuple(spatial)
    tokens = math.prod(spatial)
    plan = window_plan(spatial, window)
    glob = attention_flops(tokens, d)
    win = plan.windows * attention_flops(plan.tokens_per_window, d)
    conv = conv_cost((*spatial, d), d, kernel, stride, "same")
    return {
        "convention": "FLOPs = 2 x MACs; matmuls and convolutions only",
        "shape": list(shape), "tokens": tokens, "channels": d,
        "global": {"flops": glob, "attention_matrix_bytes_fp32": attention_matrix_bytes(tokens, 1, 4),
                   "attention_matrix_bytes_bf16": attention_matrix_bytes(tokens, 1, 2)},
        "window": {"window": list(plan.window), "padded_shape": list(plan.padded), "padded": plan.padded != spatial,
                   "windows": plan.windows, "tokens_per_window": plan.tokens_per_window, "flops": win,
                   "attention_matrix_bytes_fp32": attention_matrix_bytes(plan.tokens_per_window, plan.windows, 4),
                   "attention_matrix_bytes_bf16": attention_matrix_bytes(plan.tokens_per_window, plan.windows, 2)},
        "global_over_window": glob / win,
        "conv": conv.as_dict(),
    }


def human(n: float, unit: str = "FLOPs") -> str:
    """17660905521152 -> '17.66 TFLOPs' (decimal prefixes)."""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {prefix}{unit}"
    return f"{n:.0f} {unit}"


def human_bytes(n: float) -> str:
    """Decimal and binary, since papers use both: '68.72 GB (64.00 GiB)'."""
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            for bprefix, bscale in (("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
                if n >= bscale:
                    return f"{n / scale:.2f} {prefix}B ({n / bscale:.2f} {bprefix}B)"
            return f"{n / scale:.2f} {prefix}B"
    return f"{n:.0f} B"
