"""Validation: whole volumes through MONAI's sliding-window inferer, per-class Dice and IoU."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.metrics import DiceMetric, MeanIoU
from monai.networks.utils import one_hot

from medseg.config import Bundle


@torch.no_grad()
def validate(model: torch.nn.Module, loader, bundle: Bundle, device: torch.device,
             autocast=contextlib.nullcontext, on_case=None) -> dict[str, Any]:
    """Returns ``{"mean_dice", "mean_iou", "dice": {class: value}, "iou": {class: value}}`` over the
    foreground classes. A class absent from a case's ground truth does not count for that case
    (MONAI ``ignore_empty``); a class absent from every case is NaN and left out of the means."""
    n_classes = len(bundle.data.labels) + 1
    sw = bundle.sliding_window
    dice = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True)
    iou = MeanIoU(include_background=False, reduction="mean_batch", ignore_empty=True)
    model.eval()
    for i, batch in enumerate(loader):
        image = batch["image"].to(device)
        label = batch["label"].to(device)
        with autocast():
            logits = sliding_window_inference(image, bundle.infer_roi, sw.sw_batch_size, model, overlap=sw.overlap, mode=sw.mode)
        pred = one_hot(logits.float().argmax(dim=1, keepdim=True), n_classes)
        target = one_hot(label.long(), n_classes)
        dice(y_pred=pred, y=target)
        iou(y_pred=pred, y=target)
        if on_case is not None:
            on_case(i + 1)
    per_dice = dice.aggregate().cpu().numpy()
    per_iou = iou.aggregate().cpu().numpy()
    names = bundle.data.labels
    return {
        "mean_dice": _nanmean(per_dice),
        "mean_iou": _nanmean(per_iou),
        "dice": {n: float(v) for n, v in zip(names, per_dice)},
        "iou": {n: float(v) for n, v in zip(names, per_iou)},
    }


def _nanmean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")
