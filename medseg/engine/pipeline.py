"""The steps validation and inference share, so the two cannot drift apart.

    preprocess  an in-memory scan -> the model grid: the bundle's own :func:`geometry_steps`
                (RAS, spacing, HU window), exactly what training and validation apply
    body_box    the crop to the body, with the rule of training's CropForegroundd (input above
                ``transforms.body_threshold``)
    sliding_window  the network over the model grid: MONAI's inferer or medseg's streaming one
                (``auto|monai|stream``), labels and, if asked, float16 class probabilities
    to_input_grid   back onto the scan's own grid, in slabs of bounded memory:
                ``linear``  class probabilities resampled trilinearly, labels = their argmax
                            (nnU-Net's way: labels and saved probabilities agree on every voxel)
                ``nearest`` the model-grid labels (and probabilities) by nearest neighbour: no
                            classes x volume buffer, the fallback for many classes on big scans

Validation (:func:`medseg.engine.validate.validate`) runs :func:`network_fn` + :func:`sliding_window`
on volumes that ``val_transforms`` already put on the model grid; :class:`~medseg.engine.infer.Predictor`
runs every step.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from medseg.config import Bundle
from medseg.errors import MedsegError

# Work memory of one slab of the resampling back to the input grid (bytes).
SLAB_BYTES = 32 * 2**20
# ``--resample auto`` keeps linear resampling while the model-grid float16 probabilities fit in this.
PROBABILITY_BUFFER_LIMIT = 1 * 2**30
TTA_FLIPS = [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]  # nnU-Net's 3D mirroring


@dataclass(frozen=True)
class WindowSpec:
    """How the sliding window runs: the bundle's settings, with the user's overrides checked."""

    roi: tuple[int, ...]
    sw_batch_size: int
    overlap: float
    mode: str
    pad_value: float  # an image smaller than the ROI is padded with this: training's air value, never a default
    method: str = "auto"  # auto | monai | stream

    @classmethod
    def from_bundle(cls, bundle: Bundle, *, overlap: float | None = None, sw_batch_size: int | None = None,
                    method: str = "auto") -> WindowSpec:
        sw = bundle.sliding_window
        overlap = sw.overlap if overlap is None else overlap
        if not 0 <= overlap < 1:
            raise MedsegError(f"--overlap must be in [0, 1), got {overlap}")
        sw_batch_size = sw.sw_batch_size if sw_batch_size is None else sw_batch_size
        if sw_batch_size < 1:
            raise MedsegError("--sw-batch-size must be >= 1")
        if method not in ("auto", "monai", "stream"):
            raise MedsegError(f"--window must be auto, monai or stream, got {method!r}")
        from medseg.data.transforms import pad_value

        return cls(roi=tuple(int(r) for r in bundle.infer_roi), sw_batch_size=int(sw_batch_size), overlap=float(overlap),
                   mode=sw.mode, pad_value=pad_value(bundle), method=method)


@dataclass
class WindowResult:
    labels: torch.Tensor  # (X, Y, Z) uint8 (int32 past 256 classes), argmax of the blended logits
    probabilities: torch.Tensor | None  # (classes, X, Y, Z) float16 softmax, when asked
    method: str  # the window that ran: monai or stream


def network_fn(model: torch.nn.Module, autocast: Callable = contextlib.nullcontext, tta: bool = False,
               slice_model: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model on one batch of windows, in float32 logits, under ``autocast`` (from
    :func:`medseg.engine.device.autocast`), averaged over mirrored inputs with ``tta``. A 2D
    slice model is not mirrored across slices (that adds nothing)."""
    flips = [f for f in TTA_FLIPS if not (slice_model and 4 in f)] if tta else [()]

    def predict(x: torch.Tensor) -> torch.Tensor:
        total = None
        with autocast():
            for dims in flips:
                y = model(torch.flip(x, dims) if dims else x).float()
                y = torch.flip(y, dims) if dims else y
                total = y if total is None else total + y
        return total / len(flips)

    return predict


