"""The memory estimate (a trace on fake tensors) against memory measured another way.

    python benchmarks/memory_estimate.py                    # training steps: peak RSS growth on the CPU
    python benchmarks/memory_estimate.py --inference        # sliding-window inference: peak RSS growth
    python benchmarks/memory_estimate.py --cuda [--amp]     # torch.cuda.max_memory_allocated (needs a GPU)

Every case runs in a fresh Python process, alone. The process imports torch and medseg, builds the
model, allocates its inputs, then reads its resident set (VmRSS) and resets its high-water mark
(``/proc/self/clear_refs``). Training then runs two real steps (the default loss, DiceCE; backward;
AdamW in its foreach form); inference runs MONAI's or medseg's sliding window over a volume. The
measured growth is the high-water mark (VmHWM) minus that baseline: after step 1, and after step 2.
The estimate is what ``medseg memory`` adds on top of what exists at the baseline (parameters,
batch, input volume): the traced peak of step 1 and of steps 1-2, or the forward of one window
batch plus the sliding window's buffers. With ``--cuda`` the model and batch live on the GPU and
the measurement is ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` at the baseline.

RSS is not what the estimate counts (live tensor bytes): it adds the CPU allocator's caching and
fragmentation (glibc keeps freed chunks below its mmap threshold), oneDNN's scratch buffers and
primitive caches, the autograd engine's and OpenMP's threads, and pages of libraries touched for the
first time. RSS is not affected by the load of other processes; the time column is.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time

TRAIN_CASES = [
    ("vnet", {}, (32, 32, 32)), ("vnet", {}, (64, 64, 64)), ("vnet", {}, (96, 96, 96)),
    ("unetr", {}, (32, 32, 32)), ("unetr", {}, (64, 64, 64)), ("unetr", {}, (96, 96, 96)),
    ("swin_unetr", {"feature_size": 24}, (64, 64, 64)), ("swin_unetr", {"feature_size": 24}, (96, 96, 96)),
]
INFER_CASE = ("swin_unetr", {"feature_size": 12}, (64, 64, 64))
INFER_VOLUME = (256, 256, 128)


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> int:
    """Current RSS in bytes, after resetting the high-water mark to it (Linux >= 4.0)."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_kib("VmRSS") * 1024


def peak_growth(baseline: int) -> int:
    return status_kib("VmHWM") * 1024 - baseline


# -- workers: one case each, in a fresh process ---------------------------------------------------
def train_worker(case: dict) -> dict:
    import torch

    from medseg.cost.memory import loss_and_optimizer
    from medseg.models import create_model

    cuda = case["cuda"]
    dev = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    model = create_model(case["model"], out_channels=case["classes"], roi=tuple(case["roi"]), **case["args"]).to(dev).train()
    x = torch.randn(case["batch"], 1, *case["roi"], device=dev)
    y = torch.randint(0, case["classes"], (case["batch"], 1, *case["roi"]), device=dev).float()
    loss_fn, optimizer = loss_and_optimizer(model)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and case["amp"])
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = reset_peak()
    peaks, t0 = [], time.time()
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(model(x), y)
        loss.backward()
        del loss
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() - base)
        else:
            peaks.append(peak_growth(base))
    out = {"step1": peaks[0], "steps12": peaks[1], "seconds": time.time() - t0}
    if cuda:
        out["reserved"] = torch.cuda.max_memory_reserved()
    return out


def infer_worker(case: dict) -> dict:
    import torch

    from medseg.engine.window import monai_sliding_window, stream_sliding_window
    from medseg.models import create_model

    torch.manual_seed(0)
    model = create_model(case["model"], out_channels=case["classes"], roi=tuple(case["roi"]), **case["args"]).eval()
    volume = torch.randn(1, 1, *case["volume"])
    run = monai_sliding_window if case["method"] == "monai" else stream_sliding_window
    base, t0 = reset_peak(), time.time()
    with torch.no_grad():
        labels, _ = run(volume, case["roi"], case["sw_batch_size"], lambda w: model(w).float(), overlap=case["overlap"])
    return {"growth": peak_growth(base), "seconds": time.time() - t0, "label_dtype": str(labels.dtype)}


