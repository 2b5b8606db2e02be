"""The memory estimate (meta-device trace) against measurements, for three ROI sizes per 3D model.

    python benchmarks/memory_estimate.py            # CPU: lifetime tracker on a real pass, and RSS growth
    python benchmarks/memory_estimate.py --cuda     # also torch.cuda.max_memory_allocated, when a GPU exists

On CPU the "measured" activation peak is the same tensor-lifetime tracker run on a real forward and
backward (real kernels, real tensors); RSS growth of the process is shown beside it, which adds the
CPU allocator's caching and oneDNN workspaces the estimate does not model. On CUDA the comparison is
with max_memory_allocated over a training step (forward, backward, AdamW step), against the
estimate's total.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from medseg.cost.memory import trace_peak, training_memory
from medseg.models import create_model

CASES = {
    "vnet": ({}, [(32, 32, 32), (48, 48, 48), (64, 64, 64)]),
    "unetr": ({"feature_size": 16, "hidden_size": 768, "mlp_dim": 3072, "num_heads": 12}, [(32, 32, 32), (64, 64, 64), (96, 96, 96)]),
    "swin_unetr": ({"feature_size": 24}, [(64, 64, 64), (96, 96, 96), (128, 128, 128)]),
}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--classes", type=int, default=14)
    ap.add_argument("--cuda", action="store_true")
    args = ap.parse_args()
    print(f"{'model':<11} {'roi':<14} {'estimate MB':>12} {'measured MB':>12} {'est/meas':>9} {'RSS growth MB':>14} {'trace s':>8}")
    for name, (margs, rois) in CASES.items():
        for roi in rois:
            t0 = time.time()
            est = training_memory(name, roi, args.batch, args.classes, margs)
            traced = est.parts["activations + gradients (traced)"]
            t_est = time.time() - t0
            torch.manual_seed(0)
            model = create_model(name, out_channels=args.classes, roi=roi, **margs).train()
            x = torch.randn(args.batch, 1, *roi)
            before = rss_mb()
            measured = trace_peak(model, x, backward=True)
            growth = rss_mb() - before
            print(f"{name:<11} {str(list(roi)):<14} {traced / 2**20:>12.1f} {measured / 2**20:>12.1f} {traced / measured:>9.3f} "
                  f"{growth:>14.0f} {t_est:>8.1f}")
            if args.cuda and torch.cuda.is_available():
                model = model.cuda()
                opt = torch.optim.AdamW(model.parameters())
                torch.cuda.reset_peak_memory_stats()
                model(x.cuda()).float().sum().backward()
                opt.step()
                peak = torch.cuda.max_memory_allocated()
                print(f"{'':<11} {'cuda step':<14} {est.total / 2**20:>12.1f} {peak / 2**20:>12.1f} {est.total / peak:>9.3f}")
            del model, x


if __name__ == "__main__":
    main()
