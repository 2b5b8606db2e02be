"""Score label maps against ground truth with MONAI's metrics: per class Dice, IoU, precision,
recall, accuracy and the 95th-percentile Hausdorff distance in millimetres.

Classes are scored one at a time (a two-channel one-hot of that class), so memory stays at a few
volumes whatever the number of classes. A class absent from both maps has no score for that case
(NaN, left out of means); absent from one only, Dice is 0 and HD95 is NaN (undefined).
"""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.data.io import case_name, check_3d, is_nifti, load_array, read_image, spacing_of, write_text_atomic
from medseg.errors import MedsegError

METRICS = ("dice", "iou", "precision", "recall", "accuracy", "hd95_mm")


@dataclass
class Report:
    rows: list[dict[str, Any]]  # one per case and class
    mean: dict[str, dict[str, float]]  # class -> metric -> mean over cases
    summary: dict[str, float]  # mean_dice (foreground), mean_dice_with_background, ...
    cases: list[str] = field(default_factory=list)


def score_case(pred: np.ndarray, gt: np.ndarray, spacing, classes: dict[int, str]) -> list[dict[str, Any]]:
    import torch
    from monai.metrics import ConfusionMatrixMetric, DiceMetric, HausdorffDistanceMetric, MeanIoU

    rows = []
    for value, name in classes.items():
        p, g = pred == value, gt == value
        if not p.any() and not g.any():
            rows.append({"class": name, "value": value, **{m: math.nan for m in METRICS}, "gt_voxels": 0, "pred_voxels": 0})
            continue
        yp = torch.from_numpy(np.stack([~p, p])[None].astype(np.float32))
        yt = torch.from_numpy(np.stack([~g, g])[None].astype(np.float32))
        dice = DiceMetric(include_background=False, ignore_empty=False)(yp, yt).item()
        iou = MeanIoU(include_background=False, ignore_empty=False)(yp, yt).item()
        cm = ConfusionMatrixMetric(include_background=False, metric_name=["precision", "recall", "accuracy"])
        cm(yp, yt)
        precision, recall, accuracy = (t.item() for t in cm.aggregate())
        hd = math.nan
        if p.any() and g.any():
            with warnings.catch_warnings():  # MONAI warns about its own deprecated internals here
                warnings.simplefilter("ignore", FutureWarning)
                hd = HausdorffDistanceMetric(include_background=False, percentile=95)(yp, yt, spacing=list(spacing)).item()
        rows.append({"class": name, "value": value, "dice": dice, "iou": iou, "precision": precision, "recall": recall,
                     "accuracy": accuracy, "hd95_mm": hd, "gt_voxels": int(g.sum()), "pred_voxels": int(p.sum())})
    return rows


def pair_inputs(pred: Path, gt: Path) -> list[tuple[str, Path, Path]]:
    """Files, or folders matched by case name (``X_seg.nii.gz`` matches ``X.nii.gz``)."""
    for p in (pred, gt):
        if not p.exists():
            raise MedsegError(f"no such file or folder: {p}")
    if pred.is_file() and gt.is_file():
        return [(case_name(gt), pred, gt)]
    if pred.is_dir() != gt.is_dir():
        raise MedsegError("PRED and GT must both be files or both be folders")

    def by_case(folder: Path, strip_seg: bool) -> dict[str, Path]:
        out = {}
        for f in sorted(folder.iterdir()):
            if f.is_file() and is_nifti(f) and not case_name(f).endswith("_probabilities"):
                name = case_name(f)
                out[name[:-4] if strip_seg and name.endswith("_seg") else name] = f
        return out

    preds, gts = by_case(pred, True), by_case(gt, False)
    common = sorted(set(preds) & set(gts))
    if not common:
        raise MedsegError(f"no case names match between {pred} and {gt}")
    missing = sorted(set(gts) - set(preds))
    if missing:
        raise MedsegError(f"{len(missing)} ground-truth cases have no prediction (first: {missing[0]})")
    return [(c, preds[c], gts[c]) for c in common]


