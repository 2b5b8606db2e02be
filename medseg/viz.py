"""Pictures: a three-plane preview of a segmentation over its CT (matplotlib, Agg backend)."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np


def save_preview(image: nib.Nifti1Image, labels: nib.Nifti1Image, names: dict[int, str], path: str | Path,
                 hu_window=(-175.0, 250.0)) -> Path:
    """Axial, coronal and sagittal slices through the centre of the segmented voxels, shown in RAS
    (radiological display: patient's right on the image's left), with a legend of the classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    ras = nib.as_closest_canonical(image)
    lab = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(labels.dataobj), labels.affine))
    ct = np.asarray(ras.dataobj, dtype=np.float32)
    if ct.ndim == 4:
        ct = ct[..., 0]
    seg = np.asarray(lab.dataobj)
    zooms = ras.header.get_zooms()[:3]
    fg = np.argwhere(seg > 0)
    centre = fg.mean(axis=0).round().astype(int) if len(fg) else np.array(seg.shape) // 2

    n = int(seg.max()) + 1 if seg.size else 1
    colours = plt.get_cmap("tab20", 20)(np.arange(max(n, 2)) % 20)
    colours[0, 3] = 0.0
    cmap = ListedColormap(colours)
    planes = [
        ("axial", ct[:, :, centre[2]], seg[:, :, centre[2]], zooms[1] / zooms[0]),
        ("coronal", ct[:, centre[1], :], seg[:, centre[1], :], zooms[2] / zooms[0]),
        ("sagittal", ct[centre[0], :, :], seg[centre[0], :, :], zooms[2] / zooms[1]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.6), facecolor="black")
    for ax, (title, img2d, seg2d, aspect) in zip(axes, planes):
        ax.imshow(np.clip(img2d.T, *hu_window), cmap="gray", origin="lower", aspect=aspect)
        ax.imshow(np.ma.masked_equal(seg2d.T, 0), cmap=cmap, vmin=0, vmax=max(n - 1, 1), origin="lower",
                  aspect=aspect, alpha=0.5, interpolation="nearest")
        if title in ("axial", "coronal"):
            ax.invert_xaxis()  # radiological convention
        ax.set_title(title, color="white")
        ax.axis("off")
    present = [k for k in sorted(names) if k != 0 and (seg == k).any()]
    handles = [Patch(color=colours[k], label=names[k]) for k in present]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), frameon=False, labelcolor="white")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    from medseg.data.io import temporary_beside

    path = Path(path)
    tmp = temporary_beside(path, ".png")
    try:
        fig.savefig(tmp, dpi=80, facecolor="black")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
