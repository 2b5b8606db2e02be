"""Peak memory of training and inference, from a trace of the real model on the meta device.

``LiveTensorBytes`` is a tensor-lifetime tracker: a TorchDispatchMode that records every tensor
storage an operator creates and, through a weak reference to the storage, when it is freed. The
running sum of live bytes during a forward (and backward) pass of the real model is its activation
memory, whatever the architecture: no per-layer table. On the meta device the same trace costs
no memory and no compute; on the CPU the same tracker measures a real pass, which is how the
estimate is checked (``benchmarks/memory_estimate.py``).

Training peak = parameters + optimizer state (AdamW: 2 x parameters, allocated at the first step)
              + the traced peak of forward + backward (saved activations, transients, gradients).
Inference peak = parameters + the traced peak of one forward of ``sw_batch_size`` windows (no grad)
              + the sliding window's buffers: MONAI's float32 (classes + 1) x volume output and count
                map, or medseg's streaming frontier of open tiles + a uint8 label map
              + the preprocessed float32 input volume.
AMP: the trace runs in bfloat16 (activations at half size) and adds a bf16 copy of the weights,
which autocast keeps for the backward; parameters, gradients and optimizer state stay float32.
Allocator caching and fragmentation are not modelled (on CUDA, PyTorch's caching allocator
reports ``max_memory_allocated``, which is what this estimates).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

BYTES = {"fp32": 4, "bf16": 2}


class LiveTensorBytes(TorchDispatchMode):
    """Tracks the bytes of storages created by operators while active: ``live`` now, ``peak`` max."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._alive: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.live -= self._alive.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self._alive:
                    self._alive[key] = storage.nbytes()
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.live)
        return out


@dataclass
class MemoryEstimate:
    model: str
    roi: tuple[int, ...]
    batch: int
    amp: bool
    checkpointing: bool
    params: int
    parts: dict[str, int] = field(default_factory=dict)  # name -> bytes

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "roi": list(self.roi), "batch": self.batch, "amp": self.amp,
                "checkpointing": self.checkpointing, "params": self.params, "parts_bytes": self.parts, "total_bytes": self.total}


def trace_peak(model: torch.nn.Module, x: torch.Tensor, backward: bool) -> int:
    """Peak live bytes of tensors created by ``model(x)`` (and backward), not counting ``x`` and the
    parameters, which exist before."""
    with LiveTensorBytes() as tracker:
        if backward:
            y = model(x)
            y.float().sum().backward()
            del y
        else:
            with torch.no_grad():
                y = model(x)
                del y
    return tracker.peak


def _meta_model(name: str, roi, classes: int, args: dict | None, checkpointing: bool, amp: bool):
    from medseg.cost.counted import build_on_meta

    model = build_on_meta(name, roi, classes, args, grad_checkpointing=checkpointing)
    if amp:
        model = model.to(torch.bfloat16)
    return model


def training_memory(name: str, roi, batch: int = 2, classes: int = 14, args: dict | None = None, amp: bool = False,
                    checkpointing: bool = False) -> MemoryEstimate:
    model = _meta_model(name, roi, classes, args, checkpointing, amp)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    x = torch.empty((batch, 1, *roi), device="meta", dtype=torch.bfloat16 if amp else torch.float32)
    activations = trace_peak(model, x, backward=True)
    parts = {"parameters": params * 4, "optimizer_state (AdamW)": 2 * params * 4,
             "activations + gradients (traced)": activations + (params * 2 if amp else 0),  # bf16 grads in the trace -> fp32 below
             "input batch": x.numel() * x.element_size()}
    if amp:
        parts["bf16 weight copies (autocast)"] = params * 2
    return MemoryEstimate(name, tuple(roi), batch, amp, checkpointing, params, parts)


def inference_memory(name: str, roi, sw_batch_size: int = 4, classes: int = 14, args: dict | None = None, amp: bool = False,
                     volume=None, overlap: float = 0.25, method: str = "auto") -> MemoryEstimate:
    from medseg.engine.window import choose_method, frontier_voxels

    model = _meta_model(name, roi, classes, args, False, amp)
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    x = torch.empty((sw_batch_size, 1, *roi), device="meta", dtype=torch.bfloat16 if amp else torch.float32)
    # autocast keeps float32 weights and, under no_grad, caches no bf16 copies
    parts = {"parameters": params * BYTES["fp32"], "activations (traced)": trace_peak(model, x, backward=False),
             "window batch": x.numel() * x.element_size()}
    if volume is not None:
        voxels = math.prod(volume)
        chosen = choose_method(classes, volume, method)
        parts["input volume (float32)"] = voxels * 4
        if chosen == "monai":
            parts["MONAI output + count map (float32)"] = (classes + 1) * voxels * 4
            parts["argmax (int64)"] = voxels * 8
        else:
            parts["streaming frontier (float32)"] = int((classes + 1) * frontier_voxels(volume, roi, overlap) * 4)
            parts["label map (uint8)"] = voxels
    return MemoryEstimate(name, tuple(roi), sw_batch_size, amp, False, params, parts)


def plan_for_budget(name: str, budget_bytes: int, multiple: int, batches=(1, 2, 4), classes: int = 14, args: dict | None = None,
                    amp: bool = False, checkpointing: bool = False, max_side: int = 512) -> list[dict[str, Any]]:
    """nnU-Net-style: for each batch size, the largest isotropic ROI (a multiple of ``multiple``)
    whose training estimate fits ``budget_bytes``. Memory grows monotonically with the ROI, so the
    search is a bisection over multiples."""
    from medseg.models import get_spec

    lowest = max(multiple, max(get_spec(name).min_roi))
    plans = []
    for batch in batches:
        def fits(side: int, batch: int = batch) -> MemoryEstimate | None:
            est = training_memory(name, (side,) * 3, batch, classes, args, amp, checkpointing)
            return est if est.total <= budget_bytes else None

        lo, hi, best = lowest // multiple, max_side // multiple, None
        while lo <= hi:
            mid = (lo + hi) // 2
            est = fits(mid * multiple)
            if est is not None:
                best, lo = est, mid + 1
            else:
                hi = mid - 1
        plans.append({"batch": batch, "roi": list(best.roi) if best else None, "total_bytes": best.total if best else None})
    return plans


def parse_bytes(text: str) -> int:
    """'24GB' -> 24e9, '24GiB' -> 24 * 2^30, '512MB', '1e9'."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    s = text.strip().upper().replace(" ", "")
    number = s.rstrip("KMGTIB")
    unit = s[len(number):]
    if unit not in units:
        raise ValueError(f"cannot read {text!r} as a size (e.g. 24GB, 80GiB)")
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a size (e.g. 24GB, 80GiB)") from None
    if value <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return int(value * units[unit])
