"""MONAI dictionary transform chains built from a bundle.

train: load -> channel first -> map label values -> RAS -> resample to ``data.spacing`` -> HU window
to [0, 1] -> crop to the body -> pad to the ROI -> patch sampling (pos/neg or class balanced) ->
light augmentation (flips, 90-degree rotations, intensity shift: the BTCV recipe).
val: the same up to the crop; no sampling (validation uses the sliding window).
inference: :func:`geometry_steps` on the scan held in memory (see ``engine/infer.py``).
"""

from __future__ import annotations

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandCropByLabelClassesd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotate90d,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from medseg.config import Bundle

KEYS = ("image", "label")


class MapLabelsd(MapTransform):
    """Send source label values through a lookup table (unlisted classes become background)."""

    def __init__(self, keys: KeysCollection, lut: np.ndarray) -> None:
        super().__init__(keys)
        self.lut = torch.as_tensor(lut.astype(np.int64))

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            mapped = self.lut[torch.as_tensor(x).long()].to(x.dtype)
            out = x.clone()
            out.copy_(mapped)  # keep MetaTensor geometry
            d[key] = out
        return d


def geometry_steps(bundle: Bundle, keys=KEYS) -> list:
    """RAS, the bundle's spacing, the HU window: the one definition used by training, validation
    and inference (which applies it to an in-memory image), so they cannot drift apart."""
    lo, hi = bundle.data.hu_window
    return [
        Orientationd(keys=list(keys), axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(keys=list(keys), pixdim=bundle.data.spacing, mode=["bilinear", "nearest"][: len(keys)]),
        ScaleIntensityRanged(keys="image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True),
    ]


def preprocess(bundle: Bundle, lut: np.ndarray) -> list:
    """Load image and label from files, map label values, then :func:`geometry_steps`."""
    keys = list(KEYS)
    return [
        LoadImaged(keys=keys, reader="NibabelReader", image_only=True),
        EnsureChannelFirstd(keys=keys),
        MapLabelsd(keys="label", lut=lut),
        *geometry_steps(bundle, keys),
    ]


def train_transforms(bundle: Bundle, lut: np.ndarray) -> Compose:
    t = bundle.train
    keys = list(KEYS)
    steps = preprocess(bundle, lut) + [
        CropForegroundd(keys=keys, source_key="image", allow_smaller=True),
        SpatialPadd(keys=keys, spatial_size=t.roi),
        EnsureTyped(keys=keys, track_meta=False),
    ]
    if t.sampling == "pos_neg":
        steps.append(
            RandCropByPosNegLabeld(
                keys=keys, label_key="label", spatial_size=t.roi, pos=t.pos_neg[0], neg=t.pos_neg[1],
                num_samples=t.samples_per_volume, image_key="image", image_threshold=0,
            )
        )
    else:
        steps.append(
            RandCropByLabelClassesd(
                keys=keys, label_key="label", spatial_size=t.roi, num_classes=len(bundle.data.labels) + 1,
                num_samples=t.samples_per_volume, image_key="image", image_threshold=0, warn=False,
            )
        )
    if t.augment:
        steps += [
            RandFlipd(keys=keys, spatial_axis=[0], prob=0.1),
            RandFlipd(keys=keys, spatial_axis=[1], prob=0.1),
            RandFlipd(keys=keys, spatial_axis=[2], prob=0.1),
        ]
        if t.roi[0] == t.roi[1]:  # a 90-degree turn keeps the patch shape only for a square in-plane ROI
            steps.append(RandRotate90d(keys=keys, prob=0.1, max_k=3))
        steps += [
            RandShiftIntensityd(keys="image", offsets=0.10, prob=0.5),
        ]
    return Compose(steps)


def val_transforms(bundle: Bundle, lut: np.ndarray) -> Compose:
    keys = list(KEYS)
    return Compose(
        preprocess(bundle, lut)
        + [
            CropForegroundd(keys=keys, source_key="image", allow_smaller=True),
            EnsureTyped(keys=keys, track_meta=False),
        ]
    )
