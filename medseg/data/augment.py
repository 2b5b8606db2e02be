"""Augmentation presets: MONAI transforms applied to each training patch after it is cropped.

``train.augment`` picks a preset, ``train.augment_p`` overrides the probability of any transform by
name (0 turns it off, and a name from another preset adds it). What each does, per patch:

=============  =========================================================================  ========
name           transform (MONAI)                                                          strong
=============  =========================================================================  ========
rotate_scale   RandAffined: rotation (3D: +-30 deg about each axis; 2D: +-180 deg in the   0.2
               slice) and scaling 0.7-1.4, on a larger crop resampled to the ROI
elastic        Rand3DElasticd: smooth deformation (sigma 5-8, magnitude 50-150 voxels)     0 (opt.)
low_res        RandSimulateLowResolutiond: down- then up-sample by 0.5-1 (3D only)         0.25
noise          RandGaussianNoised: additive gaussian noise, std up to 0.1                  0.1
blur           RandGaussianSmoothd: gaussian blur, sigma 0.5-1 voxel (in-slice for 2D)      0.2
brightness     RandScaleIntensityd: multiply by 0.75-1.25                                  0.15
contrast       RandScaleIntensityFixedMeand: scale around the mean 0.75-1.25, range kept   0.15
gamma          RandAdjustContrastd: gamma 0.7-1.5, mean and std kept                       0.3
mirror         RandFlipd per axis                                                          0.5
enhance        RandContrastPhased (medseg's, enhance.py): contrast phases, below           0 (opt.)
=============  =========================================================================  ========

``enhance`` is the one transform MONAI has no equivalent for. A model trained on one contrast phase
learns its organs' Hounsfield units: trained on a non-contrast scan (spleen ~35 HU) it misses a
portal-venous spleen (~160 HU) in another scan. ``enhance`` adds, in HU, a random offset (0-50 HU)
to all soft tissue and on top of it one per labelled class (0-150 HU, drawn per class, so the
organs' order of brightness changes too), with a weight that fades to zero for fat (below
-100 HU) and bone (above 250 HU). Then the network must tell organs apart by shape, position and
texture. The label is only read, never changed. It is off by default: on the real-CT benchmark
(train on non-contrast ``ct_abdomen_3mm``, segment contrast-enhanced ``msd_spleen_8``) it lowered
the spleen Dice in every run (docs/benchmarks.md); the normalisation's wider clip did what it was
meant to. ``train.augment_p: {"enhance": 0.3}`` switches it on.

"light" is the BTCV recipe: ``flip`` (RandFlipd, 0.1 per axis), ``rot90`` (RandRotate90d in the
slice plane, 0.1) and ``shift`` (RandShiftIntensityd +-0.1, 0.5). The magnitudes are nnU-Net's,
defined on z-scored intensities (``data.normalization: "ct"``); with the [0, 1] HU window they are
scaled by a quarter, the ratio of a typical soft-tissue standard deviation to the window width.

Where medseg differs from nnU-Net: mirroring and 90-degree turns that would swap the patient's left
and right are left out when a class name says ``left`` or ``right`` (a mirrored left kidney is a
right kidney; nnU-Net mirrors anyway, TotalSegmentator switches it off for the same reason).
"""

from __future__ import annotations

import math

PRESETS: dict[str, dict[str, float]] = {
    "strong": {"rotate_scale": 0.2, "elastic": 0.0, "low_res": 0.25, "noise": 0.1, "blur": 0.2, "brightness": 0.15,
               "contrast": 0.15, "gamma": 0.3, "mirror": 0.5, "enhance": 0.0},
    "light": {"flip": 0.1, "rot90": 0.1, "shift": 0.5},
    "none": {},
}
NAMES = sorted({name for preset in PRESETS.values() for name in preset})
ROTATE_3D = math.radians(30)
SCALE = (0.7, 1.4)


