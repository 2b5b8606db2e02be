"""A seeded synthetic abdominal CT phantom, written as NIfTI image + label map.

Each case is an elliptic torso (skin, subcutaneous fat, muscle wall) with lung bases, liver, spleen,
kidneys (enhancing cortex), vertebral bodies with discs, the aorta and unlabeled bowel loops with gas,
at realistic Hounsfield units. Organ centres, sizes, rotations and HU vary per case; a smooth random
displacement field bends every structure; a blur and Gaussian noise stand in for the scanner. Spacing
is anisotropic (thin in-plane, thick slices) and varies per case, and odd cases are stored LPS rather
than RAS, so the pipeline's reorientation and resampling are exercised on every run.

Liver (~60 HU) and spleen (~50 HU) differ by less than the noise (15 HU): a network must learn shape
and position, not a threshold. Case ``i`` of seed ``s`` is the same on every machine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from medseg.data.io import write_nifti, write_text_atomic

PHANTOM_VERSION = 1
LABELS = {1: "liver", 2: "spleen", 3: "kidney_right", 4: "kidney_left", 5: "vertebrae", 6: "aorta"}
FOV_MM = (240.0, 200.0, 150.0)  # left-right, posterior-anterior, inferior-superior


@dataclass
class PhantomCase:
    image: nib.Nifti1Image  # int16 HU
    label: nib.Nifti1Image  # uint8, values in LABELS


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    a, b, c = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _ellipsoid(p: tuple[np.ndarray, ...], centre, radii, rot: np.ndarray) -> np.ndarray:
    """Normalised radius r^2 (< 1 inside) of points ``p`` for a rotated ellipsoid."""
    d = [p[i] - centre[i] for i in range(3)]
    q = [rot[0, i] * d[0] + rot[1, i] * d[1] + rot[2, i] * d[2] for i in range(3)]
    return sum((q[i] / radii[i]) ** 2 for i in range(3))


def _smooth_field(rng: np.random.Generator, p: tuple[np.ndarray, ...], amplitude: float, n: int = 4) -> np.ndarray:
    """A sum of ``n`` random low-frequency plane waves (wavelengths 80-200 mm)."""
    out = np.zeros_like(p[0])
    for _ in range(n):
        k = rng.normal(size=3)
        k *= 2 * np.pi / rng.uniform(80, 200) / np.linalg.norm(k)
        out += np.sin(k[0] * p[0] + k[1] * p[1] + k[2] * p[2] + rng.uniform(0, 2 * np.pi))
    return out * (amplitude / np.sqrt(n))


def make_case(seed: int, index: int) -> PhantomCase:
    """Build case ``index`` of the stream ``seed``."""
    rng = np.random.default_rng([seed, index, PHANTOM_VERSION])
    spacing = np.array([rng.uniform(1.3, 1.8), 0.0, rng.uniform(2.5, 3.5)])
    spacing[1] = spacing[0]
    shape = tuple(int(round(f / s)) for f, s in zip(FOV_MM, spacing))
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=False)
    x, y, z = x.astype(np.float32), y.astype(np.float32), z.astype(np.float32)
    # Smoothly deformed coordinates: every structure below bends with the same field.
    p = (x + _smooth_field(rng, (x, y, z), 6.0), y + _smooth_field(rng, (x, y, z), 6.0), z + _smooth_field(rng, (x, y, z), 4.0))

    hu = np.full(shape, -1000.0, dtype=np.float32)
    lab = np.zeros(shape, dtype=np.uint8)

    # Torso: skin/muscle wall, subcutaneous fat, visceral fat.
    a, b = rng.uniform(100, 115), rng.uniform(78, 90)
    taper = 1.0 + 0.06 * np.sin(p[2] / 60.0)
    body = (p[0] / (a * taper)) ** 2 + ((p[1] - 5) / (b * taper)) ** 2
    fat_in = 1.0 - rng.uniform(0.10, 0.22)
    hu[body < 1.0] = 40.0  # skin and muscle wall
    hu[body < fat_in + 0.08] = -100.0  # subcutaneous fat
    hu[body < fat_in] = 45.0  # abdominal wall muscle
    inner = body < fat_in - 0.08
    hu[inner] = (-85.0 + 25.0 * _smooth_field(rng, p, 1.0))[inner]  # visceral fat, uneven

    # Bowel loops (unlabeled) with gas pockets: distractors at soft-tissue HU.
    for _ in range(int(rng.integers(10, 16))):
        c = (rng.uniform(-60, 60), rng.uniform(0, 60), rng.uniform(-70, 20))
        r = rng.uniform(10, 22, 3)
        blob = (_ellipsoid(p, c, r, _rotation(rng, 90)) < 1.0) & inner
        hu[blob] = rng.uniform(25, 45)
        gas = _ellipsoid(p, (c[0], c[1] + r[1] * 0.4, c[2]), r * 0.35, np.eye(3)) < 1.0
        hu[gas & blob & (rng.uniform() < 0.5)] = -950.0

    # Lung bases at the top of the field of view.
    for side in (1, -1):
        c = (side * rng.uniform(55, 65), rng.uniform(-20, -5), rng.uniform(95, 110))
        lung = _ellipsoid(p, c, (rng.uniform(42, 50), rng.uniform(55, 65), rng.uniform(55, 65)), _rotation(rng, 8)) < 1.0
        hu[lung & inner] = -850.0

    def organ(value: int, mask: np.ndarray, mean_hu: float, texture: float = 6.0) -> None:
        mask &= inner
        hu[mask] = mean_hu + texture * _smooth_field(rng, p, 1.0, n=6)[mask]
        lab[mask] = value

    j = lambda s: rng.uniform(-s, s)  # noqa: E731  (jitter)
    # Liver: large, patient's right (+x in RAS), under the right lung; a plane cuts its medial tip.
    liver_radii = np.array([70.0, 58.0, 52.0]) * rng.uniform(0.88, 1.12, 3)
    liver = _ellipsoid(p, (48 + j(8), 8 + j(8), 30 + j(8)), liver_radii, _rotation(rng, 15)) < 1.0
    liver &= (p[0] - 0.6 * p[2]) > -40 + j(10)
    organ(1, liver, rng.uniform(55, 68))
    # Spleen: left, posterior, crescent-like (an ellipsoid minus a bite).
    sc = (-70 + j(6), -35 + j(6), 35 + j(8))
    spleen = _ellipsoid(p, sc, (24 * rng.uniform(0.85, 1.15), 42 * rng.uniform(0.85, 1.15), 45 * rng.uniform(0.85, 1.15)), _rotation(rng, 20)) < 1.0
    spleen &= _ellipsoid(p, (sc[0] + 34, sc[1] + 12, sc[2]), (22, 32, 50), np.eye(3)) > 1.0
    organ(2, spleen, rng.uniform(50, 58))
    # Kidneys: posterior, either side of the spine; right one a little lower; enhancing cortex.
    for value, side, dz in ((3, 1, -12), (4, -1, 0)):
        kc = (side * (48 + j(5)), -45 + j(5), dz - 10 + j(8))
        radii = np.array([24, 20, 48]) * rng.uniform(0.85, 1.15, 3)
        rot = _rotation(rng, 15)
        r2 = _ellipsoid(p, kc, radii, rot)
        kidney = r2 < 1.0
        organ(value, kidney, rng.uniform(150, 180), texture=10.0)
        medulla = (r2 < 0.45) & inner
        hu[medulla] = rng.uniform(30, 45)
        hilum = _ellipsoid(p, (kc[0] - side * radii[0] * 0.7, kc[1] + 5, kc[2]), (10, 8, 14), np.eye(3)) < 1.0
        hu[hilum & kidney] = -60.0  # renal sinus fat, labeled kidney as in TotalSegmentator
    # Aorta: enhancing tube left-anterior of the spine.
    ax, ay = -15 + j(5), -28 + j(5)
    aorta = ((p[0] - ax) ** 2 + (p[1] - ay) ** 2) < rng.uniform(9, 12) ** 2
    organ(6, aorta, rng.uniform(160, 220), texture=8.0)
    # Spine: vertebral bodies (cortex ~700 HU, cancellous ~250 HU) separated by discs.
    sx, sy = j(4), -62 + j(4)
    height, gap, phase = rng.uniform(22, 27), rng.uniform(6, 9), rng.uniform(0, 30)
    along = np.mod(p[2] + phase, height + gap)
    radial = ((p[0] - sx) / 20.0) ** 2 + ((p[1] - sy) / 16.0) ** 2
    column = radial < 1.0
    hu[column] = 90.0  # intervertebral disc
    vert = column & (along < height)
    organ(5, vert, 250.0, texture=25.0)
    hu[vert & (radial > 0.7)] = 700.0
    arch = (((p[0] - sx) / 12.0) ** 2 + ((p[1] - sy + 24) / 10.0) ** 2 < 1.0) & (along < height)
    hu[arch & inner] = 600.0

    # Scanner: partial volume blur, then noise.
    hu = ndimage.gaussian_filter(hu, sigma=(0.7, 0.7, 0.4))
    hu += rng.normal(0.0, 15.0, size=shape).astype(np.float32)
    image_data = np.clip(np.round(hu), -1024, 3071).astype(np.int16)

    affine = np.diag([spacing[0], spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [-(n - 1) / 2 * s for n, s in zip(shape, spacing)]
    affine[:3, 3] += rng.uniform(-20, 20, 3)
    image = nib.Nifti1Image(image_data, affine)
    label = nib.Nifti1Image(lab, affine)
    if index % 2 == 1:  # store odd cases LPS: same anatomy, other voxel order and affine
        lps = nib.orientations.axcodes2ornt(("L", "P", "S"))
        image, label = image.as_reoriented(lps), label.as_reoriented(lps)
    for img in (image, label):
        img.header.set_xyzt_units("mm")
        img.set_qform(img.affine, code=1)
        img.set_sform(img.affine, code=1)
    image.header.set_data_dtype(np.int16)
    label.header.set_data_dtype(np.uint8)
    return PhantomCase(image=image, label=label)


def write_phantom(out: str | Path, cases: int, seed: int = 0, progress=None) -> Path:
    """Write cases 0..cases-1 in Decathlon layout (``imagesTr/``, ``labelsTr/``, ``dataset.json``).
    Existing complete cases are kept, so a cache folder fills up incrementally."""
    out = Path(out)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    training = []
    for i in range(cases):
        name = f"phantom_{i:03d}.nii.gz"
        img_path, lab_path = out / "imagesTr" / name, out / "labelsTr" / name
        if not (img_path.exists() and lab_path.exists()):
            case = make_case(seed, i)
            write_nifti(case.label, lab_path)
            write_nifti(case.image, img_path)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        if progress is not None:
            progress(i + 1, cases)
    dataset = {
        "name": "medseg-phantom",
        "description": f"synthetic abdominal CT phantom v{PHANTOM_VERSION}, seed {seed}",
        "modality": {"0": "CT"},
        "labels": {"0": "background", **{str(k): v for k, v in LABELS.items()}},
        "numTraining": cases,
        "training": training,
    }
    write_text_atomic(out / "dataset.json", json.dumps(dataset, indent=2))
    return out


def phantom_cache_dir(seed: int) -> Path:
    import os

    root = Path(os.environ.get("MEDSEG_CACHE", Path.home() / ".cache" / "medseg"))
    return root / f"phantom-v{PHANTOM_VERSION}-seed{seed}"
