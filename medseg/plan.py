"""Dataset fingerprint -> training plan, nnU-Net's idea at a bundle's scale.

    fp = fingerprint(cases, lut, labels)              # cached beside the data by content hash
    plan = make_plan(fp, bundle, device)              # target spacing, CT statistics, ROI, batch size
    bundle = apply_plan(bundle, plan)                 # fills only the fields left on "auto"

The fingerprint holds, per case, the voxel size and shape (in RAS order), the foreground's
intensity statistics and a sample of its values (foreground: voxels of the requested classes), and
each class's voxel count and volume. The plan derives:

- **spacing**: the median voxel size; when the data are anisotropic (the coarsest axis more than 3x
  the others and fewer than a third as many voxels along it), that axis takes the 10th percentile of
  its spacings instead, as nnU-Net v2 does, so thin-slice cases are not thrown away.
- **normalisation** ("ct"): clip to the 0.5 / 99.5 percentiles of the pooled foreground samples,
  the upper end raised where needed to the top of ``data.hu_window`` (default 250 HU), then z-score
  with the foreground's mean and standard deviation. Raising the top is medseg's, not nnU-Net's:
  with a few cases of one contrast phase the percentiles end where those cases' organs end (a
  non-contrast spleen stops near 80 HU), and an enhanced organ in another scan (150-200 HU) would be
  clipped flat into the bone range. Contrast only ever brightens tissue, so the lower end stays.
- **ROI and batch size**: start from the median shape at the target spacing (each axis a multiple
  of what the model needs, at most ``plan.max_roi_voxels``), then shrink the axis that is largest
  relative to the median shape until medseg's memory estimator (``cost/memory.py``) says a training
  step fits ``plan.budget``. "auto" batch size: the largest of 1, 2, 4 volumes per step that still
  fits and whose patches cover at most 5 % of the dataset's voxels (nnU-Net's rule).

Planned values are written into the run's ``bundle.json``, so inference uses them unchanged.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.config import Bundle, bundle_from_dict
from medseg.errors import MedsegError

FINGERPRINT_VERSION = 1
SAMPLES_PER_CASE = 10_000  # foreground intensities kept per case, as nnU-Net
ANISOTROPY = 3.0
CPU_BUDGET = 8 * 10**9


# ---------------------------------------------------------------------------------------------
# fingerprint


def _content_hash(cases, lut: np.ndarray, labels: list[str]) -> str:
    h = hashlib.sha256(f"medseg fingerprint v{FINGERPRINT_VERSION}".encode())
    h.update(json.dumps(labels).encode())
    h.update(np.ascontiguousarray(lut).tobytes())
    for case in sorted(cases, key=lambda c: c.name):
        h.update(case.name.encode())
        for path in (case.image, case.label):
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:20]


def _stat_key(cases, lut: np.ndarray, labels: list[str]) -> str:
    """Paths, sizes and modification times: unchanged files need not be read again to be hashed."""
    h = hashlib.sha256(f"medseg stat v{FINGERPRINT_VERSION}".encode())
    h.update(json.dumps(labels).encode() + np.ascontiguousarray(lut).tobytes())
    for case in sorted(cases, key=lambda c: c.name):
        for p in (case.image, case.label):
            st = os.stat(p)
            h.update(f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def _known_hash(cases, lut: np.ndarray, labels: list[str], root: Path) -> str | None:
    """The content hash recorded for these files when they last had these sizes and times."""
    index = cache_path(root, "x").with_name(f"index-{_stat_key(cases, lut, labels)}.txt")
    try:
        return index.read_text().strip() or None
    except OSError:
        return None


def cache_path(root: Path, digest: str) -> Path:
    """``<data>/.medseg/fingerprint-<hash>.json`` when the data folder is writable, else under
    ``$MEDSEG_CACHE`` (default ``~/.cache/medseg``)."""
    local = root / ".medseg"
    writable = os.access(root, os.W_OK) and root.stat().st_mode & 0o222  # root ignores mode bits in os.access
    if writable or (local.is_dir() and os.access(local, os.W_OK)):
        return local / f"fingerprint-{digest}.json"
    base = Path(os.environ.get("MEDSEG_CACHE", Path.home() / ".cache" / "medseg"))
    return base / "fingerprints" / f"fingerprint-{digest}.json"


def fingerprint(cases, lut: np.ndarray, labels: list[str], root: Path | None = None, progress=None) -> dict[str, Any]:
    """Measure ``cases`` (image + label files; label values mapped through ``lut`` onto ``labels``),
    or read the cached result for the same file contents. ``progress(i, n)`` after each case."""
    import nibabel as nib

    from medseg.data.io import load_array, read_image

    root = root or Path(cases[0].image).parent
    digest = _known_hash(cases, lut, labels, root) or _content_hash(cases, lut, labels)
    path = cache_path(root, digest)
    if path.is_file():
        try:
            fp = json.loads(path.read_text())
            if fp.get("version") == FINGERPRINT_VERSION and fp.get("hash") == digest:
                fp["cached"] = str(path)
                return fp
        except (OSError, ValueError):
            pass  # a damaged cache is recomputed
    rng = np.random.default_rng(0)
    out_cases = []
    for i, case in enumerate(sorted(cases, key=lambda c: c.name)):
        img = nib.as_closest_canonical(read_image(case.image))
        lab = nib.as_closest_canonical(read_image(case.label))
        image = load_array(img, case.image)
        mapped = lut[np.asarray(load_array(lab, case.label, dtype=np.float64), dtype=np.int64)]
        fg = image[mapped > 0]
        sample = rng.choice(fg, size=min(SAMPLES_PER_CASE, fg.size), replace=False) if fg.size else fg
        spacing = [float(s) for s in img.header.get_zooms()[:3]]
        voxel_ml = math.prod(spacing) / 1000.0
        counts = np.bincount(mapped.ravel(), minlength=len(labels) + 1)
        out_cases.append({
            "name": case.name, "spacing": spacing, "shape": [int(s) for s in img.shape[:3]],
            "foreground": _stats(fg), "samples": [round(float(v), 2) for v in sample],
            "classes": {name: {"voxels": int(counts[k]), "ml": round(float(counts[k]) * voxel_ml, 2)}
                        for k, name in enumerate(labels, start=1)},
        })
        if progress is not None:
            progress(i + 1, len(cases))
    fp = {"version": FINGERPRINT_VERSION, "hash": digest, "labels": labels, "cases": out_cases}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for target, text in ((path, json.dumps(fp)), (path.with_name(f"index-{_stat_key(cases, lut, labels)}.txt"), digest)):
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            tmp.write_text(text)
            os.replace(tmp, target)
        fp["cached"] = str(path)
    except OSError:
        fp["cached"] = None  # a read-only place: the plan still works, it is just not cached
    return fp


def _stats(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {"n": 0}
    v = values.astype(np.float64)
    return {"n": int(v.size), "mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max()),
            "p00_5": float(np.percentile(v, 0.5)), "p99_5": float(np.percentile(v, 99.5))}


# ---------------------------------------------------------------------------------------------
# the plan


@dataclass
class Plan:
    model: str
    spacing: list[float]
    median_shape: list[int]  # at the target spacing
    ct_stats: dict[str, float]
    roi: list[int]
    batch_size: int
    patches_per_step: int
    budget_bytes: int
    estimate_bytes: int
    device: str
    notes: list[str] = field(default_factory=list)
    filled: list[str] = field(default_factory=list)  # the bundle fields this plan set
    fingerprint_cache: str | None = None
    cases: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def target_spacing(spacings: np.ndarray, shapes: np.ndarray) -> tuple[list[float], str | None]:
    """nnU-Net v2's rule (see the module docstring); a note when the anisotropic branch applies."""
    target = np.median(spacings, axis=0)
    size = np.median(shapes * spacings / target, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(3) if i != worst]
    aniso_spacing = target[worst] > ANISOTROPY * max(target[others])
    aniso_voxels = size[worst] * ANISOTROPY < min(size[others])
    note = None
    if aniso_spacing and aniso_voxels:
        low = float(np.percentile(spacings[:, worst], 10))
        low = max(low, float(max(target[others])) + 1e-5)
        note = (f"anisotropic data: axis {worst} gets {low:.3g} mm (10th percentile of its spacings) instead of the "
                f"median {target[worst]:.3g} mm")
        target[worst] = low
    return [round(float(s), 4) for s in target], note