def sliding_window(x: torch.Tensor, predict: Callable[[torch.Tensor], torch.Tensor], spec: WindowSpec, n_classes: int,
                   device: torch.device, *, probabilities: bool = False, on_window: Callable[[int, int], None] | None = None) -> WindowResult:
    """``x`` (1, C, X, Y, Z) on the model grid -> labels (and float16 probabilities). ``auto`` takes
    MONAI's inferer while its classes x volume float32 buffer is small, else the streaming window."""
    from medseg.engine.window import choose_method, monai_sliding_window, stream_sliding_window

    method = choose_method(n_classes, x.shape[2:], spec.method)
    common = {"overlap": spec.overlap, "mode": spec.mode, "device": device, "return_probabilities": probabilities,
              "pad_value": spec.pad_value}
    if method == "stream":
        labels, probs = stream_sliding_window(x, spec.roi, spec.sw_batch_size, predict, on_window=on_window, **common)
    else:
        labels, probs = monai_sliding_window(x.to(device), spec.roi, spec.sw_batch_size, predict, **common)
    return WindowResult(labels, probs, method)


# ---------------------------------------------------------------------------------------------
# into the model grid


def preprocess(img: nib.Nifti1Image, bundle: Bundle, source: str) -> tuple[torch.Tensor, np.ndarray]:
    """A 3D scan -> ((1, 1, X, Y, Z) float32 tensor on the model grid, its affine). ``source`` names
    the scan in errors (its path)."""
    from monai.data import MetaTensor
    from monai.transforms import Compose

    from medseg.data.io import check_3d, check_grid, load_array
    from medseg.data.transforms import geometry_steps

    check_3d(img, source)
    check_grid(img, source, bundle.data.spacing)
    data = load_array(img, source)
    if data.ndim == 4:
        data = data[..., 0]
    x = MetaTensor(torch.from_numpy(np.ascontiguousarray(data))[None], affine=torch.as_tensor(img.affine, dtype=torch.float64))
    x = Compose(geometry_steps(bundle, keys=("image",)))({"image": x})["image"]
    return x.as_tensor()[None].float(), np.asarray(x.affine, dtype=np.float64)


def body_box(x: torch.Tensor, threshold: float = 0.0) -> tuple[slice, slice, slice]:
    """The box around the body (input > ``threshold``, see ``transforms.body_threshold``) of a
    (1, 1, X, Y, Z) volume: the rule of the ``CropForegroundd`` in ``val_transforms`` (MONAI's own
    function). The whole volume if empty."""
    from monai.transforms.utils import generate_spatial_bounding_box

    lo, hi = generate_spatial_bounding_box(x[0], lambda v: v > threshold, allow_smaller=True)
    if any(b <= a for a, b in zip(lo, hi)):
        return tuple(slice(0, s) for s in x.shape[2:])  # type: ignore[return-value]
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# back onto the input grid


def probability_buffer_bytes(n_classes: int, spatial: Sequence[int]) -> int:
    """The float16 classes x volume probabilities on the model grid that linear resampling needs."""
    return n_classes * math.prod(int(s) for s in spatial) * 2


def choose_resample(method: str, n_classes: int, crop_shape: Sequence[int], save_probabilities: bool) -> tuple[str, str | None]:
    """(method, note). ``auto`` is linear unless the model-grid probabilities would exceed
    :data:`PROBABILITY_BUFFER_LIMIT` (then nearest, with a note saying so); saving probabilities
    needs that buffer anyway, so it keeps linear."""
    if method not in ("auto", "linear", "nearest"):
        raise MedsegError(f"--resample must be auto, linear or nearest, got {method!r}")
    if method != "auto":
        return method, None
    need = probability_buffer_bytes(n_classes, crop_shape)
    if save_probabilities or need <= PROBABILITY_BUFFER_LIMIT:
        return "linear", None
    return "nearest", (f"labels resampled nearest-neighbour: linear resampling would hold {need / 2**30:.1f} GiB of class "
                       f"probabilities ({n_classes} classes); pass --resample linear to use it anyway")


@dataclass
class Grids:
    """Where the model-grid result sits: the full model grid's shape and affine, the body crop in
    it, and the input grid's shape and affine."""

    model_shape: tuple[int, int, int]
    model_affine: np.ndarray
    crop: tuple[slice, slice, slice]
    input_shape: tuple[int, int, int]
    input_affine: np.ndarray

    def matrix(self) -> np.ndarray:
        """Input voxel -> model voxel."""
        return np.linalg.inv(self.model_affine) @ np.asarray(self.input_affine, dtype=np.float64)


