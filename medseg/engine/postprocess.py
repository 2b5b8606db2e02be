"""Post-processing of a label map: each listed class keeps its largest connected component.

nnU-Net applies this per class when it improves its cross-validation; TotalSegmentator applies it
to single organs. medseg applies it to the classes a bundle lists in
``postprocess.largest_component``. Components are 26-connected (faces, edges and corners), found
with ``scipy.ndimage.label`` inside the class's bounding box (MONAI's
``KeepLargestConnectedComponent`` does the same but needs scikit-image, which medseg does not
otherwise use). Memory: a boolean mask of the volume, and about 17 bytes per voxel of the class's
bounding box (the component labels, their int64 copy for counting, two masks).
"""

from __future__ import annotations

import numpy as np


def keep_largest_component(labels: np.ndarray, values: list[int]) -> dict[int, int]:
    """In place: every class in ``values`` keeps only its largest component, the rest becomes
    background (0). Returns the voxels removed per class value."""
    from scipy import ndimage

    removed: dict[int, int] = {}
    for value in values:
        mask = labels == value
        box = bounding_box(mask)
        if box is None:
            continue
        parts, n = ndimage.label(mask[box], structure=np.ones((3,) * labels.ndim, dtype=bool), output=np.int32)
        if n <= 1:
            continue
        sizes = np.bincount(parts.ravel())
        sizes[0] = 0
        drop = (parts > 0) & (parts != int(sizes.argmax()))
        labels[box][drop] = 0
        removed[value] = int(drop.sum())
    return removed


def bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...] | None:
    """The bounding box of ``mask``'s True voxels grown by ``margin`` (within the array), or None
    when there are none."""
    spans = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            return None
        spans.append(slice(max(int(hit[0]) - margin, 0), min(int(hit[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(spans)
