"""Score label maps against ground truth with MONAI's metrics: per class Dice, IoU, precision,
recall, accuracy, the 95th-percentile Hausdorff distance and the normalised surface Dice (NSD) at a
tolerance, both in millimetres.

Classes are matched by NAME, never by value: a prediction coded liver=1 and a TotalSegmentator
ground truth coded liver=5 are the same class. Prediction names come from ``--pred-labels`` or the
prediction's sidecar (``<stem>.json``, as ``medseg infer`` writes it); ground-truth names from
``--gt-labels`` or, for a Decathlon folder, its dataset.json. With names on neither side, values are
compared as they are (``class_N``); with names on one side only, evaluate refuses rather than guess.

Background is what is left: the voxels in none of the scored classes, on each side (so classes the
other side does not know do not count against it). Classes are scored one at a time on their
bounding box (plus a one-voxel margin), so memory stays at a few volumes whatever the number of
classes. A class absent from both maps has no score for that case (NaN, left out of means); absent
from one only, Dice and NSD are 0 and HD95 is NaN (undefined).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.data.io import case_name, check_3d, is_nifti, load_array, read_image, spacing_of, write_text_atomic
from medseg.engine.postprocess import bounding_box
from medseg.errors import MedsegError

METRICS = ("dice", "iou", "precision", "recall", "accuracy", "hd95_mm", "nsd")
MAX_CLASSES = 1000  # more distinct values than any label map has: an image, not a segmentation
BY_VALUE_NOTE = "neither side has class names: classes matched by value (class_N); pass --pred-labels and --gt-labels to match by name"


@dataclass
class Report:
    rows: list[dict[str, Any]]  # one per case and class
    mean: dict[str, dict[str, float]]  # class -> metric -> mean over cases
    summary: dict[str, float]  # mean_dice (foreground), mean_dice_with_background, ...
    cases: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # how classes were matched, what was not scored
    nsd_tolerance_mm: float = 2.0


@dataclass(frozen=True)
class ClassSpec:
    """One scored class: its name and the values that code it in each map."""

    name: str
    pred_values: tuple[int, ...]
    gt_values: tuple[int, ...]


# ---------------------------------------------------------------- class names


def read_label_names(path: Path, option: str) -> dict[int, str]:
    """{value: name} from a JSON file: value -> name or name -> value, flat, or under "labels" (a
    sidecar or a dataset.json). Background (0) is dropped. Anything else is one line naming ``option``."""
    where = f"{option} {path}" if option else str(path)
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as e:
        raise MedsegError(f"{where}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise MedsegError(f"{where}: not a UTF-8 text file (expected JSON label value -> name)") from None
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise MedsegError(f"{where}: not valid JSON ({e})") from None
    if isinstance(spec, dict) and "labels" in spec:
        spec = spec["labels"]
    from medseg.data.labels import read_source_labels

    shape = 'expected JSON label value -> name, e.g. {"1": "liver"}, or a dataset.json'
    if not isinstance(spec, dict) or not spec:
        raise MedsegError(f"{where}: {shape}")
    try:
        names = read_source_labels(spec)
    except Exception as e:  # its messages and types are its own; ours names the option and file
        raise MedsegError(f"{where}: {shape} ({e})") from None
    if not isinstance(names, dict) or not all(isinstance(k, int) and isinstance(v, str) for k, v in names.items()):
        raise MedsegError(f"{where}: {shape}")
    return names


def pred_names(pred: Path, option_file: Path | None) -> tuple[dict[int, str] | None, str]:
    """The prediction's names and where they came from: --pred-labels, else its sidecar, else none."""
    if option_file is not None:
        return read_label_names(option_file, "--pred-labels"), str(option_file)
    sidecar = pred.with_name(case_name(pred) + ".json")
    if sidecar.is_file():
        return read_label_names(sidecar, "prediction sidecar"), str(sidecar)
    return None, ""


def decathlon_dataset_json(gt: Path) -> Path | None:
    """dataset.json beside the labelsTr/ folder that holds ``gt`` (a file in it, or the folder)."""
    folder = gt if gt.is_dir() else gt.parent
    candidate = folder.parent / "dataset.json"
    return candidate if folder.name == "labelsTr" and candidate.is_file() else None


