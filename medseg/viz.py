"""Pictures: a three-plane preview of a segmentation over its CT (matplotlib, Agg backend).

What a reader needs from a preview: slices that go through the segmented organs, every class in a
colour that stands out from grey CT and from the other classes, outlines that show the boundary
while the fill lets the anatomy show through, and a legend naming every class in the picture.
"""

from __future__ import annotations

import colorsys
import os
from pathlib import Path

import nibabel as nib
import numpy as np

# Twenty saturated colours chosen greedily for the largest smallest CIELAB distance (ΔE76 >= 29)
# among HSV colours with chroma >= 45 and lightness >= 45 (so none is grey-like or lost on dark
# CT); the first few are the most distinct, and they go to the classes in value order.
PALETTE = ("#e62222", "#00ff00", "#335cff", "#00f2ff", "#ffd633", "#ff00b3", "#00b259", "#008dd9", "#cc00ff", "#b26b00",
           "#bdff59", "#ff5983", "#00ffcc", "#33ff7a", "#ff7300", "#a1b200", "#2270e6", "#47b200", "#f2ff00", "#ff8359")
FIG_WIDTH = 15.0  # inches
LEGEND_FONT = 10.0  # points
MAX_NAME = 40  # characters shown in the legend; longer names are cut with an ellipsis
FILL_ALPHA = 0.45  # the organ's texture stays readable under the fill
EDGE_ALPHA = 1.0  # the outline carries the boundary


def class_colours(n: int) -> np.ndarray:
    """``n`` RGB colours in [0, 1]: the palette, then golden-angle hues (less distinct) past 20."""
    colours = [tuple(int(h[i : i + 2], 16) / 255 for i in (1, 3, 5)) for h in PALETTE[:n]]
    for i in range(n - len(colours)):
        hue = (i * 0.381966 + 0.05) % 1.0
        colours.append(colorsys.hsv_to_rgb(hue, 0.85, 1.0 if i % 2 == 0 else 0.8))
    return np.asarray(colours, dtype=float).reshape(n, 3)


