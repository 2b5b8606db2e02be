"""The comparison's report: compare.json (everything), compare.csv (one row per model, space and
class), compare.md (the tables a reader wants first), and three pictures: Dice per model and class,
the same slice of one case segmented by every model, and the learning curves."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from medseg.data.io import write_text_atomic

METRICS = ("dice", "iou", "precision", "recall", "accuracy", "hd95_mm", "nsd")
COST = ("parameters", "patches_per_step", "train_flops_per_step", "flops_per_window", "flops_per_volume", "train_seconds",
        "infer_seconds_per_volume", "model_bytes", "peak_memory_bytes")


def write_report(report: dict[str, Any], out: Path) -> list[Path]:
    from medseg.engine.evaluate import _json_safe

    figures = {"dice": dice_bars(report, out / "dice.png"), "slices": slice_figure(report, out / "slices.png"),
               "curves": learning_curves(report, out / "curves.png")}
    report["figures"] = figures
    paths = [write_text_atomic(out / "compare.json", json.dumps(_json_safe(report), indent=2) + "\n"),
             write_text_atomic(out / "compare.csv", table_csv(report)),
             write_text_atomic(out / "compare.md", markdown(report))]
    return paths + [out / f["file"] for f in figures.values()]


def csv_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per model, space (``original``: each scan's own geometry; ``training_spacing``: the
    model grid) and class, then the foreground mean (class ``mean``); the model's cost on every row."""
    rows = []
    for m in report["models"]:
        cost = {k: m.get(k) for k in COST}
        for space in ("original", "training_spacing"):
            block = m[space]
            if block is None:
                continue
            for cls, values in block["per_class"].items():
                rows.append({"model": m["name"], "space": space, "class": cls, **{k: values[k] for k in METRICS}, **cost})
            rows.append({"model": m["name"], "space": space, "class": "mean",
                         **{k: block["summary"][f"mean_{k}"] for k in METRICS}, **cost})
    return rows


def table_csv(report: dict[str, Any]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["model", "space", "class", *METRICS, *COST], lineterminator="\n")
    writer.writeheader()
    for row in csv_rows(report):
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    return buf.getvalue()