def ct_statistics(samples: np.ndarray, top: float = 250.0) -> dict[str, float]:
    """Clip range: the foreground's 0.5 / 99.5 percentiles, the upper end at least ``top`` (HU);
    mean and std: the foreground's."""
    if samples.size < 2:
        raise MedsegError("cannot plan \"ct\" normalisation: the cases hold no voxels of the requested classes")
    low, high = np.percentile(samples, [0.5, 99.5])
    high = max(high, top)
    std = float(samples.std())  # of the foreground as sampled, as nnU-Net's CTNormalization
    return {"low": round(float(low), 3), "high": round(float(high), 3), "mean": round(float(samples.mean()), 3),
            "std": round(max(std, 1e-3), 3)}


def resolve_budget(text: str, device: str) -> int:
    from medseg.cost.memory import parse_bytes

    if text != "auto":
        return parse_bytes(text)
    if device.startswith("cuda"):
        import torch

        return int(0.9 * torch.cuda.get_device_properties(torch.device(device)).total_memory)
    return CPU_BUDGET


def _shrink(roi: list[int], median: list[float], multiple, lowest) -> list[int] | None:
    """One step down: the axis with the largest ROI / median-shape ratio loses one multiple."""
    order = sorted(range(3), key=lambda i: roi[i] / max(median[i], 1.0), reverse=True)
    for i in order:
        if roi[i] - multiple[i] >= lowest[i]:
            out = list(roi)
            out[i] -= multiple[i]
            return out
    return None


