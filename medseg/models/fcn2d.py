"""A 2D fully convolutional network (FCN-8s layout, Long et al. 2015) applied slice by slice.

The encoder is five VGG-like stages (two 3x3 convolutions with instance norm and ReLU, then 2x2 max
pooling). Class scores from stages 3, 4 and 5 are fused coarse to fine and upsampled to the input,
as in FCN-8s. :class:`SliceWise` folds the axial axis into the batch, so the network takes and returns
3D volumes (B, C, H, W, D) like the 3D models and trains on ROIs of depth 1 (axial slices).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn


class FCN2D(nn.Module):
    def __init__(self, in_channels: int = 1, out_channels: int = 2, features: tuple[int, ...] = (32, 64, 128, 256, 256),
                 norm: str = "instance", dropout: float = 0.0) -> None:
        super().__init__()
        if len(features) != 5:
            raise ValueError("features must list 5 channel counts, one per stage")
        stages, c_in = [], in_channels
        for c in features:
            stages.append(nn.Sequential(
                Convolution(2, c_in, c, kernel_size=3, norm=norm, act="relu", dropout=dropout),
                Convolution(2, c, c, kernel_size=3, norm=norm, act="relu", dropout=dropout),
            ))
            c_in = c
        self.stages = nn.ModuleList(stages)
        self.score3 = nn.Conv2d(features[2], out_channels, 1)
        self.score4 = nn.Conv2d(features[3], out_channels, 1)
        self.score5 = nn.Conv2d(features[4], out_channels, 1)
        self.refine = Convolution(2, out_channels + in_channels, out_channels, kernel_size=3, conv_only=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats, h = [], x
        for i, stage in enumerate(self.stages):
            h = stage(h)
            feats.append(h)
            if i < len(self.stages) - 1:
                h = F.max_pool2d(h, 2, ceil_mode=True)
        s = self.score5(feats[4])
        s = F.interpolate(s, size=feats[3].shape[2:], mode="bilinear", align_corners=False) + self.score4(feats[3])
        s = F.interpolate(s, size=feats[2].shape[2:], mode="bilinear", align_corners=False) + self.score3(feats[2])
        s = F.interpolate(s, size=x.shape[2:], mode="bilinear", align_corners=False)
        return self.refine(torch.cat([s, x], dim=1))


class SliceWise(nn.Module):
    """Apply a 2D network to every axial slice of a (B, C, H, W, D) volume."""

    def __init__(self, net2d: nn.Module) -> None:
        super().__init__()
        self.net2d = net2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w, d = x.shape
        slices = x.permute(0, 4, 1, 2, 3).reshape(b * d, c, h, w)
        y = self.net2d(slices)
        return y.reshape(b, d, y.shape[1], h, w).permute(0, 2, 3, 4, 1)
