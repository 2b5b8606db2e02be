"""Datalists: which image goes with which label map, what the label values mean, and the split.

Sources (``data.source``):
  - ``"phantom"``: the built-in synthetic CT, written once to a cache folder (``$MEDSEG_CACHE``).
  - a Decathlon ``dataset.json`` (its ``training`` list and ``labels``).
  - a folder with ``imagesTr/`` + ``labelsTr/`` (Decathlon or nnU-Net ``case_0000.nii.gz`` naming),
    using its ``dataset.json`` for label names when there is one.
  - a folder holding ``image.nii.gz`` + ``label.nii.gz`` (one case), or subfolders that each do.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.config import DataConfig
from medseg.data.io import case_name, check_3d, check_grid, is_nifti, load_array, read_image, same_geometry, spacing_of
from medseg.data.labels import build_lut, check_label_values, known_values, read_source_labels
from medseg.errors import DataError


@dataclass
class Case:
    name: str
    image: str
    label: str

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "image": self.image, "label": self.label}


@dataclass
class Datalist:
    cases: list[Case]
    source_labels: dict[int, str] | None  # None: values 1..N are data.labels in order
    root: Path
    notes: list[str] = field(default_factory=list)
    splits: list[dict[str, list[str]]] | None = None  # every fold's split, when data.fold picked one


def resolve_source(cfg: DataConfig, progress=None) -> Datalist:
    """Find the cases of ``cfg.source`` and the meaning of their label values.
    ``progress(i, n)`` is told about phantom cases as they are written."""
    if cfg.source == "phantom":
        from medseg.data.phantom import phantom_cache_dir, write_phantom

        root = write_phantom(phantom_cache_dir(cfg.phantom.seed), cfg.phantom.cases, cfg.phantom.seed, progress)
        found = _from_dataset_json(root / "dataset.json")
        # the cache may hold more cases than asked for
        found.cases = found.cases[: cfg.phantom.cases]
    else:
        found = _discover(Path(cfg.source).expanduser())
    if cfg.source_labels is not None:
        found.source_labels = read_source_labels(cfg.source_labels)
    if not found.cases:
        raise DataError(f"data.source {cfg.source}: no cases found (expected imagesTr/+labelsTr/, image.nii.gz+label.nii.gz, or a dataset.json)")
    return found


def _discover(src: Path) -> Datalist:
    if not src.exists():
        raise DataError(f"data.source: no such file or folder: {src}")
    if src.is_file():
        if src.suffix != ".json":
            raise DataError(f"data.source {src}: expected a folder or a dataset.json")
        return _from_dataset_json(src)
    if (src / "imagesTr").is_dir():
        if (src / "dataset.json").is_file():
            found = _from_dataset_json(src / "dataset.json")
            if found.cases:
                return found
            labels = found.source_labels
        else:
            labels = None
        return Datalist(_pair_folders(src / "imagesTr", src / "labelsTr"), labels, src)
    single = _image_label_pair(src)
    if single is not None:
        return Datalist([single], None, src)
    cases = [c for c in (_image_label_pair(d) for d in sorted(src.iterdir()) if d.is_dir()) if c is not None]
    return Datalist(cases, None, src)


def _image_label_pair(folder: Path) -> Case | None:
    for ext in (".nii.gz", ".nii"):
        image, label = folder / f"image{ext}", folder / f"label{ext}"
        if image.is_file() and label.is_file():
            return Case(folder.name, str(image.resolve()), str(label.resolve()))
    return None


def _pair_folders(images: Path, labels: Path) -> list[Case]:
    if not labels.is_dir():
        raise DataError(f"{labels}: missing (every image in imagesTr/ needs a label map in labelsTr/)")
    cases = []
    for img in sorted(p for p in images.iterdir() if is_nifti(p) and not p.name.startswith(".")):
        name = case_name(img)
        label = _label_for(labels, name)
        if label is not None:  # Decathlon: same name in both folders
            cases.append(Case(name, str(img.resolve()), str(label.resolve())))
            continue
        channel = re.fullmatch(r"(.+)_(\d{4})", name)  # nnU-Net: case_0000.nii.gz -> case.nii.gz
        if channel and _label_for(labels, channel.group(1)) is not None:
            if channel.group(2) == "0000":
                cases.append(Case(channel.group(1), str(img.resolve()), str(_label_for(labels, channel.group(1)).resolve())))
            continue  # a further channel of a multi-channel case; CT uses channel 0000 only
        raise DataError(f"{img}: no label map named {name}.nii.gz in {labels}")
    return cases


def _label_for(folder: Path, name: str) -> Path | None:
    return next((p for p in (folder / f"{name}.nii.gz", folder / f"{name}.nii") if p.is_file()), None)


def _from_dataset_json(path: Path) -> Datalist:
    try:
        meta = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: not UTF-8, or not JSON
        raise DataError(f"{path}: cannot read dataset.json ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: a dataset.json must be a JSON object, not a {type(meta).__name__}")
    root = path.parent
    cases = []
    training = meta.get("training") or []
    if not isinstance(training, list):
        raise DataError(f"{path}: 'training' must be a list of {{\"image\": ..., \"label\": ...}} entries")
    for entry in training:
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or not isinstance(entry.get("label"), str):
            raise DataError(f"{path}: every 'training' entry needs 'image' and 'label' paths")
        image, label = (root / entry["image"]).resolve(), (root / entry["label"]).resolve()
        cases.append(Case(case_name(image), str(image), str(label)))
    labels = read_source_labels(meta["labels"], what=f"{path}: labels") if isinstance(meta.get("labels"), dict) else None
    return Datalist(cases, labels, root)


def validate_cases(cases: list[Case], lut: np.ndarray, progress=None, *, known: np.ndarray, spacing=None,
                   present: set[int] | None = None) -> list[str]:
    """Read every case once: 3D, finite, a CT voxel size (and a sane size at ``spacing``), image and
    label on the same grid, label values among ``known`` (see :func:`~medseg.data.labels.known_values`).
    Adds the output classes found to ``present``. Returns warnings (cases with none of the wanted classes)."""
    warnings = []
    for i, case in enumerate(cases):
        img = read_image(case.image)
        lab = read_image(case.label)
        shape = check_3d(img, case.image)
        lshape = check_3d(lab, case.label)
        if shape != lshape:
            raise DataError(f"case {case.name}: image shape {shape} != label shape {lshape}")
        if not same_geometry(img, lab, atol=1e-2 * min(spacing_of(img.affine))):
            raise DataError(f"case {case.name}: image and label maps have different affines (geometry)")
        check_grid(img, case.image, spacing)
        load_array(img, case.image)
        label = load_array(lab, case.label, dtype=np.float64)
        check_label_values(label, case.label, known=known)
        found = np.unique(lut[label.astype(np.int64)])
        if present is not None:
            present.update(int(v) for v in found)
        if not found.any():
            warnings.append(f"case {case.name}: none of the requested classes is present")
        if progress is not None:
            progress(i + 1, len(cases))
    return warnings


def split(cases: list[Case], val_fraction: float, seed: int) -> tuple[list[Case], list[Case], str | None]:
    """Deterministic shuffle-then-cut split by case name. With one case, it is used for both
    training and validation, and the returned note says so."""
    ordered = sorted(cases, key=lambda c: c.name)
    if len(ordered) == 1:
        return ordered, ordered, "only one case: validating on the training case (no held-out data)"
    random.Random(seed).shuffle(ordered)
    n_val = min(len(ordered) - 1, max(1, round(len(ordered) * val_fraction))) if val_fraction > 0 else 0
    if n_val == 0:
        return ordered, ordered, "data.val_fraction is 0: validating on the training cases"
    return ordered[n_val:], ordered[:n_val], None


def kfold(cases: list[Case], folds: int, seed: int) -> list[dict[str, list[str]]]:
    """``folds`` splits by case name (nnU-Net's splits_final.json layout): the names sorted, shuffled
    with ``seed``, cut into ``folds`` parts of near-equal size; split k validates on part k."""
    if len(cases) < folds:
        raise DataError(f"data.folds {folds}: only {len(cases)} case(s); {folds}-fold cross-validation needs at least {folds}")
    names = sorted(c.name for c in cases)
    random.Random(seed).shuffle(names)
    parts = [names[k::folds] for k in range(folds)]
    return [{"train": sorted(n for j, p in enumerate(parts) if j != k for n in p), "val": sorted(parts[k])} for k in range(folds)]


def read_split_file(path: str | Path, cases: list[Case]) -> list[dict[str, list[str]]]:
    """A split file: a JSON list of {"train": [names], "val": [names]}; every name must be a case,
    and a split may not validate on a case it trains on."""
    path = Path(path)
    try:
        splits = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"data.split_file {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    if isinstance(splits, dict) and "train" in splits:
        splits = [splits]
    if not isinstance(splits, list) or not splits or not all(
            isinstance(s, dict) and all(isinstance(s.get(k), list) and all(isinstance(n, str) for n in s[k]) for k in ("train", "val"))
            for s in splits):
        raise DataError(f"data.split_file {path}: expected a list of {{\"train\": [case names], \"val\": [case names]}}")
    known = {c.name for c in cases}
    for k, s in enumerate(splits):
        unknown = sorted(set(s["train"] + s["val"]) - known)
        if unknown:
            raise DataError(f"data.split_file {path}: split {k} names {len(unknown)} case(s) the data do not have (first: {unknown[0]})")
        both = sorted(set(s["train"]) & set(s["val"]))
        if both:
            raise DataError(f"data.split_file {path}: split {k} trains and validates on {both[0]}")
        if not s["train"] or not s["val"]:
            raise DataError(f"data.split_file {path}: split {k} has no {'training' if not s['train'] else 'validation'} cases")
    return splits


def fold_split(cfg: DataConfig, cases: list[Case]) -> tuple[list[Case], list[Case], list[dict[str, list[str]]]]:
    """The training and validation cases of ``cfg.fold``, and every split they come from."""
    splits = read_split_file(cfg.split_file, cases) if cfg.split_file is not None else kfold(cases, cfg.folds, cfg.split_seed)
    if cfg.fold >= len(splits):
        raise DataError(f"data.fold {cfg.fold}: {cfg.split_file or 'the split'} has {len(splits)} split(s) (0 .. {len(splits) - 1})")
    by_name = {c.name: c for c in cases}
    chosen = splits[cfg.fold]
    return [by_name[n] for n in chosen["train"]], [by_name[n] for n in chosen["val"]], splits


def prepare(cfg: DataConfig, labels: list[str], progress=None) -> tuple[Datalist, np.ndarray, list[Case], list[Case], list[str]]:
    """Resolve, map labels, validate and split. Everything a user can get wrong fails here,
    before a run directory exists. ``progress(stage, i, n)`` follows the phantom writing
    ("phantom") and the case checks ("check")."""
    tell = (lambda stage: (lambda i, n: progress(stage, i, n))) if progress else (lambda stage: None)
    found = resolve_source(cfg, tell("phantom"))
    lut = build_lut(labels, found.source_labels)
    present: set[int] = set()
    notes = validate_cases(found.cases, lut, tell("check"), known=known_values(labels, found.source_labels),
                           spacing=None if cfg.spacing == "auto" else cfg.spacing,
                           present=present)
    missing = [name for i, name in enumerate(labels, start=1) if i not in present]
    if missing:
        raise DataError(f"data.labels: {', '.join(repr(n) for n in missing)} occur{'s' if len(missing) == 1 else ''} in none of the "
                        f"{len(found.cases)} case(s) of {cfg.source}: a model cannot learn a class it never sees; remove it from data.labels")
    if cfg.fold is not None:
        train, val, found.splits = fold_split(cfg, found.cases)
    else:
        train, val, note = split(found.cases, cfg.val_fraction, cfg.split_seed)
        if note:
            notes.append(note)
    return found, lut, train, val, notes