def _round_up(n: float, m: int) -> int:
    return max(m, int(math.ceil(n / m)) * m)


def make_plan(fp: dict[str, Any], bundle: Bundle, device: str = "cpu") -> Plan:
    """The plan for ``bundle`` (its model, classes, patches per volume, planned fields) on ``fp``."""
    from medseg.cost.memory import training_memory
    from medseg.engine.device import amp_mode
    from medseg.models import get_spec

    cases = fp["cases"]
    spacings = np.array([c["spacing"] for c in cases], dtype=np.float64)
    shapes = np.array([c["shape"] for c in cases], dtype=np.float64)
    notes: list[str] = []
    if bundle.data.spacing == "auto":
        spacing, note = target_spacing(spacings, shapes)
        spacing = [min(50.0, max(0.05, s)) for s in spacing]
        if note:
            notes.append(note)
    else:
        spacing = list(bundle.data.spacing)
    resampled = shapes * spacings / np.asarray(spacing)  # each case's shape at the target spacing
    median = [float(v) for v in np.median(resampled, axis=0)]
    stats: dict[str, float] = {}
    if bundle.data.normalization == "ct":
        given = bundle.data.ct_stats
        samples = np.concatenate([np.asarray(c["samples"], dtype=np.float64) for c in cases])
        stats = ct_statistics(samples, bundle.data.hu_window[1]) if given == "auto" else asdict(given)
        if given == "auto" and stats["high"] > (top := float(np.percentile(samples, 99.5))):
            notes.append(f"CT clip: top raised from the foreground's 99.5th percentile ({top:.0f} HU) to data.hu_window's "
                         f"{stats['high']:g} HU, so contrast-enhanced tissue in other scans is not clipped flat")

    spec = get_spec(bundle.model.name)
    t = bundle.train
    budget = resolve_budget(bundle.plan.budget, device)
    amp = amp_mode(t.amp, _torch_device(device)) != "off"
    classes = len(bundle.data.labels) + 1

    def estimate(roi: list[int], batch: int) -> int:
        return training_memory(spec.name, roi, batch * t.samples_per_volume, classes, bundle.model.args, amp,
                               t.grad_checkpointing, t).device_total

    batch = 1 if t.batch_size == "auto" else int(t.batch_size)
    if t.roi == "auto":
        roi, used = _fit_roi(spec, median, batch, budget, bundle.plan.max_roi_voxels, estimate)
        if math.prod(roi) > bundle.plan.max_roi_voxels:
            notes.append(f"ROI {roi} is above plan.max_roi_voxels {bundle.plan.max_roi_voxels}: the smallest {spec.display} accepts")
    else:
        roi = list(t.roi)
        used = estimate(roi, batch) if t.batch_size == "auto" else 0  # nothing to fit: no trace (seconds for a big model)
    if t.batch_size == "auto":
        dataset_voxels = float(np.sum(np.prod(resampled, axis=1)))
        for candidate in (2, 4):
            # nnU-Net's rule: one step's patches cover at most 5 % of the data; and never more volumes than cases
            if candidate > len(cases) or candidate * t.samples_per_volume * math.prod(roi) > 0.05 * dataset_voxels:
                break
            more = estimate(roi, candidate)
            if more > budget:
                break
            batch, used = candidate, more
    if used > budget:
        notes.append(f"the given train.roi {roi} with batch {batch} needs {_gb(used)}, above plan.budget {_gb(budget)}")
    return Plan(spec.name, spacing, [int(round(m)) for m in median], stats, roi, batch, batch * t.samples_per_volume, budget, used,
                device, notes, bundle.planned_fields(), fp.get("cached"), len(cases))