def spawn(kind: str, case: dict) -> dict:
    """Run one case in a fresh interpreter and return its JSON answer."""
    done = subprocess.run([sys.executable, __file__, "--worker", kind, json.dumps(case)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} worker failed for {case}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the parent: estimates, one fresh process per measurement --------------------------------------
def mb(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def training(args) -> None:
    import torch

    from medseg.cost.memory import fake_model, loss_and_optimizer, trace_training

    print(f"training step, batch {args.batch}, {args.classes} classes, {'CUDA' + (' AMP' if args.amp else '') if args.cuda else 'CPU'}; MiB")
    print(f"{'model':<26} {'ROI':<6} {'est step 1':>10} {'meas step 1':>11} {'ratio':>6} {'est 1-2':>8} {'meas 1-2':>9} "
          f"{'ratio':>6} {'s':>5}")
    for name, margs, roi in TRAIN_CASES:
        model, mode = fake_model(name, roi, args.classes, margs)
        model.train()
        with mode:
            x, y = torch.empty(args.batch, 1, *roi), torch.zeros(args.batch, 1, *roi)
        loss_fn, opt = loss_and_optimizer(model)
        est = trace_training(model, x, y, loss_fn, opt, amp=args.amp)
        case = {"model": name, "args": margs, "roi": list(roi), "batch": args.batch, "classes": args.classes, "cuda": args.cuda,
                "amp": args.amp}
        m = spawn("train", case)
        label = f"{name}{' ' + str(margs) if margs else ''}".replace("'feature_size': ", "f")
        print(f"{label:<26} {roi[0]:<6} {mb(est.first_step):>10} {mb(m['step1']):>11} {m['step1'] / est.first_step:>6.2f} "
              f"{mb(est.steady):>8} {mb(m['steps12']):>9} {m['steps12'] / est.steady:>6.2f} {m['seconds']:>5.0f}", flush=True)


def inference(args) -> None:
    from medseg.cost.memory import inference_memory

    name, margs, roi = INFER_CASE
    print(f"sliding window: {name} {margs}, ROI {list(roi)}, volume {list(INFER_VOLUME)}, {args.classes} classes, "
          f"sw_batch_size {args.sw_batch_size}, overlap {args.overlap}, CPU; MiB")
    print(f"{'method':<8} {'estimate':>9} {'measured':>9} {'ratio':>6} {'s':>5}   estimate = window batch + forward + buffers")
    for method in ("monai", "stream"):
        est = inference_memory(name, roi, args.sw_batch_size, args.classes, margs, volume=INFER_VOLUME, overlap=args.overlap,
                               method=method, resample="nearest")  # the window alone, as the worker runs it
        at_baseline = est.device["parameters and buffers (float32)"] + est.host["input volume (float32)"]
        expected = est.cpu_total - at_baseline
        case = {"model": name, "args": margs, "roi": list(roi), "volume": list(INFER_VOLUME), "classes": args.classes,
                "sw_batch_size": args.sw_batch_size, "overlap": args.overlap, "method": method}
        m = spawn("infer", case)
        baseline = ("parameters and buffers (float32)", "input volume (float32)")
        parts = ", ".join(f"{k} {mb(v)}" for k, v in {**est.device, **est.host}.items() if k not in (*baseline, *est.cuda_only))
        print(f"{method:<8} {mb(expected):>9} {mb(m['growth']):>9} {m['growth'] / expected:>6.2f} {m['seconds']:>5.0f}   ({parts})",
              flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, case = sys.argv[2], json.loads(sys.argv[3])
        print(json.dumps(train_worker(case) if kind == "train" else infer_worker(case)))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inference", action="store_true", help="sliding-window inference instead of training steps")
    ap.add_argument("--cuda", action="store_true", help="measure torch.cuda.max_memory_allocated (needs a GPU)")
    ap.add_argument("--amp", action="store_true", help="with --cuda: bf16 autocast, as training on a GPU runs")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--classes", type=int, default=14)
    ap.add_argument("--sw-batch-size", type=int, default=2)
    ap.add_argument("--overlap", type=float, default=0.25)
    args = ap.parse_args()
    if args.amp and not args.cuda:
        ap.error("--amp needs --cuda: CPU autocast casts other ops than CUDA's, so a CPU run cannot check it")
    if args.cuda:
        import torch

        if not torch.cuda.is_available():
            ap.error("--cuda: no CUDA device here")
        if args.inference:
            ap.error("--inference measures host RAM on the CPU; run it without --cuda")
    (inference if args.inference else training)(args)


if __name__ == "__main__":
    main()
