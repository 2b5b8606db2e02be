"""Gradient (activation) checkpointing for any submodule: recompute its forward during backward
instead of keeping its activations. Trades roughly one extra forward for a large memory saving."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class Checkpointed(nn.Module):
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args):
        if self.training and torch.is_grad_enabled():
            return checkpoint(self.module, *args, use_reentrant=False)
        return self.module(*args)


def checkpoint_children(parent: nn.Module, names: list[str]) -> None:
    """Wrap ``parent.<name>`` (or the items of a ModuleList) in :class:`Checkpointed`.

    State-dict keys gain a ``.module`` level, so a run records whether it used checkpointing and
    inference rebuilds the same structure."""
    for name in names:
        child = getattr(parent, name)
        if isinstance(child, nn.ModuleList):
            for i, block in enumerate(child):
                child[i] = Checkpointed(block)
        else:
            setattr(parent, name, Checkpointed(child))