def check_probabilities(overrides: dict) -> None:
    for name, p in overrides.items():
        if name not in NAMES:
            raise ValueError(f"unknown transform {name!r}; known: {', '.join(NAMES)}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise ValueError(f"{name}: the probability must be a number in [0, 1], got {p!r}")


def probabilities(preset: str, overrides: dict[str, float] | None = None) -> dict[str, float]:
    """The preset's probabilities with ``overrides`` applied; transforms at 0 are dropped."""
    p = dict(PRESETS[preset])
    p.update(overrides or {})
    return {k: float(v) for k, v in p.items() if v > 0}


def sided(labels: list[str]) -> bool:
    """Whether a class is one side of the body, so left-right mirroring would mislabel it."""
    return any(w in name.lower() for name in labels for w in ("left", "right"))


def crop_size(roi: list[int], p: dict[str, float]) -> list[int]:
    """The patch to crop before augmentation: larger than the ROI when it is rotated and scaled,
    so the corners a rotation or a zoom-out brings in hold image rather than padding (nnU-Net's
    idea, capped at 1.5x per axis to bound the crop)."""
    if "rotate_scale" not in p:
        return list(roi)
    if roi[2] == 1:  # in-slice rotation of a slice: 1.5x in the slice
        want = [1.5 * r if r > 1 else 1 for r in roi]
    else:
        # a turn by up to ROTATE_3D about another axis brings that axis' extent in: a flat 64x64x32
        # patch needs about 60 slices of depth, not 1.5 x 32; capped at 1.5 x the longest side
        c, s, cap = math.cos(ROTATE_3D), math.sin(ROTATE_3D), 1.5 * max(roi)
        want = [min(cap, SCALE[1] * (r * c + s * max(o for j, o in enumerate(roi) if j != i))) for i, r in enumerate(roi)]
    # an even margin, so the centre crop of an unrotated patch is exact
    return [r + 2 * max(0, int(math.ceil((w - r) / 2))) if r > 1 else 1 for r, w in zip(roi, want)]


def spatial_and_intensity(roi: list[int], p: dict[str, float], labels: list[str], normalization: str,
                          hu_map: tuple[float, float, float, float] | None = None) -> list:
    """The MONAI transforms of preset probabilities ``p`` for patches of size ``roi`` (cropped at
    :func:`crop_size`), image and label keys ``("image", "label")``. ``hu_map``: the bundle's
    intensity map (:func:`medseg.data.transforms.intensity_map`), which ``enhance`` needs."""
    from monai.transforms import (
        Rand3DElasticd,
        RandAdjustContrastd,
        RandAffined,
        RandFlipd,
        RandGaussianNoised,
        RandGaussianSmoothd,
        RandRotate90d,
        RandScaleIntensityd,
        RandScaleIntensityFixedMeand,
        RandShiftIntensityd,
        RandSimulateLowResolutiond,
    )

    keys = ["image", "label"]
    two_d = roi[2] == 1
    unit = 1.0 if normalization == "ct" else 0.25  # intensity magnitudes are defined on z-scores
    no_lr = sided(labels)
    mirror_axes = [a for a in ((0, 1) if two_d else (0, 1, 2)) if not (no_lr and a == 0)]
    steps: list = []
    if "rotate_scale" in p:
        rotate = (0.0, 0.0, math.pi) if two_d else (ROTATE_3D,) * 3
        # MONAI's scale_range r gives factors 1 + U(-r, r) on the sampling grid, a zoom of 1/1.3-1/0.7
        # (0.77-1.43), nnU-Net's 0.7-1.4 to within a few per cent.
        scale = (0.3, 0.3, 0.0) if two_d else (0.3,) * 3
        # outside the crop: the image's edge values (a zero is soft tissue after z-scoring), background for the label
        steps.append(RandAffined(keys=keys, spatial_size=roi, prob=p["rotate_scale"], rotate_range=rotate, scale_range=scale,
                                 mode=["bilinear", "nearest"], padding_mode=["border", "zeros"]))
    if "elastic" in p and not two_d:
        steps.append(Rand3DElasticd(keys=keys, sigma_range=(5, 8), magnitude_range=(50, 150), prob=p["elastic"],
                                    mode=["bilinear", "nearest"], padding_mode=["border", "zeros"]))
    if "enhance" in p:
        if hu_map is None:
            raise ValueError("the enhance augmentation needs the bundle's intensity map (hu_map)")
        from medseg.data.enhance import RandContrastPhased

        steps.append(RandContrastPhased(p["enhance"], len(labels), hu_map))
    if "low_res" in p and not two_d:
        steps.append(RandSimulateLowResolutiond(keys="image", prob=p["low_res"], zoom_range=(0.5, 1.0)))
    if "noise" in p:
        steps.append(RandGaussianNoised(keys="image", prob=p["noise"], std=0.1 * unit))
    if "blur" in p:
        sz = (0.0, 0.0) if two_d else (0.5, 1.0)
        steps.append(RandGaussianSmoothd(keys="image", prob=p["blur"], sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=sz))
    if "brightness" in p:
        steps.append(RandScaleIntensityd(keys="image", prob=p["brightness"], factors=0.25))
    if "contrast" in p:
        steps.append(RandScaleIntensityFixedMeand(keys="image", prob=p["contrast"], factors=0.25, preserve_range=True))
    if "gamma" in p:
        steps.append(RandAdjustContrastd(keys="image", prob=p["gamma"], gamma=(0.7, 1.5), retain_stats=True))
    if "mirror" in p:
        steps += [RandFlipd(keys=keys, spatial_axis=[a], prob=p["mirror"]) for a in mirror_axes]
    if "flip" in p:
        steps += [RandFlipd(keys=keys, spatial_axis=[a], prob=p["flip"]) for a in (0, 1, 2) if not (no_lr and a == 0)]
    if "rot90" in p and roi[0] == roi[1] and not no_lr:  # a 90-degree turn keeps the shape only for a square slice
        steps.append(RandRotate90d(keys=keys, prob=p["rot90"], max_k=3))
    if "shift" in p:
        steps.append(RandShiftIntensityd(keys="image", offsets=0.4 * unit, prob=p["shift"]))
    return steps