# Work memory per input voxel of a slab, besides what depends on the classes: float32 coordinates
# and their stacked copy or integer index (24 B), masks, flat index and labels (24 B).
COORD_BYTES = 48


def _slabs(g: Grids, bytes_per_voxel: int):
    """Slabs along the input's first axis: (i0, i1, model-grid voxel coordinates (3, s, Y, Z)
    float32, one contiguous array per axis so that every step is a plain scalar operation), each
    within :data:`SLAB_BYTES` of work memory (``bytes_per_voxel`` on top of the coordinates').
    float32 is exact enough: coordinates stay below a few thousand voxels, off by < 1e-3 voxel."""
    m = g.matrix()
    _, ny, nz = g.input_shape
    j = torch.arange(ny, dtype=torch.float64)[:, None]
    k = torch.arange(nz, dtype=torch.float64)[None, :]
    plane = torch.stack([(m[d, 1] * j + m[d, 2] * k + m[d, 3]).float() for d in range(3)])  # (3, Y, Z)
    step = max(1, SLAB_BYTES // max(1, ny * nz * (bytes_per_voxel + COORD_BYTES)))
    for i0 in range(0, g.input_shape[0], step):
        i1 = min(i0 + step, g.input_shape[0])
        rows = torch.arange(i0, i1, dtype=torch.float32)[:, None, None]
        yield i0, i1, torch.stack([plane[d][None] + rows * float(m[d, 0]) for d in range(3)])


def _clamp_to_crop(coords: torch.Tensor, g: Grids) -> torch.Tensor:
    """In place: coordinates beyond the model grid's outer voxel centres take the edge (the scan's
    rim lies up to half a model voxel outside them), then made relative to the body crop."""
    for d in range(3):
        coords[d].clamp_(0, g.model_shape[d] - 1).sub_(g.crop[d].start)
    return coords


def to_input_grid(result: WindowResult, g: Grids, method: str, n_classes: int, *, probabilities: bool = False,
                  device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray | None]:
    """The model-grid result (on the body crop) -> (labels on the input grid, and with
    ``probabilities`` a (X, Y, Z, classes) uint8 map of round(255 p)). Outside the crop is
    background. ``linear``: labels are the argmax of the resampled probabilities, so the saved
    probabilities have their maximum at the label on every voxel (uint8 rounding may tie)."""
    if method == "linear":
        if result.probabilities is None:
            raise ValueError("linear resampling needs the window's probabilities")
        return _linear(result.probabilities, g, probabilities, torch.device(device))
    return _nearest(result.labels, result.probabilities if probabilities else None, g, n_classes)


def _label_array(shape, n_classes: int) -> np.ndarray:
    return np.zeros(shape, dtype=np.uint8 if n_classes <= 256 else np.uint16)


def _to_uint8_(p: torch.Tensor) -> torch.Tensor:
    """round(255 p) as uint8; ``p`` (float32) is overwritten."""
    return p.mul_(255).round_().clamp_(0, 255).to(torch.uint8)


def argmax0(p: torch.Tensor) -> torch.Tensor:
    """``p.argmax(0)`` (the first maximum on ties) as uint8 (int32 past 256 classes): one pass per
    class over contiguous memory, 4x faster than torch's strided reduction over dim 0 (measured)."""
    best = p[0].clone()
    labels = torch.zeros(p.shape[1:], dtype=torch.uint8 if p.shape[0] <= 256 else torch.int32)
    for c in range(1, p.shape[0]):
        labels.masked_fill_(p[c] > best, c)
        torch.maximum(best, p[c], out=best)
    return labels


def _linear(probs: torch.Tensor, g: Grids, keep_probabilities: bool, device: torch.device) -> tuple[np.ndarray, np.ndarray | None]:
    n_classes = probs.shape[0]
    crop_size = probs.shape[1:]
    labels = _label_array(g.input_shape, n_classes)
    out_p = np.zeros((*g.input_shape, n_classes), dtype=np.uint8) if keep_probabilities else None
    for i0, i1, rel in _slabs(g, 9 * n_classes):  # float32 result and its uint8 copy
        _clamp_to_crop(rel, g)
        # The crop voxels this slab interpolates from (its bounding box, inside the crop).
        lo = [min(max(int(torch.floor(rel[d].min())), 0), crop_size[d] - 1) for d in range(3)]
        hi = [max(min(int(torch.floor(rel[d].max())) + 2, crop_size[d]), lo[d] + 1) for d in range(3)]
        sub = tuple(slice(a, b) for a, b in zip(lo, hi))
        # grid_sample, align_corners=False: voxel x sits at (2x + 1) / size - 1. Zeros padding: the
        # crop's outside has zero probability for every class; the extra channel of ones measures
        # how much of each voxel's weight fell inside, and the rest is background.
        for d in range(3):
            size = hi[d] - lo[d]
            rel[d].sub_(lo[d]).mul_(2 / size).add_(1 / size - 1)
        grid = torch.stack([rel[2], rel[1], rel[0]], dim=-1).to(device)[None]
        del rel
        sub_voxels = math.prod(b - a for a, b in zip(lo, hi))
        group = max(1, min(n_classes + 1, SLAB_BYTES // max(1, 4 * (sub_voxels + grid[0, ..., 0].numel()))))
        p = torch.empty((n_classes + 1, *grid.shape[1:4]), dtype=torch.float32)
        for c0 in range(0, n_classes + 1, group):
            c1 = min(c0 + group, n_classes + 1)
            src = torch.ones((c1 - c0, *(b - a for a, b in zip(lo, hi))), dtype=torch.float32, device=device)
            real = min(c1, n_classes) - c0
            if real > 0:
                src[:real] = probs[(slice(c0, c0 + real), *sub)]
            p[c0:c1] = F.grid_sample(src[None], grid, align_corners=False)[0].cpu()
        del grid
        p[0].add_(1).sub_(p[n_classes])  # outside the body crop: background
        p = p[:n_classes]
        labels[i0:i1] = argmax0(p).numpy()
        if out_p is not None:
            out_p[i0:i1] = _to_uint8_(p).permute(1, 2, 3, 0).numpy()
    return labels, out_p


def _nearest(crop_labels: torch.Tensor, probs: torch.Tensor | None, g: Grids, n_classes: int) -> tuple[np.ndarray, np.ndarray | None]:
    labels = _label_array(g.input_shape, n_classes)
    out_p = np.zeros((*g.input_shape, n_classes), dtype=np.uint8) if probs is not None else None
    if out_p is not None:
        out_p[..., 0] = 255  # outside the body crop: background
    size = crop_labels.shape
    flat_labels = crop_labels.reshape(-1)
    flat_probs = probs.reshape(probs.shape[0], -1) if probs is not None else None
    index_type = torch.int64 if math.prod(size) >= 2**31 else torch.int32
    for i0, i1, idx in _slabs(g, 5 * n_classes if probs is not None else 0):  # float32 + uint8 per class
        _clamp_to_crop(idx, g).add_(0.5).floor_()
        inside = torch.ones(idx.shape[1:], dtype=torch.bool)
        for d in range(3):
            inside &= (idx[d] >= 0) & (idx[d] < size[d])
        ijk = idx.to(index_type)
        del idx
        at = ijk[0].mul_(size[1]).add_(ijk[1]).mul_(size[2]).add_(ijk[2])[inside]  # flat index into the crop
        del ijk
        slab = torch.zeros(inside.shape, dtype=crop_labels.dtype)
        slab[inside] = flat_labels[at]
        labels[i0:i1] = slab.numpy()
        if out_p is not None:
            out_p[i0:i1][inside.numpy()] = _to_uint8_(flat_probs[:, at].float()).T.numpy()
    return labels, out_p


def resample_nearest(labels: np.ndarray, src_affine: np.ndarray, shape: Sequence[int], dst_affine: np.ndarray) -> np.ndarray:
    """A label volume on one grid -> another (nearest neighbour, through the two affines; past the
    source's outer voxel centres the edge value continues)."""
    spatial = tuple(int(s) for s in labels.shape)
    g = Grids(spatial, np.asarray(src_affine, dtype=np.float64), tuple(slice(0, s) for s in spatial),  # type: ignore[arg-type]
              tuple(int(s) for s in shape), np.asarray(dst_affine, dtype=np.float64))  # type: ignore[arg-type]
    t = torch.from_numpy(np.ascontiguousarray(labels.astype(np.int32) if labels.dtype == np.uint16 else labels))
    out, _ = _nearest(t, None, g, 65536 if labels.dtype == np.uint16 else 256)
    return out.astype(labels.dtype)