def _fit_roi(spec, median: list[float], batch: int, budget: int, max_voxels: int, estimate) -> tuple[list[int], int]:
    """The ROI: the median shape in the model's multiples, at most ``max_voxels``, then shrunk until
    ``estimate(roi, batch)`` (bytes) fits ``budget``. Returns it with its estimate."""
    two_d = spec.roi_multiple[2] == 1 and spec.min_roi[2] == 1  # a slice-wise model: one-voxel-deep patches
    multiple = list(spec.roi_multiple)
    lowest = [max(m, lo) for m, lo in zip(multiple, spec.min_roi)]
    roi = [max(lo, _round_up(m, k)) for m, k, lo in zip(median, multiple, lowest)]
    if two_d:  # in-slice steps of 16 voxels; one slice deep
        multiple, lowest = [16, 16, 1], [max(16, lowest[0]), max(16, lowest[1]), 1]
        roi = [_round_up(median[0], 16), _round_up(median[1], 16), 1]
    while math.prod(roi) > max_voxels and (smaller := _shrink(roi, median, multiple, lowest)) is not None:
        roi = smaller
    used = estimate(roi, batch)
    fixed = None
    while used > budget:
        if fixed is None:
            fixed = estimate(lowest, batch)  # what does not grow with the ROI (weights, optimiser)
            if fixed > budget:
                raise MedsegError(f"{spec.display} does not fit plan.budget {_gb(budget)} even at ROI {lowest} "
                                  f"(estimate {_gb(fixed)}); raise the budget, or use a smaller model")
        # memory grows about linearly with the patch: aim straight at the size that should fit
        per_voxel = max(1e-9, (used - fixed) / max(1, math.prod(roi) - math.prod(lowest)))
        target_voxels = (budget - fixed) / per_voxel * 0.95 + math.prod(lowest)
        smaller = _shrink(roi, median, multiple, lowest)
        if smaller is None:
            break
        roi = smaller
        while math.prod(roi) > target_voxels and (smaller := _shrink(roi, median, multiple, lowest)) is not None:
            roi = smaller
        used = estimate(roi, batch)
    if used > budget:
        raise MedsegError(f"no ROI for {spec.display} fits plan.budget {_gb(budget)}; raise the budget")
    return roi, used


def _torch_device(device: str):
    import torch

    return torch.device(device)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def apply_plan(bundle: Bundle, plan: Plan) -> Bundle:
    """``bundle`` with its "auto" fields set from ``plan`` (fields given explicitly are kept)."""
    raw = bundle.to_dict()
    if raw["data"]["spacing"] == "auto":
        raw["data"]["spacing"] = plan.spacing
    if raw["data"]["normalization"] == "ct" and raw["data"]["ct_stats"] == "auto":
        raw["data"]["ct_stats"] = dict(plan.ct_stats)
    if raw["train"]["roi"] == "auto":
        raw["train"]["roi"] = plan.roi
    if raw["train"]["batch_size"] == "auto":
        raw["train"]["batch_size"] = plan.batch_size
    return bundle_from_dict(raw)


def plan_rows(plan: Plan, fp: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(what, value, why) rows for the printed table."""
    spacings = np.array([c["spacing"] for c in fp["cases"]])
    filled = set(plan.filled)

    def how(key: str, why: str) -> str:
        return why if key in filled else "given in the bundle"

    rows = [
        ("cases", str(plan.cases), f"fingerprint {'cached at ' + plan.fingerprint_cache if plan.fingerprint_cache else 'not cached'}"),
        ("spacing (mm)", " x ".join(f"{s:g}" for s in plan.spacing),
         how("data.spacing", f"median of {len(spacings)} cases (range {spacings.min(0).round(2).tolist()} - {spacings.max(0).round(2).tolist()})")),
        ("median shape", " x ".join(str(s) for s in plan.median_shape), "at the target spacing"),
    ]
    if plan.ct_stats:
        s = plan.ct_stats
        rows.append(("normalisation", f"ct: clip {s['low']:g}..{s['high']:g} HU, z-score mean {s['mean']:g} std {s['std']:g}",
                     how("data.ct_stats", "foreground 0.5 / 99.5 percentiles, top at least data.hu_window's")))
    rows += [
        ("ROI", " x ".join(str(r) for r in plan.roi),
         how("train.roi", f"median shape, within plan.max_roi_voxels and plan.budget {_gb(plan.budget_bytes)}")),
        ("batch", f"{plan.batch_size} volume(s) x {plan.patches_per_step // plan.batch_size} patch(es) = {plan.patches_per_step} per step",
         how("train.batch_size", "largest of 1, 2, 4 within the budget, the cases and 5 % of the data")),
        ("memory estimate", f"{_gb(plan.estimate_bytes)} of {_gb(plan.budget_bytes)}" if plan.estimate_bytes else "not needed",
         f"medseg memory, training step on {plan.device}" if plan.estimate_bytes else "ROI and batch given; see medseg memory"),
    ]
    return rows