def _f(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _giga(value) -> str:
    return "-" if value is None else f"{value / 1e9:,.1f}"


def markdown(report: dict[str, Any]) -> str:
    p = report["protocol"]
    models = report["models"]
    lines = ["# medseg compare", ""]
    scored = f"{p['folds']}-fold cross-validation" if p["folds"] else f"trained on every case, scored on {p['test']}"
    lines += [f"- data: {p['data_source']}; classes: {', '.join(p['labels'])}; {scored}",
              f"- budget: {p['budget']}; spacing {p['spacing']} mm; normalisation {p['normalization']}",
              f"- device: {report['device']}; this invocation took {report['seconds'] / 60:.1f} min (runs it reused not counted)", ""]
    for note in report["notes"]:
        lines.append(f"- note: {note}")
    lines += ["", "## Scores in each scan's own geometry (medseg evaluate), foreground mean over classes", "",
              "| model | Dice | IoU | precision | recall | accuracy | HD95 mm | NSD | Dice at training spacing | params (M) | "
              "train GFLOPs / step | GFLOPs / window | GFLOPs / volume | train min | infer s / volume | "
              "inference memory above the weights, MB |",
              "|" + " --- |" * 16]
    for m in models:
        s = m["original"]["summary"]
        grid = m["training_spacing"]["summary"]["mean_dice"] if m["training_spacing"] else None
        train = "-" if m["train_seconds"] is None else f"{m['train_seconds'] / 60:.1f}"
        lines.append(f"| {m['name']} ({m['display']}) | {_f(s['mean_dice'])} | {_f(s['mean_iou'])} | {_f(s['mean_precision'])} | "
                     f"{_f(s['mean_recall'])} | {_f(s['mean_accuracy'], 4)} | {_f(s['mean_hd95_mm'], 1)} | {_f(s['mean_nsd'])} | "
                     f"{_f(grid)} | {m['parameters'] / 1e6:.2f} | {_giga(m.get('train_flops_per_step'))} | "
                     f"{_giga(m['flops_per_window'])} | {_giga(m['flops_per_volume'])} | "
                     f"{train} | {m['infer_seconds_per_volume']:.2f} | {m['peak_memory_bytes'] / 2**20:.0f} |")
    classes = [c for c in models[0]["original"]["per_class"] if c != "background"]
    lines += ["", "## Dice per class (each scan's geometry / training spacing)", "",
              "| model | " + " | ".join(classes) + " |", "|" + " --- |" * (len(classes) + 1)]
    for m in models:
        cells = []
        for c in classes:
            a = m["original"]["per_class"].get(c, {}).get("dice")
            b = m["training_spacing"]["per_class"].get(c, {}).get("dice") if m["training_spacing"] else None
            cells.append(f"{_f(a)} / {_f(b)}")
        lines.append(f"| {m['name']} | " + " | ".join(cells) + " |")
    kept = p.get("postprocess") or []
    post = (f"Both score spaces keep the largest connected component of {', '.join(kept)} (postprocess.largest_component)."
            if kept else "No postprocessing (postprocess.largest_component is empty).")
    lines += ["", "How these are measured: training time is the optimiser steps' wall clock summed over folds (validation "
              "not counted). Inference seconds are the median per volume of `medseg infer`'s code from the scan in memory "
              "to labels on its grid (reading and writing files not counted). Inference memory is the peak while a volume "
              f"is segmented above what was in use before, the loaded weights excluded ({models[0]['memory_how']}); on the "
              "CPU it depends on what the allocator kept from earlier cases. FLOPs are counted on the model (2 x "
              "multiply-adds): training per step (forward and backward of the step's patches), inference per sliding "
              f"window and times the windows on each body crop. {post} The budget is the same number of optimiser steps (or minutes), not the "
              "same compute: the train GFLOPs / step column says what a step costs each model.", "",
              "![Dice per model and class](dice.png)", "", "![The same slice, every model](slices.png)", "",
              "![Learning curves](curves.png)", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# pictures


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def dice_bars(report: dict[str, Any], path: Path) -> dict[str, Any]:
    """Grouped bars: per class, one bar per model (mean Dice over cases, whiskers one std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medseg.viz import class_colours

    models = report["models"]
    classes = [c for c in models[0]["original"]["per_class"] if c != "background"]
    colours = class_colours(len(models) + 1)[1:]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(classes) * max(1, len(models)) / 2 + 2), 4.2))
    width = 0.8 / len(models)
    for i, m in enumerate(models):
        means, stds = [], []
        for c in classes:
            values = [r["dice"] for r in m["original"]["rows"] if r["class"] == c and r["dice"] == r["dice"]]
            means.append(np.mean(values) if values else 0.0)
            stds.append(np.std(values) if values else 0.0)
        x = np.arange(len(classes)) + (i - (len(models) - 1) / 2) * width
        ax.bar(x, means, width, yerr=stds, capsize=2, label=m["name"], color=colours[i])
    ax.set_xticks(np.arange(len(classes)), classes, rotation=20)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Dice (each scan's geometry)")
    ax.legend(fontsize=8, ncols=min(len(models), 5), loc="upper center", bbox_to_anchor=(0.5, -0.18))
    fig.tight_layout()
    _save(fig, path)
    return {"file": path.name, "classes": classes, "models": [m["name"] for m in models]}


def _scored_cases(report: dict[str, Any]) -> list[tuple[str, str]]:
    seen: dict[str, str] = {}
    for f in report["models"][0]["folds"]:
        for c in f["cases"]:
            seen[c["case"]] = c["image"]
    return sorted(seen.items())


def slice_figure(report: dict[str, Any], path: Path) -> dict[str, Any]:
    """One case, one axial slice (the one with the most ground-truth foreground), in panels: the
    image, the ground truth, then every model's prediction, in the scan's own geometry (RAS view)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib

    from medseg.engine.evaluate import ground_truth_cases, read_label_names
    from medseg.viz import class_colours, overlay_rgba

    case, image_path = _scored_cases(report)[0]
    gt_dir = Path(report["ground_truth"])
    out = path.parent
    labels = report["protocol"]["labels"]
    gt_names = read_label_names(gt_dir / "labels.json", "")
    by_name = {n: i for i, n in enumerate(labels, start=1)}

    def canonical(img):
        return np.asarray(nib.as_closest_canonical(img).dataobj)

    ras = nib.as_closest_canonical(nib.load(image_path))
    image = np.asarray(ras.dataobj, dtype=np.float32)
    zooms = ras.header.get_zooms()[:3]
    gt_raw = canonical(nib.load(ground_truth_cases(gt_dir)[case])).astype(np.int64)
    gt = np.zeros(gt_raw.shape, np.int64)
    for value, name in gt_names.items():  # the ground truth coded like the predictions: data.labels' order
        if name in by_name:
            gt[gt_raw == value] = by_name[name]
    z = int(np.argmax((gt > 0).sum(axis=(0, 1))))
    panels = [("image", None), ("ground truth", gt)]
    for m in report["models"]:
        pred = canonical(nib.load(out / "predictions" / m["name"] / f"{case}_seg.nii.gz")).astype(np.int64)
        sidecar = json.loads((out / "predictions" / m["name"] / f"{case}_seg.json").read_text())
        recoded = np.zeros(pred.shape, np.int64)
        for value, name in sidecar["labels"].items():
            if name in by_name:
                recoded[pred == int(value)] = by_name[name]
        panels.append((m["name"], recoded))
    lut = np.concatenate([np.zeros((1, 3)), class_colours(len(labels))])
    lo, hi = -175.0, 250.0
    ncols = len(panels)
    fig, axes = plt.subplots(1, ncols, figsize=(2.6 * ncols, 3.0), squeeze=False)
    gray = np.clip((image[:, :, z] - lo) / (hi - lo), 0, 1)
    aspect = zooms[1] / zooms[0]
    for ax, (title, seg) in zip(axes[0], panels):
        ax.imshow(gray.T, cmap="gray", vmin=0, vmax=1, origin="lower", aspect=aspect)
        if seg is not None:
            ax.imshow(overlay_rgba(seg[:, :, z], lut).transpose(1, 0, 2), origin="lower", aspect=aspect, interpolation="nearest")
        ax.invert_xaxis()  # radiological, as medseg infer's preview: the patient's right on the left
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{case}, axial slice {z + 1}/{image.shape[2]} (patient's right on the left)", fontsize=9)
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=lut[i], label=name) for i, name in enumerate(labels, start=1)]
    fig.legend(handles=handles, loc="lower center", ncols=min(len(labels), 6), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    _save(fig, path)
    return {"file": path.name, "case": case, "axial_slice_1based": z + 1, "panels": [t for t, _ in panels]}


def learning_curves(report: dict[str, Any], path: Path) -> dict[str, Any]:
    """Training loss and validation Dice against optimiser steps: one colour per model, a line per fold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medseg.viz import class_colours

    models = report["models"]
    colours = class_colours(len(models) + 1)[1:]
    fig, (loss_ax, dice_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, m in enumerate(models):
        for j, f in enumerate(m["folds"]):
            rows = f["history"]
            steps = [int(r["step"]) for r in rows]
            loss = [float(r["train_loss"]) for r in rows]
            val = [(int(r["step"]), float(r["val_mean_dice"])) for r in rows if r.get("val_mean_dice") not in (None, "")]
            label = m["name"] if j == 0 else None
            loss_ax.plot(steps, loss, color=colours[i], lw=1, label=label, marker=".")
            if val:
                dice_ax.plot(*zip(*val), color=colours[i], lw=1, label=label, marker=".")
    from matplotlib.ticker import MaxNLocator

    loss_ax.set(xlabel="optimiser step", ylabel="training loss (epoch mean)")
    loss_ax.legend(fontsize=8, title="one line per fold", title_fontsize=8)
    for ax in (loss_ax, dice_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    what = "mean Dice on the training cases" if report["protocol"].get("test") else "validation mean Dice"
    dice_ax.set(xlabel="optimiser step", ylabel=what, ylim=(0, 1))
    dice_ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return {"file": path.name, "models": [m["name"] for m in models]}
