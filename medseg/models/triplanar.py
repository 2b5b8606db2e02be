"""Tri-planar FCN: one 2D FCN per axis (axial, coronal, sagittal), probabilities fused per voxel.

This is the slice-by-slice design of Zhou et al. 2017 ("Deep learning of the sectional appearances
of 3D CT images for anatomical structure segmentation"): each 2D network sees the volume cut along
its own axis, so together they see context along all three, which the axial-only :class:`SliceWise`
cannot. The networks are independent; they are trained together only in the sense that each step
gives each of them slices cut from the same 3D patches (:meth:`TriPlanar.training_loss`).

Inference is a plain 3D model to the sliding window: :meth:`TriPlanar.forward` takes a window
(B, C, X, Y, Z) in RAS order, runs every slice along each axis in chunks, and returns the logarithm
of the fused class probabilities (so a softmax of the output gives them back exactly). The only
class-sized buffer is the window's own fused sum: nothing the size of the volume per axis.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from medseg.models.fcn2d import FCN2D

# RAS order (B, C, X, Y, Z): a sagittal slice has constant X, a coronal one constant Y, an axial one constant Z.
AXES = {"sagittal": 2, "coronal": 3, "axial": 4}
FUSIONS = ("mean", "vote")
SLICE_CHUNK = 32  # slices per 2D forward at inference: bounds the 2D activations


def _to_slices(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(B, C, X, Y, Z) -> (B * n, C, a, b): the slices along ``dim`` folded into the batch."""
    order = [0, dim, 1] + [d for d in (2, 3, 4) if d != dim]
    y = x.permute(*order)
    return y.reshape(-1, *y.shape[2:]), tuple(y.shape)


def _from_slices(y: torch.Tensor, shape: tuple[int, ...], dim: int) -> torch.Tensor:
    """The inverse of :func:`_to_slices` (channels may differ)."""
    b, n, _, a, c = shape
    z = y.reshape(b, n, y.shape[1], a, c)
    order = [0, dim, 1] + [d for d in (2, 3, 4) if d != dim]
    inverse = [order.index(i) for i in range(5)]
    return z.permute(*inverse)


class TriPlanar(nn.Module):
    """``axes``: which 2D networks (any of axial, coronal, sagittal); ``fusion``: ``mean`` of their
    softmax, or ``vote`` (majority of their argmax, ties broken by the mean probability);
    ``train_slices``: slices per axis cut from each training patch, drawn from its middle half,
    where class-balanced sampling put the voxel it centred on."""

    def __init__(self, in_channels: int = 1, out_channels: int = 2, features: tuple[int, ...] = (32, 64, 128, 256, 256),
                 norm: str = "instance", dropout: float = 0.0, axes: tuple[str, ...] = ("axial", "coronal", "sagittal"),
                 fusion: str = "mean", train_slices: int = 4) -> None:
        super().__init__()
        axes = tuple(axes)
        if not axes or any(a not in AXES for a in axes) or len(set(axes)) != len(axes):
            raise ValueError(f"axes must name distinct axes among {', '.join(AXES)}, got {list(axes)}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")
        if train_slices < 1:
            raise ValueError(f"train_slices must be at least 1, got {train_slices}")
        self.axes, self.fusion, self.train_slices = axes, fusion, int(train_slices)
        self.nets = nn.ModuleDict({a: FCN2D(in_channels, out_channels, features, norm, dropout) for a in axes})

    def axis_logits(self, x: torch.Tensor, axis: str, chunk: int | None = SLICE_CHUNK) -> torch.Tensor:
        """The logits of one axis's network over every slice of ``x``, as a (B, K, X, Y, Z) volume;
        ``chunk`` slices at a time (None: all at once, as an exported graph runs it)."""
        dim = AXES[axis]
        slices, shape = _to_slices(x, dim)
        if chunk is None:
            out = self.nets[axis](slices)
        else:
            out = torch.cat([self.nets[axis](slices[i:i + chunk]) for i in range(0, slices.shape[0], chunk)])
        return _from_slices(out, shape, dim)

    def fused_probabilities(self, x: torch.Tensor, axes: tuple[str, ...] | None = None, chunk: int | None = SLICE_CHUNK) -> torch.Tensor:
        """(B, K, X, Y, Z) fused class probabilities of ``axes`` (default: all of the model's)."""
        axes = tuple(axes or self.axes)
        total = votes = None
        for axis in axes:
            p = torch.softmax(self.axis_logits(x, axis, chunk).float(), dim=1)
            total = p if total is None else total + p
            if self.fusion == "vote":
                one_hot = torch.zeros_like(p).scatter_(1, p.argmax(1, keepdim=True), 1.0)
                votes = one_hot if votes is None else votes + one_hot
            del p
        mean = total / len(axes)
        if self.fusion == "vote":
            # majority first; the mean probability (< 1) only decides between equal vote counts
            fused = votes + mean
            return fused / fused.sum(1, keepdim=True)
        return mean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log of the fused probabilities: a softmax of this returns them exactly."""
        return torch.log(self.fused_probabilities(x).clamp_min(1e-12))

    def training_loss(self, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable) -> torch.Tensor:
        """Each axis's network on ``train_slices`` slices per patch cut along its axis, each scored
        by ``loss_fn`` against the label slices; the mean over axes. Slice positions come from the
        global torch RNG, which a checkpoint saves, so a resumed run draws the same ones."""
        losses = []
        for axis in self.axes:
            dim = AXES[axis]
            size = x.shape[dim]
            lo, hi = size // 4, max(size // 4 + 1, size - size // 4)
            k = min(self.train_slices, hi - lo)
            idx = (torch.randperm(hi - lo)[:k] + lo).to(x.device)
            xs, _ = _to_slices(x.index_select(dim, idx), dim)
            ys, _ = _to_slices(y.index_select(dim, idx), dim)
            losses.append(loss_fn(self.nets[axis](xs), ys))
        return torch.stack(losses).mean()
