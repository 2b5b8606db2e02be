"""Validation: whole volumes through the inference pipeline's streaming window, per-class Dice and IoU.

Memory follows the window, not the volume: the streaming window returns labels only (no classes x
volume buffer), and the scores come from a classes x classes confusion count (``np.bincount``)
instead of one-hot copies of prediction and ground truth. The semantics are MONAI's ``DiceMetric``
/ ``MeanIoU`` with ``include_background=False, ignore_empty=True, reduction="mean_batch"`` (the
tests check them against MONAI).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from medseg.config import Bundle
from medseg.engine.pipeline import WindowSpec, network_fn, sliding_window


def confusion(pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor, n_classes: int) -> np.ndarray:
    """``[true class, predicted class]`` voxel counts of two label maps of one shape."""
    p = np.asarray(pred.cpu() if isinstance(pred, torch.Tensor) else pred).astype(np.int64, copy=False).ravel()
    t = np.asarray(target.cpu() if isinstance(target, torch.Tensor) else target).ravel()
    t = np.rint(t).astype(np.int64) if np.issubdtype(t.dtype, np.floating) else t.astype(np.int64, copy=False)
    if p.shape != t.shape:
        raise ValueError(f"prediction and label differ in size: {p.size} vs {t.size} voxels")
    if t.size and (t.min() < 0 or t.max() >= n_classes or p.max() >= n_classes):
        raise ValueError(f"label values outside 0..{n_classes - 1}")
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def case_scores(conf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per foreground class Dice and IoU of one case; NaN for a class absent from its ground truth
    (MONAI ``ignore_empty``: such a case does not count for that class)."""
    tp = np.diag(conf)[1:].astype(np.float64)
    in_target = conf.sum(axis=1)[1:].astype(np.float64)
    in_pred = conf.sum(axis=0)[1:].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        dice = np.where(in_target > 0, 2 * tp / (in_target + in_pred), np.nan)
        iou = np.where(in_target > 0, tp / (in_target + in_pred - tp), np.nan)
    return dice, iou


def _cases(items) -> Iterable[dict]:
    """Items one by one. A Dataset is indexed (never through a DataLoader, whose iterator draws from
    the global torch RNG and would break an exact resume)."""
    if hasattr(items, "__len__") and hasattr(items, "__getitem__"):
        return (items[i] for i in range(len(items)))
    return iter(items)


@torch.no_grad()
def validate(model: torch.nn.Module, items, bundle: Bundle, device: torch.device, autocast: Callable = contextlib.nullcontext,
             on_case: Callable[[int, int | None], None] | None = None,
             on_window: Callable[[int, int], None] | None = None,
             reduce: Callable[[np.ndarray], np.ndarray] | None = None) -> dict[str, Any]:
    """Returns ``{"mean_dice", "mean_iou", "dice": {class: value}, "iou": {class: value}}`` over the
    foreground classes. ``items``: dicts with "image" and "label" tensors (1, X, Y, Z) on the model
    grid, as ``val_transforms`` makes them (a Dataset, iterated directly). A class absent from a
    case's ground truth does not count for that case; a class absent from every case is NaN and left
    out of the means. ``on_case(i, n)`` / ``on_window(i, n)`` may raise to stop validation.
    ``reduce``: sums an array over processes (each validated its own cases; distributed training),
    applied to the per-class score sums and case counts before the means."""
    n_classes = len(bundle.data.labels) + 1
    spec = WindowSpec.from_bundle(bundle, method="stream")
    predict = network_fn(model, autocast)
    total = {"dice": np.zeros(n_classes - 1), "iou": np.zeros(n_classes - 1)}
    counted = np.zeros(n_classes - 1)
    n = len(items) if hasattr(items, "__len__") else None
    model.eval()
    for i, item in enumerate(_cases(items)):
        image = torch.as_tensor(item["image"]).float()
        image = image[None] if image.ndim == 4 else image  # (1, C, X, Y, Z); a DataLoader batch also works
        label = torch.as_tensor(item["label"]).reshape(image.shape[2:])
        pred = sliding_window(image, predict, spec, n_classes, device, on_window=on_window).labels
        dice, iou = case_scores(confusion(pred, label, n_classes))
        present = np.isfinite(dice)
        total["dice"][present] += dice[present]
        total["iou"][present] += iou[present]
        counted += present
        if on_case is not None:
            on_case(i + 1, n)
    if reduce is not None:
        summed = reduce(np.stack([total["dice"], total["iou"], counted]))
        total["dice"], total["iou"], counted = summed[0], summed[1], summed[2]
    with np.errstate(divide="ignore", invalid="ignore"):
        per_dice = np.where(counted > 0, total["dice"] / counted, np.nan)
        per_iou = np.where(counted > 0, total["iou"] / counted, np.nan)
    names = bundle.data.labels
    return {
        "mean_dice": _nanmean(per_dice),
        "mean_iou": _nanmean(per_iou),
        "dice": {name: float(v) for name, v in zip(names, per_dice)},
        "iou": {name: float(v) for name, v in zip(names, per_iou)},
    }


def _nanmean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")