def slice_centre(seg: np.ndarray) -> tuple[int, int, int]:
    """The voxel the three planes go through: per axis, the median of the classes' centres of mass.

    Each class gets one vote whatever its size, and the median ignores a minority of outlying
    classes, so a large class away from the organs (muscles, vertebrae, bowel) cannot pull the
    slices off them the way the mean of all labelled voxels does. Each index is then moved to the
    nearest plane that holds labelled voxels, so no panel is empty when classes are spread out.
    """
    values = np.unique(seg)
    values = values[values != 0]
    if values.size == 0:
        return tuple(int(s) // 2 for s in seg.shape)  # type: ignore[return-value]
    from scipy import ndimage

    centres = np.asarray(ndimage.center_of_mass(np.ones(seg.shape, np.uint8), seg, values), dtype=float)
    centre = np.median(centres, axis=0).round().astype(int)
    out = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        occupied = np.flatnonzero((seg != 0).any(axis=other))
        out.append(int(occupied[np.argmin(np.abs(occupied - centre[axis]))]))
    return tuple(out)  # type: ignore[return-value]


def overlay_rgba(seg2d: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """An RGBA image: each class filled at FILL_ALPHA, its outline (a pixel with a 4-neighbour of
    another value) opaque, background transparent. ``lut[value]`` is the value's RGB colour."""
    rgba = np.zeros((*seg2d.shape, 4), dtype=float)
    fg = seg2d != 0
    rgba[..., :3] = lut[seg2d]
    edge = np.zeros_like(fg)
    padded = np.pad(seg2d, 1, mode="edge")
    centre = padded[1:-1, 1:-1]
    for shifted in (padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]):
        edge |= shifted != centre
    rgba[..., 3] = np.where(fg, np.where(edge, EDGE_ALPHA, FILL_ALPHA), 0.0)
    return rgba


def legend_columns(labels: list[str]) -> int:
    """As many columns (at most 6) as fit across the figure. A column is its longest name at 0.6 em
    a character (DejaVu Sans averages less) plus 5 em for the patch and the spacing."""
    if not labels:
        return 1
    column_pt = (0.6 * max(len(s) for s in labels) + 5.0) * LEGEND_FONT
    return int(max(1, min(6, len(labels), (FIG_WIDTH * 72) // column_pt)))


def figure_height(shape, zooms, legend_rows: int) -> float:
    """Inches: the tallest panel at a third of the width (in millimetres, so thick slices are not
    squashed), plus room for the titles and the legend's rows."""
    mm = [s * z for s, z in zip(shape, zooms)]
    tallest = max(mm[1] / mm[0], mm[2] / mm[0], mm[2] / mm[1])
    return float(np.clip(FIG_WIDTH / 3 * tallest, 2.5, 7.0)) + 0.6 + 0.22 * legend_rows


def render_preview(image: nib.Nifti1Image, labels: nib.Nifti1Image, names: dict[int, str], hu_window=(-175.0, 250.0)):
    """The preview as a matplotlib Figure (the caller closes it): axial, coronal and sagittal slices
    in RAS, axial and coronal in radiological display (patient's right on the image's left),
    sagittal with anterior on the left; titles and legend laid out inside the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    ras = nib.as_closest_canonical(image)
    lab = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(labels.dataobj), labels.affine))
    ct = np.asarray(ras.dataobj, dtype=np.float32)
    ct = ct[..., 0] if ct.ndim == 4 else ct
    seg = np.asarray(lab.dataobj)
    seg = (seg[..., 0] if seg.ndim == 4 else seg).astype(np.int64)
    zooms = ras.header.get_zooms()[:3]
    cx, cy, cz = slice_centre(seg)

    present = [int(v) for v in np.unique(seg) if v != 0]
    colours = class_colours(len(present))
    lut = np.zeros((int(seg.max()) + 1 if seg.size else 1, 3))
    for value, colour in zip(present, colours):
        lut[value] = colour
    planes = [  # title, CT slice, label slice, pixel aspect, (left, right) markers
        (f"axial (slice {cz + 1}/{seg.shape[2]})", ct[:, :, cz], seg[:, :, cz], zooms[1] / zooms[0], ("R", "L")),
        (f"coronal (slice {cy + 1}/{seg.shape[1]})", ct[:, cy, :], seg[:, cy, :], zooms[2] / zooms[0], ("R", "L")),
        (f"sagittal (slice {cx + 1}/{seg.shape[0]})", ct[cx, :, :], seg[cx, :, :], zooms[2] / zooms[1], ("A", "P")),
    ]
    labels_text = [_short(names.get(value, f"class {value}")) for value in present]
    ncol = legend_columns(labels_text)
    height = figure_height(seg.shape, zooms, -(-len(present) // ncol))
    fig, axes = plt.subplots(1, 3, figsize=(FIG_WIDTH, height), facecolor="black", layout="constrained")
    for ax, (title, img2d, seg2d, aspect, (left, right)) in zip(axes, planes):
        ax.imshow(img2d.T, cmap="gray", vmin=hu_window[0], vmax=hu_window[1], origin="lower", aspect=aspect)
        ax.imshow(overlay_rgba(seg2d.T, lut), origin="lower", aspect=aspect, interpolation="nearest")
        ax.invert_xaxis()  # radiological: patient's right (axial, coronal) or front (sagittal) on the left
        ax.set_title(title, color="white", fontsize=12)
        for x, text, ha in ((0.01, left, "left"), (0.99, right, "right")):
            ax.text(x, 0.5, text, transform=ax.transAxes, color="yellow", fontsize=12, ha=ha, va="center", fontweight="bold")
        ax.axis("off")
    handles = [Patch(facecolor=(*colour, FILL_ALPHA + 0.3), edgecolor=colour, label=text) for text, colour in zip(labels_text, colours)]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=ncol, frameon=False, labelcolor="white", fontsize=LEGEND_FONT)
    return fig


def _short(name: str) -> str:
    return name if len(name) <= MAX_NAME else name[: MAX_NAME - 1] + "…"


def save_preview(image: nib.Nifti1Image, labels: nib.Nifti1Image, names: dict[int, str], path: str | Path,
                 hu_window=(-175.0, 250.0)) -> Path:
    """Write :func:`render_preview` as a PNG, atomically (a temporary name, renamed when complete)."""
    import matplotlib.pyplot as plt

    from medseg.data.io import temporary_beside

    path = Path(path)
    fig = render_preview(image, labels, names, hu_window)
    tmp = temporary_beside(path, ".png")
    try:
        fig.savefig(tmp, dpi=90, facecolor="black", format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
