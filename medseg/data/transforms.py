"""MONAI dictionary transform chains built from a bundle.

train: load -> channel first -> map label values -> RAS -> resample to ``data.spacing`` -> intensity
normalisation (HU window to [0, 1], or CT z-score) -> crop to the body -> pad -> patch sampling
(pos/neg or class balanced) -> the ``train.augment`` preset on each patch (``data/augment.py``).
val: the same up to the crop; no sampling (validation uses the sliding window).
inference: :func:`geometry_steps` on the scan held in memory (see ``engine/infer.py``).
"""

from __future__ import annotations

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    BorderPadd,
    CenterSpatialCropd,
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandCropByLabelClassesd,
    RandCropByPosNegLabeld,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from medseg.config import Bundle, CTStats
from medseg.data.augment import crop_size, probabilities, spatial_and_intensity

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


BODY_HU = -500.0  # air below, tissue above: the body box for "ct" normalisation


def intensity_map(bundle: Bundle) -> tuple[float, float, float, float]:
    """(HU low, HU high, value low, value high): the linear map, clipped at both ends, from
    Hounsfield units to the network's input. "window": the HU window onto [0, 1]. "ct": clipping to
    the foreground percentiles then z-scoring is the same map onto [(low-mean)/std, (high-mean)/std]."""
    d = bundle.data
    if d.normalization == "window":
        lo, hi = d.hu_window
        return float(lo), float(hi), 0.0, 1.0
    s = d.ct_stats
    if not isinstance(s, CTStats):
        raise ValueError("data.ct_stats is still \"auto\": plan the bundle first (medseg.plan.apply_plan)")
    return s.low, s.high, (s.low - s.mean) / s.std, (s.high - s.mean) / s.std


def pad_value(bundle: Bundle) -> float:
    """What training pads patches with, and inference pads windows with: air, the low end of the
    intensity map (0 for the HU window, (low - mean) / std for "ct"; a 0 there is soft tissue).
    The two must agree: a network trained on a body surrounded by air and run on one surrounded by
    soft tissue segments that "tissue" (this broke every phantom model once, docs/benchmarks.md)."""
    return intensity_map(bundle)[2]


def body_threshold(bundle: Bundle) -> float:
    """Input values above this are body: the crop of training, validation and inference. "window":
    above its low end (as before); "ct": above -500 HU, or the clip's low end if that is higher."""
    lo, hi, a, b = intensity_map(bundle)
    if bundle.data.normalization == "window":
        return a
    hu = max(BODY_HU, lo)
    return a + (b - a) * (hu - lo) / (hi - lo)


def geometry_steps(bundle: Bundle, keys=KEYS) -> list:
    """RAS, the bundle's spacing, the intensity map: the one definition used by training, validation
    and inference (which applies it to an in-memory image), so they cannot drift apart."""
    lo, hi, a, b = intensity_map(bundle)
    return [
        Orientationd(keys=list(keys), axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(keys=list(keys), pixdim=bundle.data.spacing, mode=["bilinear", "nearest"][: len(keys)]),
        ScaleIntensityRanged(keys="image", a_min=lo, a_max=hi, b_min=a, b_max=b, clip=True),
    ]


def crop_body(bundle: Bundle, keys=KEYS):
    threshold = body_threshold(bundle)
    return CropForegroundd(keys=list(keys), source_key="image", select_fn=lambda x: x > threshold, allow_smaller=True)


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
    p = probabilities(t.augment, t.augment_p)
    crop = crop_size(t.roi, p)
    low = pad_value(bundle)  # air, as inference pads its windows
    margin = [(c - r) // 2 for c, r in zip(crop, t.roi)]
    steps = preprocess(bundle, lut) + [
        crop_body(bundle),
        # A larger crop must still be centrable on a voxel at the volume's edge: pad by the margin.
        BorderPadd(keys="image", spatial_border=margin, value=low),
        BorderPadd(keys="label", spatial_border=margin, value=0),
        SpatialPadd(keys="image", spatial_size=crop, value=low),
        SpatialPadd(keys="label", spatial_size=crop, value=0),
        EnsureTyped(keys=keys, track_meta=False),
    ]
    if t.sampling == "pos_neg":
        steps.append(
            RandCropByPosNegLabeld(
                keys=keys, label_key="label", spatial_size=crop, pos=t.pos_neg[0], neg=t.pos_neg[1],
                num_samples=t.samples_per_volume, image_key="image", image_threshold=body_threshold(bundle),
            )
        )
    else:
        steps.append(
            RandCropByLabelClassesd(
                keys=keys, label_key="label", spatial_size=crop, num_classes=len(bundle.data.labels) + 1,
                num_samples=t.samples_per_volume, image_key="image", image_threshold=body_threshold(bundle), warn=False,
            )
        )
    steps += spatial_and_intensity(t.roi, p, bundle.data.labels, bundle.data.normalization, intensity_map(bundle))
    if crop != list(t.roi):  # every patch leaves at the ROI, whether or not it was rotated
        steps.append(CenterSpatialCropd(keys=keys, roi_size=t.roi))
    return Compose(steps)


def val_transforms(bundle: Bundle, lut: np.ndarray) -> Compose:
    keys = list(KEYS)
    return Compose(
        preprocess(bundle, lut)
        + [
            crop_body(bundle),
            EnsureTyped(keys=keys, track_meta=False),
        ]
    )