def gt_names(gt: Path, option_file: Path | None) -> tuple[dict[int, str] | None, str]:
    """The ground truth's names: --gt-labels, else a Decathlon dataset.json, else none."""
    if option_file is not None:
        return read_label_names(option_file, "--gt-labels"), str(option_file)
    dataset = decathlon_dataset_json(gt)
    if dataset is not None:
        return read_label_names(dataset, "ground-truth dataset.json"), str(dataset)
    return None, ""


def match_classes(pred: dict[int, str] | None, gt: dict[int, str] | None, pred_src: str, gt_src: str,
                  notes: list[str]) -> list[ClassSpec] | None:
    """The classes named on both sides (names compared ignoring case), or None to match by value.
    Names on one side only is an error: which value means which class would be a guess."""
    if pred is None and gt is None:
        notes.append(BY_VALUE_NOTE)
        return None
    if gt is None:
        raise MedsegError(f"the prediction's classes are named (in {pred_src}) but the ground truth's are not: "
                          "pass --gt-labels FILE (label value -> name JSON, or the dataset.json)")
    if pred is None:
        raise MedsegError(f"the ground truth's classes are named (in {gt_src}) but the prediction's are not "
                          "(no sidecar .json beside it): pass --pred-labels FILE (label value -> name JSON)")
    by_pred, by_gt = _group(pred), _group(gt)
    common = [k for k in by_pred if k in by_gt]
    if not common:
        raise MedsegError(f"no class names in common: prediction ({pred_src}) has {_some(n for n, _ in by_pred.values())}; "
                          f"ground truth ({gt_src}) has {_some(n for n, _ in by_gt.values())}")
    only_pred = [by_pred[k][0] for k in by_pred if k not in by_gt]
    only_gt = [by_gt[k][0] for k in by_gt if k not in by_pred]
    if only_pred:
        notes.append(f"prediction classes not in the ground truth's names, not scored: {', '.join(only_pred)}")
    if only_gt:
        notes.append(f"{len(only_gt)} ground-truth class(es) not in the prediction's names, not scored: {_some(only_gt)}")
    return [ClassSpec(by_pred[k][0], by_pred[k][1], by_gt[k][1]) for k in common]


