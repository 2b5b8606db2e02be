"""FLOPs of the real registered models, counted with ``torch.utils.flop_counter.FlopCounterMode``
on the meta device: shapes flow through the real forward (and backward) with no memory and no
arithmetic, so Swin UNETR at 256^3 answers in seconds.

Why meta and not CPU: FlopCounterMode has no formula for the fused CPU kernel of
``scaled_dot_product_attention``, so on CPU it silently counts no attention matmuls; on the meta
device the op decomposes into counted matmuls. ``tests/test_cost.py`` checks counted attention
against the analytic 8 d^2 L + 4 d L^2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

TTA_PASSES = {"3d": 8, "2d": 4}  # mirroring along every subset of the axes (the 2D model skips the slice axis)


@dataclass
class ModelCost:
    model: str
    roi: tuple[int, ...]
    classes: int
    params: int
    forward_flops: int  # one window, batch 1
    train_flops: int  # forward + backward of one patch, counted
    per_module: dict[str, int] = field(default_factory=dict)  # top-level module -> forward FLOPs

    @property
    def forward_macs(self) -> int:
        return self.forward_flops // 2

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "roi": list(self.roi), "classes": self.classes, "params": self.params,
                "forward_flops": self.forward_flops, "forward_macs": self.forward_macs, "train_flops_per_patch": self.train_flops,
                "backward_over_forward": (self.train_flops - self.forward_flops) / self.forward_flops if self.forward_flops else None,
                "per_module_flops": self.per_module, "convention": "FLOPs = 2 x MACs; matmuls and convolutions only"}


def build_on_meta(name: str, roi, classes: int, args: dict | None = None, grad_checkpointing: bool = False) -> torch.nn.Module:
    """The registered model with its parameters on the meta device. Built on the CPU first (Swin
    UNETR's constructor calls .item(), which meta tensors refuse), then moved."""
    from medseg.errors import BundleError
    from medseg.models import create_model

    try:
        model = create_model(name, out_channels=classes, roi=tuple(roi), grad_checkpointing=grad_checkpointing, **(args or {}))
    except TypeError as e:  # a value of a type MONAI does not expect, should the registry let one through
        given = ", ".join(f"{k}={v!r}" for k, v in (args or {}).items())
        raise BundleError(f"model.args for {name} ({given}): {e}") from None
    return model.to("meta")


def count_flops(model: torch.nn.Module, x: torch.Tensor, backward: bool = False) -> tuple[int, dict[str, int]]:
    """Total FLOPs of ``model(x)`` (and its backward) and the forward FLOPs per top-level module."""
    with FlopCounterMode(display=False, depth=2) as counter:
        if backward and hasattr(model, "training_loss"):  # a model that trains on part of the patch (fcn_triplanar's slices)
            y = torch.zeros((x.shape[0], 1, *x.shape[2:]), device=x.device)
            model.training_loss(x, y, lambda logits, target: logits.float().sum()).backward()
        else:
            y = model(x)
            if backward:
                y.float().sum().backward()
    counts = counter.get_flop_counts()
    root = type(model).__name__
    per_module = {key.split(".", 1)[1]: sum(ops.values()) for key, ops in counts.items() if key.count(".") == 1 and key.startswith(root + ".")}
    return counter.get_total_flops(), per_module


def model_cost(name: str, roi, classes: int = 14, args: dict | None = None, in_channels: int = 1) -> ModelCost:
    model = build_on_meta(name, roi, classes, args)
    params = sum(p.numel() for p in model.parameters())
    x = torch.empty((1, in_channels, *roi), device="meta")
    model.eval()
    with torch.no_grad():
        fwd, per_module = count_flops(model, x)
    model.train()
    train, _ = count_flops(model, x, backward=True)
    return ModelCost(name, tuple(roi), classes, params, fwd, train, per_module)


def windows_for(volume, roi, overlap: float) -> int:
    """How many windows MONAI's sliding window places on ``volume`` (the same rule medseg streams)."""
    from medseg.cost.memory import check_overlap
    from medseg.engine.window import scan_interval

    check_overlap(overlap)
    padded = tuple(max(v, r) for v, r in zip(volume, roi))
    step = scan_interval(padded, roi, overlap)
    return math.prod(1 if v == r else math.ceil((v - r) / s) + 1 for v, r, s in zip(padded, roi, step))


def volume_cost(cost: ModelCost, volume, overlap: float, tta: bool = False, slice_model: bool = False) -> dict[str, Any]:
    n = windows_for(volume, cost.roi, overlap)
    passes = TTA_PASSES["2d" if slice_model else "3d"] if tta else 1
    return {"volume": list(volume), "overlap": overlap, "windows": n, "tta_passes": passes,
            "flops": n * passes * cost.forward_flops,
            "how": "windows x forward FLOPs of one window x TTA passes (window blending and argmax not counted)"}


def training_cost(cost: ModelCost, patches_per_iteration: int) -> dict[str, Any]:
    return {"patches_per_iteration": patches_per_iteration, "flops": patches_per_iteration * cost.train_flops,
            "rule_of_thumb_3x_forward": 3 * patches_per_iteration * cost.forward_flops,
            "how": "forward + backward counted on the meta device for one patch, times patches per iteration "
                   "(batch x samples per volume); the optimizer step is not counted"}