def class_names(pred: Path, labels: Path | None, values: set[int]) -> dict[int, str]:
    """Names from --labels, else from the prediction's JSON sidecar, else the values themselves."""
    source = labels or next((p for p in [pred.with_name(case_name(pred) + ".json")] if p.is_file()), None)
    names: dict[int, str] = {}
    if source is not None:
        try:
            meta = json.loads(Path(source).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise MedsegError(f"{source}: cannot read label names ({e})") from None
        meta = meta.get("labels", meta) if isinstance(meta, dict) else meta
        names = {int(k): str(v) for k, v in meta.items() if str(k).lstrip("-").isdigit()}
    names.setdefault(0, "background")
    for v in sorted(int(v) for v in values):
        names.setdefault(v, f"class_{v}")
    return dict(sorted(names.items()))


def evaluate(pred: str | Path, gt: str | Path, labels: str | Path | None = None, on_case=None) -> Report:
    pairs = pair_inputs(Path(pred), Path(gt))
    rows: list[dict[str, Any]] = []
    for i, (case, p_path, g_path) in enumerate(pairs):
        p_img, g_img = read_image(p_path), read_image(g_path)
        p_shape, g_shape = check_3d(p_img, p_path), check_3d(g_img, g_path)
        if p_shape != g_shape:
            raise MedsegError(f"case {case}: prediction shape {p_shape} != ground truth shape {g_shape}")
        if not np.allclose(p_img.affine, g_img.affine, atol=1e-3):
            raise MedsegError(f"case {case}: prediction and ground truth have different affines (geometry); resample the prediction first")
        p_arr = load_array(p_img, p_path, dtype=np.float64).reshape(p_shape)
        g_arr = load_array(g_img, g_path, dtype=np.float64).reshape(g_shape)
        for arr, path in ((p_arr, p_path), (g_arr, g_path)):
            if np.any(np.mod(arr, 1) != 0) or arr.min() < 0:
                raise MedsegError(f"{path}: not a label map (values must be whole numbers >= 0)")
        p_arr, g_arr = p_arr.astype(np.int64), g_arr.astype(np.int64)
        names = class_names(p_path, Path(labels) if labels else None, set(np.unique(p_arr)) | set(np.unique(g_arr)))
        for row in score_case(p_arr, g_arr, spacing_of(g_img.affine), names):
            rows.append({"case": case, **row})
        if on_case is not None:
            on_case(i + 1, len(pairs))
    return summarise(rows, [c for c, _, _ in pairs])


def summarise(rows: list[dict[str, Any]], cases: list[str]) -> Report:
    classes = list(dict.fromkeys(r["class"] for r in rows))
    mean: dict[str, dict[str, float]] = {}
    for name in classes:
        sel = [r for r in rows if r["class"] == name]
        mean[name] = {m: _nanmean([r[m] for r in sel]) for m in METRICS}
    fg = [n for n in classes if n != "background"]
    summary = {}
    for m in METRICS:
        summary[f"mean_{m}"] = _nanmean([mean[n][m] for n in fg])
        summary[f"mean_{m}_with_background"] = _nanmean([mean[n][m] for n in classes])
    return Report(rows, mean, summary, cases)


def _nanmean(values) -> float:
    v = [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(v)) if v else math.nan


def write_report(report: Report, prefix: str | Path) -> tuple[Path, Path]:
    """``prefix.csv`` (one row per case and class, then the means) and ``prefix.json``."""
    prefix = Path(prefix)
    csv_path, json_path = prefix.with_name(prefix.name + ".csv"), prefix.with_name(prefix.name + ".json")
    fields = ["case", "class", "value", *METRICS, "gt_voxels", "pred_voxels"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(report.rows)
    for name, values in report.mean.items():
        writer.writerow({"case": "mean", "class": name, **values})
    write_text_atomic(csv_path, buf.getvalue())
    body = {"cases": report.cases, "summary": report.summary, "mean": report.mean, "rows": report.rows}
    write_text_atomic(json_path, json.dumps(_json_safe(body), indent=2) + "\n")
    return csv_path, json_path


def _json_safe(obj):
    """NaN and infinity are not JSON: write them as null."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
