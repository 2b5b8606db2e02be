"""onnxruntime (CPU) against PyTorch (CPU) on one sliding-window batch, for every shipped bundle's model.

    python benchmarks/export_onnx.py                       # the five shipped bundles, 3 repetitions
    python benchmarks/export_onnx.py --bundles bundles/vnet.json --reps 9

Each bundle's network is built as medseg builds it (its model.args, classes and window; seeded
weights: speed does not depend on their values) and exported with medseg's own exporter
(``medseg.export.graph.write_onnx``, what ``medseg export --format onnx`` writes). Then, in one
process, the same input (one batch of ``sliding_window.sw_batch_size`` windows, the call medseg's
sliding window makes) runs through PyTorch eager (the model exactly as ``medseg infer`` runs it,
under ``torch.no_grad``, float32) and onnxruntime's CPUExecutionProvider, interleaved rep by rep after
one warm-up call each, both with the same number of threads. Reported: median seconds per window and
the ratio onnxruntime / PyTorch (below 1: onnxruntime is faster), with the export time, the file
size and the largest logit difference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ["vnet", "unetr", "swin_unetr", "fcn2d", "fcn_triplanar"]


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), platform.processor())
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"


def measure(bundle_path: Path, reps: int, threads: int, folder: Path) -> dict:
    import numpy as np
    import onnxruntime as ort
    import torch

    from medseg.config import load_bundle
    from medseg.export import graph
    from medseg.models import create_model

    bundle = load_bundle(bundle_path)
    name, roi = bundle.model.name, tuple(bundle.infer_roi)
    torch.manual_seed(0)
    model = create_model(name, out_channels=len(bundle.data.labels) + 1, roi=bundle.train.roi, **bundle.model.args).eval()
    batch = bundle.sliding_window.sw_batch_size
    x = graph.example_windows(batch, 1, roi, 0.0, 1.0, seed=1)
    path = folder / f"{name}.onnx"
    t0 = time.perf_counter()
    graph.write_onnx(graph.graph_module(model), x, path)
    export_seconds = time.perf_counter() - t0
    session = graph.onnx_session(path, threads=threads)
    feed = {"image": x.numpy()}

    def run_torch():
        with torch.no_grad():
            return model(x).numpy()

    def run_ort():
        return session.run(["logits"], feed)[0]

    ref, got = run_torch(), run_ort()  # warm-up, and the parity of this very input
    t_torch, t_ort = [], []
    for _ in range(reps):  # interleaved: a load change on the shared machine hits both alike
        t = time.perf_counter()
        run_torch()
        t_torch.append(time.perf_counter() - t)
        t = time.perf_counter()
        run_ort()
        t_ort.append(time.perf_counter() - t)
    torch_s, ort_s = statistics.median(t_torch) / batch, statistics.median(t_ort) / batch
    return {"bundle": str(bundle_path.relative_to(ROOT) if bundle_path.is_relative_to(ROOT) else bundle_path), "model": name,
            "window": list(roi), "batch": batch, "parameters": sum(p.numel() for p in model.parameters()),
            "export_seconds": export_seconds, "onnx_mb": sum(p.stat().st_size for p in folder.glob(f"{name}.onnx*")) / 2**20,
            "torch_s_per_window": torch_s, "ort_s_per_window": ort_s, "ratio_ort_over_torch": ort_s / torch_s,
            "torch_reps_s": t_torch, "ort_reps_s": t_ort, "max_abs_logit_diff": float(np.abs(got - ref).max()),
            "argmax_agreement": float((got.argmax(1) == ref.argmax(1)).mean()), "onnxruntime": ort.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundles", nargs="*", type=Path, default=[ROOT / "bundles" / f"{m}.json" for m in SHIPPED])
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions per runtime (after one warm-up each)")
    ap.add_argument("--threads", type=int, default=None, help="threads for both runtimes (default: torch's default)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()

    import onnxruntime as ort
    import torch

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs (nproc), torch {torch.__version__} ({threads} threads), "
          f"onnxruntime {ort.__version__} CPUExecutionProvider ({threads} threads), python {platform.python_version()}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for b in args.bundles:
            row = measure(b.resolve(), args.reps, threads, Path(tmp))
            rows.append(row)
            print(f"  {row['model']}: PyTorch {row['torch_s_per_window']:.3f} s, onnxruntime {row['ort_s_per_window']:.3f} s per window "
                  f"(ratio {row['ratio_ort_over_torch']:.2f}); export {row['export_seconds']:.0f} s", file=sys.stderr, flush=True)
    print()
    print("| model (bundle) | window x batch | params | export | model.onnx | PyTorch s/window | onnxruntime s/window | "
          "ratio ORT / PyTorch | max abs logit diff | argmax agree |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['model']} ({r['bundle']}) | {'x'.join(map(str, r['window']))} x {r['batch']} | {r['parameters'] / 1e6:.1f} M | "
              f"{r['export_seconds']:.0f} s | {r['onnx_mb']:.0f} MB | {r['torch_s_per_window']:.3f} | {r['ort_s_per_window']:.3f} | "
              f"**{r['ratio_ort_over_torch']:.2f}** | {r['max_abs_logit_diff']:.1e} | {r['argmax_agreement']:.4%} |")
    if args.json:
        args.json.write_text(json.dumps({"threads": threads, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
