"""Cost of each augmentation transform per patch, on the CPU, with the transform forced on (p = 1).

    python benchmarks/augment_cost.py                 # 3D 64^3 (crop 96^3) and 2D 128x128 patches
    python benchmarks/augment_cost.py --roi 96,96,96

Each transform runs alone on its input (the enlarged crop for rotate_scale, the ROI for the rest),
repeated, after one warm-up call; the table gives the median milliseconds and the expected cost per
patch at the preset's probability (ms x p), whose sum is what the preset adds to a training step's
data loading per patch.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from medseg.data.augment import NAMES, PRESETS, crop_size, spatial_and_intensity


def measure(roi: list[int], repeats: int) -> list[tuple[str, float, float]]:
    rows = []
    strong = PRESETS["strong"]
    for name in NAMES:
        if name in ("flip", "rot90", "shift"):
            continue
        p = {name: 1.0}
        steps = spatial_and_intensity(roi, p, ["liver"], "ct", (-175.0, 250.0, -3.5, 5.0))
        if not steps:
            continue  # not defined for this dimensionality (elastic and low_res in 2D)
        shape = crop_size(roi, p)
        times = []
        for i in range(repeats + 1):
            data = {"image": torch.randn(1, *shape), "label": torch.randint(0, 3, (1, *shape)).float()}
            t0 = time.perf_counter()
            for step in steps:
                data = step(data)
            if i:
                times.append((time.perf_counter() - t0) * 1000)
        ms = statistics.median(times)
        expected = ms * strong.get(name, 0.0)
        if name == "rotate_scale":  # when it does not fire, the larger crop is still cut to the ROI (an identity resample)
            idle = spatial_and_intensity(roi, {name: 1e-9}, ["liver"], "ct", (-175.0, 250.0, -3.5, 5.0))
            t0 = time.perf_counter()
            for _ in range(repeats):
                data = {"image": torch.randn(1, *shape), "label": torch.randint(0, 3, (1, *shape)).float()}
                for step in idle:
                    data = step(data)
            expected += (1 - strong[name]) * (time.perf_counter() - t0) * 1000 / repeats
        rows.append((name, ms, expected))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--roi", default=None, help="one ROI, e.g. 64,64,64 (default: 64^3 and 128x128x1)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rois = [[int(v) for v in a.roi.split(",")]] if a.roi else [[64, 64, 64], [128, 128, 1]]
    print(f"torch {torch.__version__}, {a.threads} thread(s)")
    for roi in rois:
        rows = measure(roi, a.repeats)
        print(f"\nROI {roi} (crop for rotate_scale: {crop_size(roi, {'rotate_scale': 1})})")
        print("| transform | ms per patch (p = 1) | strong p | expected ms per patch |")
        print("| --- | --- | --- | --- |")
        for name, ms, expected in rows:
            print(f"| {name} | {ms:.1f} | {PRESETS['strong'].get(name, 0):g} | {expected:.1f} |")
        print(f"| **strong preset, total** | | | **{sum(r[2] for r in rows):.1f}** |")


if __name__ == "__main__":
    main()
