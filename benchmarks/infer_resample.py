"""Back to the scan's grid: the old way (nearest labels + per-class float32 linear probabilities) vs
medseg's slab resampling (``--resample linear`` / ``nearest``), side by side.

    python benchmarks/infer_resample.py                                  # 512x512x160 CT grid, 14 classes
    python benchmarks/infer_resample.py --classes 40 --shape 512,512,120

Input: seeded random logits on the model grid (1.5 x 1.5 x 2 mm over the scan's field of view, body
crop = the whole grid), softmax to float16 as the sliding window returns them, and an oblique
(10 degree) 0.78 x 0.78 x 1.25 mm scan grid. Each method runs in its own child process. Reported:
wall time, peak RSS above the process's size once the inputs exist (VmHWM reset there), the fraction of voxels whose
label is an argmax of the saved uint8 probabilities, and label agreement with the linear method.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("old", "linear+probabilities", "linear", "nearest")


def status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    """Linux >= 4.0: reset VmHWM (the peak RSS) to the current RSS, so that the peak measured is the
    method's, not the set-up's (which builds float32 logits first)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def setup(shape, classes: int):
    import numpy as np
    import torch

    from medseg.engine.pipeline import Grids, WindowResult

    a = np.deg2rad(10)
    rot = np.array([[np.cos(a), -np.sin(a), 0, 0], [np.sin(a), np.cos(a), 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    input_affine = rot @ np.diag([0.78, 0.78, 1.25, 1.0])
    extent = np.array(shape) * [0.78, 0.78, 1.25]
    model_spacing = np.array([1.5, 1.5, 2.0])
    model_shape = tuple(int(v) for v in np.ceil(extent * 1.1 / model_spacing))
    model_affine = np.diag([*model_spacing, 1.0])
    model_affine[:3, 3] = -0.05 * extent - [20, 20, 0]
    g = torch.Generator().manual_seed(0)
    logits = torch.randn((classes, *(max(2, s // 12) for s in model_shape)), generator=g) * 4  # smooth blobs: upsampled noise
    logits = torch.nn.functional.interpolate(logits[None], size=model_shape, mode="trilinear")[0]
    labels = logits.argmax(0).to(torch.uint8)
    probs = torch.softmax(logits, 0).to(torch.float16)
    del logits
    crop = tuple(slice(0, s) for s in model_shape)
    return WindowResult(labels, probs, "stream"), Grids(model_shape, model_affine, crop, tuple(shape), input_affine)


def old_way(result, g):
    """What infer.py did before: nearest labels, then per class a float32 linear resampling of a
    float32 classes x model-grid copy, rounded to uint8."""
    import numpy as np
    from scipy.ndimage import affine_transform

    matrix = g.matrix()
    labels = affine_transform(result.labels.numpy(), matrix, output_shape=g.input_shape, order=0, mode="constant", cval=0)
    prob_res = result.probabilities.float().numpy()  # the old float32 classes x volume array
    out = np.empty((*g.input_shape, prob_res.shape[0]), dtype=np.uint8)
    for c in range(prob_res.shape[0]):
        p = affine_transform(prob_res[c], matrix, output_shape=g.input_shape, order=1, mode="nearest")
        out[..., c] = np.clip(np.rint(p * 255), 0, 255).astype(np.uint8)
    return labels, out


def child(method: str, shape, classes: int, threads: int, out: str) -> None:
    import numpy as np
    import torch

    from medseg.engine.pipeline import to_input_grid

    torch.set_num_threads(threads)
    result, g = setup(shape, classes)
    reset_peak()
    base = status_mb("VmRSS")
    t0 = time.perf_counter()
    if method == "old":
        labels, probs = old_way(result, g)
    else:
        kind = method.split("+")[0]
        labels, probs = to_input_grid(result, g, kind, classes, probabilities=method.endswith("probabilities"))
    seconds = time.perf_counter() - t0
    peak = status_mb("VmHWM")
    consistent = None
    if probs is not None:
        at = np.take_along_axis(probs, labels[..., None].astype(np.int64), axis=-1)[..., 0]
        consistent = float((at >= probs.max(-1)).mean())
    np.save(out, labels)
    print(json.dumps({"method": method, "seconds": seconds, "peak_rss_mb": peak, "rss_before_mb": base, "consistent": consistent,
                      "model_shape": g.model_shape}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="512,512,160", help="scan grid (0.78 x 0.78 x 1.25 mm)")
    ap.add_argument("--classes", type=int, default=14)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (SciPy, the old way, uses one)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    if args.child:
        child(args.child, shape, args.classes, args.threads, args.out)
        return

    import numpy as np

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            out = str(Path(tmp) / f"{method}.npy")
            cmd = [sys.executable, __file__, "--child", method, "--out", out, "--shape", args.shape, "--classes", str(args.classes),
                   "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if proc.returncode != 0:
                sys.exit(f"{method} failed:\n{proc.stderr[-2000:]}")
            results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
        ref = np.load(str(Path(tmp) / "linear.npy")) if "linear" in results else None
        for method in results:
            results[method]["agree"] = float((np.load(str(Path(tmp) / f"{method}.npy")) == ref).mean()) if ref is not None else None
    model_shape = next(iter(results.values()))["model_shape"]
    print(f"scan grid {shape} (oblique, 0.78x0.78x1.25 mm), model grid {tuple(model_shape)}, {args.classes} classes")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}")
    print(f"{'method':<22} {'time s':>8} {'peak above MB':>15} {'label = argmax(saved p)':>24} {'labels = linear':>16}")
    for name, r in results.items():
        cons = "-" if r["consistent"] is None else f"{100 * r['consistent']:.4f} %"
        agree = "-" if r["agree"] is None else f"{100 * r['agree']:.3f} %"
        print(f"{name:<22} {r['seconds']:>8.1f} {r['peak_rss_mb'] - r['rss_before_mb']:>15.0f} {cons:>24} {agree:>16}")


if __name__ == "__main__":
    main()
