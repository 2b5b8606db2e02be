"""Memory-bounded sliding-window inference.

MONAI's ``sliding_window_inference`` adds every window's weighted logits into one float32 buffer of
classes x volume (plus a count map), then divides and returns it: 14 classes on 512x512x400 is 5.9 GB
before the caller's argmax, and 100+ classes do not fit. Here the volume is cut into tiles at every
window boundary. Each tile is covered by a fixed set of windows, known in advance; a tile's
accumulator is allocated when its first window arrives and, when its last window has been added, it
is divided by its weight sum, turned into labels (uint8/uint16) and freed. Windows run in MONAI's
order with MONAI's positions and importance map, so every voxel receives the same terms in the same
order: the result equals MONAI's up to float rounding, while peak memory follows the frontier of open
tiles (about classes x roi x one face of the volume) instead of classes x volume.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map, dense_patch_slices

# Below this many bytes for MONAI's output + count buffers, MONAI's inferer is used as it is.
MONAI_BUFFER_LIMIT = 512 * 2**20


def label_dtype(n_classes: int) -> torch.dtype:
    """uint8 up to 256 classes, else int32 (torch has no uint16 arithmetic); files store uint16."""
    return torch.uint8 if n_classes <= 256 else torch.int32


def scan_interval(image_size: Sequence[int], roi: Sequence[int], overlap: float) -> tuple[int, ...]:
    """MONAI's rule: ``int(roi * (1 - overlap))`` (at least 1), or the ROI when it equals the image."""
    return tuple(r if r == s else max(1, int(r * (1 - overlap))) for s, r in zip(image_size, roi))


def monai_buffer_bytes(n_classes: int, spatial: Sequence[int]) -> int:
    """What MONAI's sliding window holds for the output: float32 classes x volume + a count map."""
    return (n_classes + 1) * int(np.prod(spatial)) * 4


def choose_method(n_classes: int, spatial: Sequence[int], method: str = "auto") -> str:
    if method not in ("auto", "monai", "stream"):
        raise ValueError(f"method must be auto, monai or stream, got {method!r}")
    if method != "auto":
        return method
    return "monai" if monai_buffer_bytes(n_classes, spatial) <= MONAI_BUFFER_LIMIT else "stream"


class _Axis:
    """Window starts along one axis, the tile cuts they induce, and which tiles each window covers."""

    def __init__(self, starts: Sequence[int], roi: int, size: int) -> None:
        self.cuts = sorted({0, size, *starts, *(s + roi for s in starts)})
        self.bounds = list(zip(self.cuts[:-1], self.cuts[1:]))
        self.cover = {s: [i for i, (a, b) in enumerate(self.bounds) if a >= s and b <= s + roi] for s in set(starts)}
        self.count = [sum(1 for s in set(starts) if a >= s and b <= s + roi) for a, b in self.bounds]


def _tiling(spatial: Sequence[int], roi: Sequence[int], overlap: float):
    windows = dense_patch_slices(tuple(spatial), tuple(roi), scan_interval(spatial, roi, overlap), return_slice=True)
    axes = [_Axis(sorted({w[d].start for w in windows}), roi[d], spatial[d]) for d in range(3)]
    return windows, axes


def frontier_voxels(spatial: Sequence[int], roi: Sequence[int], overlap: float) -> int:
    """The most voxels held in open tiles at once while streaming ``spatial`` (padded to the ROI):
    what the accumulators cost, times (classes + 1) x 4 bytes. Computed without allocating."""
    spatial = tuple(max(s, r) for s, r in zip(spatial, roi))
    windows, axes = _tiling(spatial, roi, overlap)
    remaining: dict[tuple[int, int, int], int] = {}
    live = peak = 0
    for w in windows:
        starts = [w[d].start for d in range(3)]
        for key in itertools.product(*(axes[d].cover[starts[d]] for d in range(3))):
            if key not in remaining:
                remaining[key] = axes[0].count[key[0]] * axes[1].count[key[1]] * axes[2].count[key[2]]
                live += math.prod(axes[d].bounds[key[d]][1] - axes[d].bounds[key[d]][0] for d in range(3))
                peak = max(peak, live)
            remaining[key] -= 1
            if remaining[key] == 0:
                del remaining[key]
                live -= math.prod(axes[d].bounds[key[d]][1] - axes[d].bounds[key[d]][0] for d in range(3))
    return peak


