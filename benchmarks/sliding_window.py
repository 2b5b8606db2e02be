"""MONAI's sliding_window_inference vs medseg's streaming window, side by side in one command.

    python benchmarks/sliding_window.py                       # 512x512x400, 14 classes, ROI 96^3
    python benchmarks/sliding_window.py --shape 128,128,64    # a small volume

Each method runs in its own child process (so peak RSS is its own), on the same seeded input and
the same cheap network (a 3x3x3 convolution to the classes; the inferer's cost, not the network's, is
measured). MONAI's result is turned into labels the way a user does (argmax); medseg returns labels.
Reported: wall time of the inference call, peak RSS of the process, peak RSS above the process's
size once the input exists, and the fraction of voxels whose labels agree.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def rss_now_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(method: str, shape, classes: int, roi, overlap: float, sw_batch_size: int, out: str) -> None:
    import numpy as np
    import torch

    from medseg.engine.window import monai_sliding_window, stream_sliding_window

    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, classes, 3, padding=1).eval()
    x = torch.rand((1, 1, *shape), generator=torch.Generator().manual_seed(1))
    base = rss_now_mb()
    run = monai_sliding_window if method == "monai" else stream_sliding_window
    t0 = time.perf_counter()
    labels, _ = run(x, roi, sw_batch_size, net, overlap=overlap, mode="gaussian")
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    np.save(out, labels.numpy())
    print(json.dumps({"method": method, "seconds": seconds, "peak_rss_mb": peak, "rss_before_mb": base}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="512,512,400")
    ap.add_argument("--classes", type=int, default=14)
    ap.add_argument("--roi", default="96,96,96")
    ap.add_argument("--overlap", type=float, default=0.25)
    ap.add_argument("--sw-batch-size", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=1, help="runs per method, alternating; median time, max peak")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    roi = tuple(int(v) for v in args.roi.split(","))
    if args.child:
        child(args.child, shape, args.classes, roi, args.overlap, args.sw_batch_size, args.out)
        return

    import numpy as np

    runs: dict[str, list[dict]] = {"monai": [], "stream": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            for method in (("monai", "stream") if i % 2 == 0 else ("stream", "monai")):
                out = str(Path(tmp) / f"{method}.npy")
                cmd = [sys.executable, __file__, "--child", method, "--out", out, "--shape", args.shape, "--classes", str(args.classes),
                       "--roi", args.roi, "--overlap", str(args.overlap), "--sw-batch-size", str(args.sw_batch_size)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
                if proc.returncode != 0:
                    sys.exit(f"{method} failed:\n{proc.stderr[-2000:]}")
                runs[method].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        a, b = np.load(str(Path(tmp) / "monai.npy")), np.load(str(Path(tmp) / "stream.npy"))
        agree = float((a == b).mean())
    results = {}
    for method, rs in runs.items():
        results[method] = {"seconds": float(np.median([r["seconds"] for r in rs])), "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
                           "rss_before_mb": min(r["rss_before_mb"] for r in rs), "all_seconds": [round(r["seconds"], 1) for r in rs]}

    m, s = results["monai"], results["stream"]
    print(f"volume {shape}, {args.classes} classes, roi {roi}, overlap {args.overlap}, sw_batch_size {args.sw_batch_size}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads default")
    print(f"{'method':<8} {'time s':>8} {'peak RSS MB':>12} {'above input MB':>15}")
    for name, r in (("monai", m), ("stream", s)):
        print(f"{name:<8} {r['seconds']:>8.1f} {r['peak_rss_mb']:>12.0f} {r['peak_rss_mb'] - r['rss_before_mb']:>15.0f}")
    print(f"peak RSS ratio stream/monai: {s['peak_rss_mb'] / m['peak_rss_mb']:.3f}; "
          f"above-input ratio: {(s['peak_rss_mb'] - s['rss_before_mb']) / (m['peak_rss_mb'] - m['rss_before_mb']):.3f}")
    print(f"time ratio stream/monai: {s['seconds'] / m['seconds']:.3f} (median of {args.repeat}; "
          f"monai {m['all_seconds']}, stream {s['all_seconds']})")
    print(f"labels identical on {agree * 100:.4f}% of voxels")


if __name__ == "__main__":
    main()
