"""Loss and optimiser named by a bundle, and their display names for runs (the learning-rate
schedule is in ``engine/state.py``: a pure function of the step, so resume can reproduce it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceFocalLoss, DiceLoss
from torch import nn

from medseg.config import TrainConfig

LOSS_NAMES = {"dice_ce": "DiceCE", "dice": "Dice", "ce": "CE", "dice_focal": "DiceFocal"}
OPTIMIZER_NAMES = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD"}


class CrossEntropy(nn.Module):
    """Cross-entropy on logits (B, K, ...) against a label map (B, 1, ...)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target[:, 0].long())


def make_loss(name: str) -> nn.Module:
    if name == "dice_ce":
        return DiceCELoss(to_onehot_y=True, softmax=True)
    if name == "dice":
        return DiceLoss(to_onehot_y=True, softmax=True)
    if name == "dice_focal":
        return DiceFocalLoss(to_onehot_y=True, softmax=True)
    if name == "ce":
        return CrossEntropy()
    raise ValueError(f"unknown loss {name!r}")  # the bundle schema rules this out


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's rate for this step, times each group's ``lr_scale`` (the head's, see
    :func:`medseg.models.param_groups`)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":  # nnU-Net's choice
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")