def _group(names: dict[int, str]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """casefolded name -> (name as first written, its values); a name given to two values means both."""
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for value, name in sorted(names.items()):
        key = name.strip().casefold()
        first, values = out.get(key, (name, ()))
        out[key] = (first, (*values, value))
    return out


def _some(names, n: int = 6) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


# ---------------------------------------------------------------- label maps


def load_label_map(img, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The voxels as the smallest unsigned integer type that holds them, and the distinct values.
    Refuses, naming the file, what is not a label map: negative or non-integer values, or more
    distinct values than any label map has (a CT in Hounsfield units fails at least one of these)."""
    data = load_array(img, path, dtype=None)  # type: ignore[arg-type]  # the file's own type; float only if scaled
    data = data.reshape(data.shape[:3]) if data.ndim == 4 else data
    hint = "is this an image rather than a segmentation?"
    lo, hi = (data.min(), data.max()) if data.size else (0, 0)
    if lo < 0:
        raise MedsegError(f"{path}: not a label map (negative values, down to {lo:g}); {hint}")
    if np.issubdtype(data.dtype, np.floating) and not np.array_equal(data, np.floor(data)):
        raise MedsegError(f"{path}: not a label map (non-integer values, range {lo:g}..{hi:g}); {hint}")
    out_type = np.uint8 if hi < 2**8 else np.uint16 if hi < 2**16 else np.uint32 if hi < 2**32 else np.uint64
    data = data.astype(out_type, copy=False)
    if hi < 2**20:
        counts = np.bincount(data.ravel(), minlength=1)
        values = np.flatnonzero(counts)
    else:
        values = np.unique(data)
    if values.size > MAX_CLASSES:
        raise MedsegError(f"{path}: not a label map ({values.size} distinct values, range {lo:g}..{hi:g}; "
                          f"label maps have at most a few hundred classes); {hint}")
    return data, values


def check_named(values: np.ndarray, names: dict[int, str], path: Path, src: str) -> None:
    """Every nonzero value in a named prediction must have a name: an unnamed one cannot be matched."""
    unnamed = [int(v) for v in values if v != 0 and int(v) not in names]
    if unnamed:
        raise MedsegError(f"{path}: prediction value(s) {', '.join(map(str, unnamed[:8]))} have no name in {src}")


def unnamed_gt_note(values: np.ndarray, names: dict[int, str], src: str) -> str | None:
    """Ground-truth values without a name are no named class for sure: not scored, background."""
    unnamed = [int(v) for v in values if v != 0 and int(v) not in names]
    if not unnamed:
        return None
    return f"ground-truth value(s) {_some(map(str, unnamed))} have no name in {src}: not scored (counted as background)"


# ---------------------------------------------------------------- scoring


def score_case(pred: np.ndarray, gt: np.ndarray, spacing, classes: list[ClassSpec], nsd_tolerance: float = 2.0) -> list[dict[str, Any]]:
    """One row per class, then background (the voxels in none of ``classes``, on each side)."""
    rows = []
    for spec in classes:
        rows.append(_row(spec.name, spec.pred_values, spec.gt_values, _mask(pred, spec.pred_values), _mask(gt, spec.gt_values),
                         spacing, nsd_tolerance))
    p_bg = ~_mask(pred, tuple(v for c in classes for v in c.pred_values))
    g_bg = ~_mask(gt, tuple(v for c in classes for v in c.gt_values))
    rows.insert(0, _row("background", (0,), (0,), p_bg, g_bg, spacing, nsd_tolerance))
    return rows


def _mask(arr: np.ndarray, values: tuple[int, ...]) -> np.ndarray:
    return arr == values[0] if len(values) == 1 else np.isin(arr, values)


def _row(name: str, pred_values, gt_values, p: np.ndarray, g: np.ndarray, spacing, tolerance: float) -> dict[str, Any]:
    def value(v):
        return v[0] if len(v) == 1 else "+".join(map(str, v))

    row: dict[str, Any] = {"class": name, "pred_value": value(pred_values), "gt_value": value(gt_values)}
    row.update(class_metrics(p, g, spacing, tolerance))
    row.update({"gt_voxels": int(g.sum()), "pred_voxels": int(p.sum())})
    return row


def class_metrics(p: np.ndarray, g: np.ndarray, spacing, tolerance: float) -> dict[str, float]:
    """MONAI's metrics for one class, computed on the bounding box of ``p | g`` plus one voxel.

    Dice (= F1), IoU (= threat score), precision and recall do not depend on the true negatives, and
    HD95 and NSD only on the two boundaries, which the box holds whole; accuracy does, so the
    voxels outside the box are added to the confusion matrix's true negatives before it is taken."""
    import torch
    from monai.metrics import HausdorffDistanceMetric, compute_confusion_matrix_metric, compute_surface_dice, get_confusion_matrix

    box = bounding_box(p | g, margin=1)
    if box is None:
        return {m: math.nan for m in METRICS}
    total = p.size
    p, g = p[box], g[box]

    # One channel per side (the class itself, hence include_background=True), as uint8: a zero-copy
    # view of the boolean mask. MONAI accepts uint8 here; bool would not do (its TP test is y_pred + y == 2).
    yp, yt = (torch.from_numpy(np.ascontiguousarray(m).view(np.uint8))[None, None] for m in (p, g))
    cm = get_confusion_matrix(yp, yt, include_background=True)
    cm[..., 2] += total - p.size  # true negatives outside the box
    with warnings.catch_warnings():  # 0/0 (e.g. precision with nothing predicted) is NaN, as intended
        warnings.simplefilter("ignore")
        out = {name: compute_confusion_matrix_metric(metric, cm).item()
               for name, metric in (("dice", "f1 score"), ("iou", "threat score"), ("precision", "precision"),
                                    ("recall", "recall"), ("accuracy", "accuracy"))}
        out["hd95_mm"] = math.nan
        if p.any() and g.any():  # MONAI warns about its own deprecated internals here
            out["hd95_mm"] = HausdorffDistanceMetric(include_background=True, percentile=95)(yp, yt, spacing=list(spacing)).item()
        out["nsd"] = compute_surface_dice(yp, yt, class_thresholds=[tolerance], include_background=True, spacing=list(spacing)).item()
    return out


# ---------------------------------------------------------------- cases and reports


def _label_file(folder: Path) -> Path | None:
    return next((folder / n for n in ("label.nii.gz", "label.nii") if (folder / n).is_file()), None)


def ground_truth_cases(gt: Path) -> dict[str, Path]:
    """Case name -> label map in a ground-truth folder, in the layouts training reads (and
    ``medseg infer`` names its outputs after): labelsTr/, a folder holding label.nii.gz (the case is
    the folder's name), case subfolders that each hold one, or label maps side by side."""
    if (gt / "labelsTr").is_dir():
        gt = gt / "labelsTr"
    single = _label_file(gt)
    if single is not None:
        return {gt.name: single}
    nested = {d.name: f for d in sorted(gt.iterdir()) if d.is_dir() and (f := _label_file(d)) is not None}
    if nested:
        return nested
    return _by_case(gt, strip_seg=False)


def _by_case(folder: Path, strip_seg: bool) -> dict[str, Path]:
    out = {}
    for f in sorted(folder.iterdir()):
        if f.is_file() and is_nifti(f) and not f.name.startswith(".") and not case_name(f).endswith("_probabilities"):
            name = case_name(f)
            out[name[:-4] if strip_seg and name.endswith("_seg") else name] = f
    return out


def pair_inputs(pred: Path, gt: Path) -> list[tuple[str, Path, Path]]:
    """Files, or folders matched by case name (``X_seg.nii.gz`` matches ``X.nii.gz``, or the case
    folder ``X/label.nii.gz``); a dataset folder as ground truth means its label maps."""
    for p in (pred, gt):
        if not p.exists():
            raise MedsegError(f"no such file or folder: {p}")
    if pred.is_file() and gt.is_dir() and _label_file(gt) is not None:
        gt = _label_file(gt)
    if pred.is_file() and gt.is_file():
        return [(case_name(gt), pred, gt)]
    if pred.is_dir() != gt.is_dir():
        raise MedsegError("PRED and GT must both be files or both be folders")
    preds, gts = _by_case(pred, True), ground_truth_cases(gt)
    common = sorted(set(preds) & set(gts))
    if not common:
        raise MedsegError(f"no case names match between {pred} ({_some(sorted(preds), 3) or 'no label maps'}) and {gt} "
                          f"({_some(sorted(gts), 3) or 'no label maps'})")
    missing = sorted(set(gts) - set(preds))
    if missing:
        raise MedsegError(f"{len(missing)} ground-truth cases have no prediction (first: {missing[0]})")
    return [(c, preds[c], gts[c]) for c in common]


@dataclass
class _Case:
    name: str
    pred: Path
    gt: Path
    pred_img: Any
    gt_img: Any
    pred_names: dict[int, str] | None
    pred_src: str
    gt_names: dict[int, str] | None
    gt_src: str
    classes: list[ClassSpec] | None  # None: match by value


def prepare(pred: Path, gt: Path, pred_labels: Path | None, gt_labels: Path | None, notes: list[str]) -> list[_Case]:
    """Everything that can be checked without reading voxels, for every case, before any scoring:
    the pairing, shapes, geometry and class names."""
    cases = []
    for case, p_path, g_path in pair_inputs(pred, gt):
        p_img, g_img = read_image(p_path), read_image(g_path)
        p_shape, g_shape = check_3d(p_img, p_path), check_3d(g_img, g_path)
        if p_shape != g_shape:
            raise MedsegError(f"case {case}: prediction shape {p_shape} != ground truth shape {g_shape}")
        if not np.allclose(p_img.affine, g_img.affine, atol=1e-3):
            raise MedsegError(f"case {case}: prediction and ground truth have different affines (geometry); resample the prediction first")
        p_names, p_src = pred_names(p_path, pred_labels)
        g_names, g_src = gt_names(g_path, gt_labels)
        if g_names is not None and gt_labels is None:
            _note(notes, f"ground-truth class names from {g_src} (Decathlon dataset.json)")
        case_notes: list[str] = []
        classes = match_classes(p_names, g_names, p_src, g_src, case_notes)
        for n in case_notes:
            _note(notes, n)
        cases.append(_Case(case, p_path, g_path, p_img, g_img, p_names, p_src, g_names, g_src, classes))
    return cases


def _note(notes: list[str], text: str) -> None:
    if text not in notes:
        notes.append(text)


def evaluate(pred: str | Path, gt: str | Path, pred_labels: str | Path | None = None, gt_labels: str | Path | None = None,
             nsd_tolerance: float = 2.0, on_case=None) -> Report:
    """Score every case; classes matched by name (see the module docstring)."""
    if not (math.isfinite(nsd_tolerance) and nsd_tolerance >= 0):
        raise MedsegError(f"--nsd-tolerance must be a distance in mm >= 0, got {nsd_tolerance}")
    notes: list[str] = []
    cases = prepare(Path(pred), Path(gt), Path(pred_labels) if pred_labels else None, Path(gt_labels) if gt_labels else None, notes)
    rows: list[dict[str, Any]] = []
    for i, c in enumerate(cases):
        p_arr, p_values = load_label_map(c.pred_img, c.pred)
        g_arr, g_values = load_label_map(c.gt_img, c.gt)
        classes = c.classes
        if classes is None:
            values = sorted(int(v) for v in set(p_values) | set(g_values) if v != 0)
            classes = [ClassSpec(f"class_{v}", (v,), (v,)) for v in values]
        else:
            check_named(p_values, c.pred_names or {}, c.pred, c.pred_src)
            if note := unnamed_gt_note(g_values, c.gt_names or {}, c.gt_src):
                _note(notes, note)
        for row in score_case(p_arr, g_arr, spacing_of(c.gt_img.affine), classes, nsd_tolerance):
            rows.append({"case": c.name, **row})
        del p_arr, g_arr
        if on_case is not None:
            on_case(i + 1, len(cases))
    report = summarise(rows, [c.name for c in cases])
    report.notes, report.nsd_tolerance_mm = notes, float(nsd_tolerance)
    return report


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


def report_prefix(pred: Path, output: Path | None) -> Path:
    """Where the report goes: ``-o`` (a folder there means ``folder/evaluation``), else beside PRED."""
    if output is not None:
        return output / "evaluation" if output.is_dir() else output
    return pred / "evaluation" if pred.is_dir() else pred.with_name(case_name(pred) + "_metrics")


def check_writable(prefix: Path) -> None:
    """Refuse before the scoring, not after it: create (and delete) a file where the report will go,
    in the nearest folder that exists (the missing ones would be created)."""
    folder = prefix.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        if not folder.is_dir():
            raise NotADirectoryError(20, "not a folder")
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise MedsegError(f"cannot write the report to {prefix.parent} ({e.strerror or e}): choose another place with -o") from None


def write_report(report: Report, prefix: str | Path) -> tuple[Path, Path]:
    """``prefix.csv`` (one row per case and class, then the means) and ``prefix.json``."""
    prefix = Path(prefix)
    csv_path, json_path = prefix.with_name(prefix.name + ".csv"), prefix.with_name(prefix.name + ".json")
    fields = ["case", "class", "pred_value", "gt_value", *METRICS, "gt_voxels", "pred_voxels"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(report.rows)
    for name, values in report.mean.items():
        writer.writerow({"case": "mean", "class": name, **values})
    body = {"cases": report.cases, "nsd_tolerance_mm": report.nsd_tolerance_mm, "notes": report.notes,
            "summary": report.summary, "mean": report.mean, "rows": report.rows}
    try:
        write_text_atomic(csv_path, buf.getvalue())
        write_text_atomic(json_path, json.dumps(_json_safe(body), indent=2) + "\n")
    except OSError as e:
        for path in (csv_path.with_name(f".{csv_path.name}.tmp"), json_path.with_name(f".{json_path.name}.tmp")):
            if path.exists():
                os.unlink(path)
        raise MedsegError(f"cannot write {prefix}.csv/.json: {e.strerror or e}") from None
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