@torch.no_grad()
def stream_sliding_window(
    inputs: torch.Tensor,
    roi_size: Sequence[int],
    sw_batch_size: int,
    predictor: Callable[[torch.Tensor], torch.Tensor],
    overlap: float = 0.25,
    mode: str = "gaussian",
    sigma_scale: float = 0.125,
    device: torch.device | str | None = None,
    return_probabilities: bool = False,
    on_window: Callable[[int, int], None] | None = None,
    logits_out: torch.Tensor | None = None,
    pad_value: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sliding-window inference on ``inputs`` (1, C_in, *spatial) that returns the argmax label map
    (spatial, uint8, or uint16 past 255 classes) and, if asked, softmax probabilities as float16
    (classes, *spatial). ``predictor`` maps (n, C_in, *roi) to logits (n, classes, *roi) and runs on
    ``device`` (default: the input's); accumulation stays on the CPU. ``logits_out``, a float32
    (classes, *padded spatial) tensor, receives the blended logits (for checks against MONAI).
    ``pad_value``: what an image smaller than the ROI is padded with; it must be what training
    padded patches with (the input's value for air, :func:`medseg.data.transforms.pad_value`), or
    the network sees the body surrounded by something it never saw."""
    if inputs.ndim != 5 or inputs.shape[0] != 1:
        raise ValueError(f"inputs must be (1, C, H, W, D), got {tuple(inputs.shape)}")
    roi = tuple(int(r) for r in roi_size)
    device = torch.device(device) if device is not None else inputs.device
    spatial0 = tuple(inputs.shape[2:])

    # Pad like MONAI when the image is smaller than the ROI (constant, split evenly).
    pad = []
    for k in range(2, -1, -1):
        diff = max(roi[k] - spatial0[k], 0)
        pad += [diff // 2, diff - diff // 2]
    if any(pad):
        inputs = F.pad(inputs, pad=pad, mode="constant", value=float(pad_value))
    spatial = tuple(inputs.shape[2:])

    windows, axes = _tiling(spatial, roi, overlap)
    weight = compute_importance_map(roi, mode=mode, sigma_scale=sigma_scale, device="cpu", dtype=torch.float32)

    labels: torch.Tensor | None = None
    probs: torch.Tensor | None = None
    open_acc: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    remaining: dict[tuple[int, int, int], int] = {}

    def finish(key, acc, wsum) -> None:
        region = tuple(slice(*axes[d].bounds[key[d]]) for d in range(3))
        mean = acc.div_(wsum)  # in place, as MONAI's output /= count map
        labels[region] = mean.argmax(dim=0).to(labels.dtype)
        if logits_out is not None:
            logits_out[(slice(None), *region)] = mean
        if probs is not None:  # softmax in place: no tile-sized temporaries
            mean.sub_(mean.amax(dim=0, keepdim=True)).exp_()
            mean.div_(mean.sum(dim=0, keepdim=True))
            probs[(slice(None), *region)] = mean

    for first in range(0, len(windows), sw_batch_size):
        batch = windows[first : first + sw_batch_size]
        x = torch.cat([inputs[(slice(None), slice(None), *w)] for w in batch]).to(device)
        logits = predictor(x).to("cpu", torch.float32)
        if labels is None:
            n_classes = logits.shape[1]
            labels = torch.zeros(spatial, dtype=label_dtype(n_classes))
            if return_probabilities:
                probs = torch.zeros((n_classes, *spatial), dtype=torch.float16)
        for w, out in zip(batch, logits):
            out = out * weight  # as MONAI: patch * importance map, then added
            starts = [w[d].start for d in range(3)]
            for key in itertools.product(*(axes[d].cover[starts[d]] for d in range(3))):
                sub = tuple(slice(axes[d].bounds[key[d]][0] - starts[d], axes[d].bounds[key[d]][1] - starts[d]) for d in range(3))
                if key not in open_acc:
                    shape = tuple(b - a for a, b in (axes[d].bounds[key[d]] for d in range(3)))
                    open_acc[key] = (torch.zeros((out.shape[0], *shape)), torch.zeros(shape))
                    remaining[key] = axes[0].count[key[0]] * axes[1].count[key[1]] * axes[2].count[key[2]]
                acc, wsum = open_acc[key]
                acc += out[(slice(None), *sub)]
                wsum += weight[sub]
                remaining[key] -= 1
                if remaining[key] == 0:
                    finish(key, acc, wsum)
                    del open_acc[key], remaining[key]
        if on_window is not None:
            on_window(min(first + sw_batch_size, len(windows)), len(windows))
    if open_acc:  # every tile is covered by the window grid; anything left is a bug
        raise RuntimeError(f"{len(open_acc)} tiles were never completed")

    if any(pad):
        crop = tuple(slice(pad[4 - 2 * d], pad[4 - 2 * d] + spatial0[d]) for d in range(3))
        labels = labels[crop].contiguous()
        if probs is not None:
            probs = probs[(slice(None), *crop)].contiguous()
    return labels, probs


@torch.no_grad()
def monai_sliding_window(inputs, roi_size, sw_batch_size, predictor, overlap=0.25, mode="gaussian", device=None,
                         return_probabilities=False, pad_value=0.0):
    """MONAI's inferer, unchanged, followed by the same argmax (and softmax). ``pad_value``: MONAI's
    ``cval``, as in :func:`stream_sliding_window`."""
    from monai.inferers import sliding_window_inference

    logits = sliding_window_inference(inputs, roi_size, sw_batch_size, predictor, overlap=overlap, mode=mode,
                                      sw_device=device, device="cpu", cval=float(pad_value))
    logits = logits[0].float()
    n_classes = logits.shape[0]
    labels = logits.argmax(dim=0).to(label_dtype(n_classes))
    probs = torch.softmax(logits, dim=0).to(torch.float16) if return_probabilities else None
    return labels, probs
