"""Segment a CT with a trained run: ``Predictor(run_dir)(image)`` or ``medseg infer scan.nii.gz``.

The scan goes through :mod:`medseg.engine.pipeline`, the steps validation uses too: the run's own
preprocessing (RAS, the bundle's spacing, HU window), the crop to the body, the sliding window on the
model grid, and the way back onto the input's own grid (class probabilities resampled linearly and
labels taken as their argmax, or nearest-neighbour labels for many classes on a big scan), then the
bundle's ``postprocess.largest_component`` (``--no-postprocess``: the raw argmax). The output has
exactly the input's shape, affine and orientation, whatever those are (LPS, oblique, 0.7x0.7x5 mm).

Files: outputs are written to hidden temporary names and published only when complete; an input is
never overwritten (not even with ``force``); an output being written is locked, so a second medseg
writing the same file fails with one line; and a file that appears while a scan is segmented is not
replaced unless ``force``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from medseg import __version__
from medseg.data.io import case_name, is_nifti, publish, read_image, spacing_of, temporary_beside
from medseg.data.transforms import body_threshold, intensity_map
from medseg.engine.cohort import input_stat, settings_of
from medseg.engine.pipeline import (
    Grids,
    WindowResult,
    WindowSpec,
    argmax0,
    body_box,
    choose_resample,
    network_fn,
    preprocess,
    resample_nearest,
    sliding_window,
    to_input_grid,
)
from medseg.engine.run import Run
from medseg.errors import MedsegError

__all__ = ["Predictor", "Segmentation", "plan_inputs", "segment_file", "resample_nearest"]

SKIP_SUFFIXES = ("_seg.nii.gz", "_seg.nii", "_probabilities.nii.gz", "_probabilities.nii")
LABEL_NAMES = ("label", "labels")  # a label map beside its image (image.nii.gz + label.nii.gz), never a CT
CHECKPOINTS = ("best", "last")


@dataclass
class Segmentation:
    labels: nib.Nifti1Image  # the input's shape and affine; uint8 (uint16 past 256 classes)
    names: dict[int, str]  # value -> class name, background included
    probabilities: nib.Nifti1Image | None = None  # 4D, uint8 = round(255 p), scl_slope 1/255
    method: str = ""  # the sliding window that ran: monai or stream
    seconds: float = 0.0
    volume_ml: dict[str, float] = field(default_factory=dict)
    resample: str = ""  # linear or nearest
    notes: list[str] = field(default_factory=list)
    crop_shape: tuple[int, ...] = ()  # the body crop on the model grid: what the sliding window covered
    # with model_grid=True: (labels on the whole model grid, postprocessed as the output is; its affine)
    model_grid: tuple[np.ndarray, np.ndarray] | None = None


class Predictor:
    """A trained run, or several (a fold ensemble), ready to segment. Heavy objects (the models) are built once.

    ``run``: a run directory or :class:`Run`, a folder of runs (every complete run in it), or a list
    of those (default: the newest complete run under ``runs_root``). Several runs are an ensemble:
    each runs its own sliding window on the same preprocessed scan and their class probabilities are
    averaged before the way back to the input grid, so they must share the class names and the
    preprocessing (spacing, intensity normalisation), as the folds of one bundle do.
    ``checkpoint``: ``best`` (model_best.pt) or ``last`` (the model in checkpoint.pt); ``method``:
    the sliding window (auto, monai, stream); ``resample``: back to the input grid (auto, linear,
    nearest; see :func:`medseg.engine.pipeline.choose_resample`); ``postprocess``: apply the run's
    ``postprocess.largest_component`` (True) or return the raw argmax (False)."""

    def __init__(self, run: str | Path | Run | list[str | Path | Run] | None = None, *, runs_root: str | Path = "runs",
                 device: str = "auto", overlap: float | None = None, sw_batch_size: int | None = None, tta: bool = False,
                 method: str = "auto", checkpoint: str = "best", resample: str = "auto", postprocess: bool = True) -> None:
        from medseg.engine.device import amp_mode, autocast, resolve_device
        from medseg.models import get_spec

        if checkpoint not in CHECKPOINTS:
            raise MedsegError(f"--checkpoint must be best or last, got {checkpoint!r}")
        choose_resample(resample, 1, (1, 1, 1), False)  # refuse a bad value before loading anything
        self.notes: list[str] = []  # for the user: runs of a folder left out, an ensemble that is not one bundle's folds
        self.runs = resolve_runs(run, runs_root, self.notes)
        check_ensemble(self.runs, self.notes)
        self.run = self.runs[0]
        self.run_dir = self.run.path
        self.bundle = self.run.bundle
        self.names = self.run.labels
        self.device = resolve_device(device)
        self.checkpoint, self.tta, self.resample = checkpoint, tta, resample
        by_name = {v: k for k, v in self.names.items() if k != 0}
        # the classes whose largest component is kept (names the run does not have are skipped)
        self.largest_component = [by_name[n] for n in self.bundle.postprocess.largest_component if n in by_name] if postprocess else []
        self.members: list[tuple[WindowSpec, Any]] = []  # per run: its sliding window and its network function
        for r in self.runs:
            window = run_window(r, overlap=overlap, sw_batch_size=sw_batch_size, method=method)
            model = r.build_model(checkpoint, self.device)
            amp = amp_mode(r.bundle.train.amp, self.device)
            self.members.append((window, network_fn(model, autocast(amp, self.device), tta,
                                                    slice_model=get_spec(r.bundle.model.name).axial_slices)))
        self.window = self.members[0][0]
        self.amp = amp_mode(self.bundle.train.amp, self.device)

    @property
    def overlap(self) -> float:
        return self.window.overlap

    @torch.no_grad()
    def __call__(self, image: nib.Nifti1Image | str | Path, *, classes: list[str] | None = None, probabilities: bool = False,
                 on_window=None, source: str | None = None, model_grid: bool = False) -> Segmentation:
        """Segment ``image`` (a NIfTI image, or a path to a NIfTI file or DICOM folder). ``classes``
        keeps only those classes in the labels (the probabilities keep every class); ``source``
        names an in-memory image in error messages (its path); ``model_grid`` also returns the labels on
        the model grid (the run's spacing, RAS), postprocessed like the output, for metrics in that space."""
        t0 = time.time()
        if not isinstance(image, nib.Nifti1Image):
            source, image = str(image), read_image(image)
        source = source or "input image"
        keep = self.class_subset(classes)
        x, model_affine = preprocess(image, self.bundle, source)
        ct_note = _ct_note(x, intensity_map(self.bundle))
        crop = body_box(x, body_threshold(self.bundle))
        xc = x[(slice(None), slice(None), *crop)]
        n = len(self.names)
        resample, note = choose_resample(self.resample, n, xc.shape[2:], probabilities)
        result = self._sliding_window(xc, n, probabilities or resample == "linear", on_window)
        grids = Grids(tuple(x.shape[2:]), model_affine, crop, tuple(int(s) for s in image.shape[:3]), image.affine)  # type: ignore[arg-type]
        on_model_grid = None
        if model_grid:
            full = np.zeros(grids.model_shape, dtype=result.labels.numpy().dtype)
            full[crop] = result.labels.numpy()
            if self.largest_component:  # as on the input grid, so both spaces score the same answer
                from medseg.engine.postprocess import keep_largest_component

                keep_largest_component(full, self.largest_component)
            on_model_grid = (full, model_affine)
        crop_shape = tuple(int(v) for v in xc.shape[2:])
        del x, xc
        labels, probs = to_input_grid(result, grids, resample, n, probabilities=probabilities, device=self.device)
        voxel_ml = float(abs(np.linalg.det(image.affine[:3, :3]))) / 1000.0
        post_note = self._postprocess(labels, keep, voxel_ml)
        if keep is not None:
            labels[~np.isin(labels, [0, *keep])] = 0
        names = {k: v for k, v in self.names.items() if keep is None or k == 0 or k in keep}
        prob_img = None
        if probs is not None:
            prob_img = _like(image, probs)
            prob_img.header.set_slope_inter(1 / 255, 0)
        counts = np.bincount(labels.ravel(), minlength=n)
        volume = {names[k]: round(float(counts[k]) * voxel_ml, 3) for k in names if k != 0}
        return Segmentation(_like(image, labels), names, prob_img, result.method, time.time() - t0, volume, resample,
                            [n for n in (ct_note, note, post_note) if n], crop_shape, on_model_grid)

    def _sliding_window(self, x: torch.Tensor, n: int, probabilities: bool, on_window) -> WindowResult:
        """One run's sliding window; for an ensemble, the mean of every run's class probabilities
        (a float32 sum: one classes x crop buffer besides the current run's float16 one) and its argmax."""
        if len(self.members) == 1:
            window, predict = self.members[0]
            return sliding_window(x, predict, window, n, self.device, probabilities=probabilities, on_window=on_window)
        total, method = None, ""
        for window, predict in self.members:  # each run's float16 probabilities (what one run saves), summed in float32
            r = sliding_window(x, predict, window, n, self.device, probabilities=True, on_window=on_window)
            total = r.probabilities.float() if total is None else total.add_(r.probabilities)
            method = r.method
            del r
        mean = total.div_(len(self.members))
        return WindowResult(argmax0(mean), mean.half() if probabilities else None, method)

    def _postprocess(self, labels: np.ndarray, keep: list[int] | None, voxel_ml: float) -> str | None:
        """``postprocess.largest_component`` on the classes kept, in place; a note when it removed anything."""
        values = [v for v in self.largest_component if keep is None or v in keep]
        if not values:
            return None
        from medseg.engine.postprocess import keep_largest_component

        removed = keep_largest_component(labels, values)
        if not removed:
            return None
        parts = ", ".join(f"{self.names[v]} {n * voxel_ml:.1f} ml ({n} voxels)" for v, n in removed.items())
        return f"largest connected component kept (postprocess.largest_component); removed: {parts}"

    def class_subset(self, classes: list[str] | None) -> list[int] | None:
        """The label values of ``classes`` (names), or None for all; unknown names are an error."""
        if not classes:
            return None
        by_name = {v: k for k, v in self.names.items() if k != 0}
        unknown = [n for n in classes if n not in by_name]
        if unknown:
            raise MedsegError(f"--classes: {', '.join(unknown)} not in this run's classes ({', '.join(by_name)})")
        return [by_name[n] for n in classes]


def run_window(run: Run, bundle=None, **options) -> WindowSpec:
    """The run's sliding window (its bundle, or ``bundle``; ``options``: overlap, sw_batch_size, method
    overrides); runs of format 1 and 2 were trained before patches were padded with air, so their
    windows pad with 0, as they saw."""
    window = WindowSpec.from_bundle(bundle or run.bundle, **options)
    if run.info.get("format_version") in (1, 2):
        window = dataclasses.replace(window, pad_value=0.0)
    return window


def resolve_runs(run, runs_root: str | Path = "runs", notes: list[str] | None = None) -> list[Run]:
    """The runs ``run`` names: a run directory or :class:`Run`, a folder of run directories (its
    complete runs, by name), or a list of those; None: the newest complete run under ``runs_root``."""
    from medseg.engine.run import RUN_FILE, latest_complete_run

    if run is None:
        return [latest_complete_run(runs_root)]
    items = run if isinstance(run, (list, tuple)) else [run]
    if not items:
        return [latest_complete_run(runs_root)]
    runs: list[Run] = []
    for item in items:
        if isinstance(item, Run):
            runs.append(item)
            continue
        path = Path(item)
        if path.is_dir() and not (path / RUN_FILE).is_file() and any(path.glob(f"*/{RUN_FILE}")):
            inside = [Run.open(p.parent) for p in sorted(path.glob(f"*/{RUN_FILE}"))]
            complete = [r for r in inside if r.status == "complete"]
            if not complete:
                raise MedsegError(f"{path}: none of its {len(inside)} runs is complete")
            left = [f"{r.name} ({r.status})" for r in inside if r.status != "complete"]
            if left and notes is not None:
                notes.append(f"{path}: left out of the ensemble, not complete: {', '.join(left)}")
            runs += complete
        else:
            runs.append(Run.open(path))
    seen: set[Path] = set()
    for r in runs:
        if r.path.resolve() in seen:
            raise MedsegError(f"--run {r.path} is named twice: an ensemble would weight it double")
        seen.add(r.path.resolve())
    return runs


def check_ensemble(runs: list[Run], notes: list[str] | None = None) -> None:
    """Runs averaged voxel by voxel must mean the same classes and see the same preprocessed scan.
    Folds (runs with ``data.fold``) of one split must be distinct folds; runs that are not one
    bundle's folds are averaged with a note saying so."""
    if len(runs) < 2:
        return
    folds = [r.bundle.data.fold for r in runs]
    if all(f is not None for f in folds):
        splits = {(r.bundle.data.split_file, r.bundle.data.folds, r.bundle.data.split_seed) for r in runs}
        if len(splits) == 1 and len(set(folds)) < len(folds):
            twice = next(f for f in folds if folds.count(f) > 1)
            raise MedsegError(f"cannot ensemble: fold {twice} of the same split is named twice ("
                              f"{', '.join(r.name for r in runs if r.bundle.data.fold == twice)}); an ensemble would weight it double")
    models = sorted({r.bundle.model.name for r in runs})
    if notes is not None and (len(models) > 1 or any(f is None for f in folds)):
        notes.append(f"ensemble of {len(runs)} runs that are not all folds of one bundle (models: {', '.join(models)})")
    first = runs[0]
    fields = {
        "class names": lambda r: r.labels,
        "data.spacing": lambda r: r.bundle.data.spacing,
        "intensity normalisation": lambda r: (r.bundle.data.normalization, intensity_map(r.bundle)),
        "body crop": lambda r: body_threshold(r.bundle),
    }
    for what, get in fields.items():
        for r in runs[1:]:
            if get(r) != get(first):
                raise MedsegError(f"cannot ensemble {first.name} and {r.name}: their {what} differ ({get(first)} vs {get(r)}); "
                                  "an ensemble averages the probabilities of runs trained on the same classes and preprocessing "
                                  "(the folds of one bundle)")


def _ct_note(x: torch.Tensor, imap: tuple[float, float, float, float]) -> str | None:
    """A warning when the normalised scan does not look like CT in Hounsfield units: a CT holds air or
    fat (below the clip) around and inside the body and is not mostly bone-bright. A label map, a
    mask, an MR or a scan stored in other units fails this, and its segmentation means nothing.
    ``imap``: :func:`~medseg.data.transforms.intensity_map` (HU low, HU high, value low, value high)."""
    lo, hi, a, b = imap
    below = float((x <= a).float().mean())
    above = float((x >= b).float().mean())
    if below == 1.0:
        return f"nothing in this scan is brighter than {lo:g} HU: is it CT in Hounsfield units, and is there a body in it?"
    if below < 0.01 or above > 0.5:
        return (f"this scan does not look like CT in Hounsfield units ({below:.0%} of voxels below {lo:g} HU, "
                f"{above:.0%} above {hi:g} HU; a CT has air around the body): check it is a CT image, not a label map or another modality")
    return None


def _like(img: nib.Nifti1Image, data: np.ndarray) -> nib.Nifti1Image:
    """A new image on ``img``'s grid: its header (qform/sform codes, units) with the new data type."""
    header = img.header.copy() if isinstance(img.header, nib.Nifti1Header) else None
    out = nib.Nifti1Image(data, img.affine, header=header)
    out.header.set_data_dtype(data.dtype)
    out.header.set_slope_inter(1.0, 0.0)
    if header is None or header["sform_code"] == 0 and header["qform_code"] == 0:
        out.set_sform(img.affine, code=1)
        out.set_qform(img.affine, code=1)
    return out


# ---------------------------------------------------------------------------------------------
# which files: inputs, outputs


def output_paths(input_path: Path, output: Path | None) -> dict[str, Path]:
    """``scan.nii.gz`` -> scan_seg.nii.gz (+ .json labels, _probabilities.nii.gz, _seg.png, and
    _seg.dcm for a DICOM SEG). An output named .dcm names the DICOM SEG; the other names follow it."""
    name = case_name(input_path) if is_nifti(input_path) else input_path.name
    seg = output if output is not None else input_path.parent / f"{name}_seg.nii.gz"
    if seg.suffix.lower() == ".dcm":
        stem = seg.name[: -len(".dcm")]
        seg = seg.with_name(f"{stem}.nii.gz")
    elif not is_nifti(seg):
        raise MedsegError(f"-o {seg}: output must end in .nii.gz or .nii (or .dcm with --output-type dicom-seg)")
    else:
        stem = case_name(seg)
    base = stem[: -len("_seg")] if stem.endswith("_seg") else stem
    return {"labels": seg, "dicom_seg": seg.with_name(f"{stem}.dcm"), "json": seg.with_name(f"{stem}.json"),
            "probabilities": seg.with_name(f"{base}_probabilities.nii.gz"), "preview": seg.with_name(f"{stem}.png")}


OUTPUT_TYPES = ("nifti", "dicom-seg")


def wanted_outputs(save_probabilities: bool, preview: bool, output_type: str = "nifti") -> list[str]:
    """The outputs to write: the label map (``labels``, NIfTI) or, for ``dicom-seg``, the DICOM SEG
    alone (``dicom_seg``; no NIfTI), then the JSON sidecar and what was asked for."""
    first = ["dicom_seg"] if output_type == "dicom-seg" else ["labels"]
    return first + ["json"] + (["probabilities"] if save_probabilities else []) + (["preview"] if preview else [])


def check_output_type(cases: list[tuple[Path, Path | None]], output_type: str) -> None:
    """A DICOM SEG references the slices of its source series: only a DICOM folder input can have
    one, and its ``-o`` ends in .dcm; a .dcm output is only ever a DICOM SEG."""
    if output_type not in OUTPUT_TYPES:
        raise MedsegError(f"--output-type {output_type}: expected one of {', '.join(OUTPUT_TYPES)}")
    for scan, target in cases:
        dcm = target is not None and target.suffix.lower() == ".dcm"
        if output_type == "dicom-seg" and not scan.is_dir():
            raise MedsegError(f"{scan}: --output-type dicom-seg needs a DICOM series folder as input (a DICOM SEG references "
                              "the slices of its series), and this is a file")
        if output_type == "dicom-seg" and target is not None and not dcm:
            raise MedsegError(f"-o {target}: a DICOM SEG output must end in .dcm")
        if output_type != "dicom-seg" and dcm:
            raise MedsegError(f"-o {target}: a .dcm output is a DICOM SEG; pass --output-type dicom-seg")


def _is_scan(p: Path) -> bool:
    return (p.is_file() and is_nifti(p) and not p.name.startswith(".") and not p.name.endswith(SKIP_SUFFIXES)
            and case_name(p).lower() not in LABEL_NAMES)


def _nifti_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if _is_scan(p)) if folder.is_dir() else []


def _single_image(folder: Path) -> Path | None:
    return next((p for p in (folder / "image.nii.gz", folder / "image.nii") if p.is_file()), None)


@dataclass
class InputPlan:
    """What ``medseg infer INPUT [-o OUTPUT]`` segments, and where each result goes."""

    cases: list[tuple[Path, Path | None]]  # (scan, label-map output or None: beside the scan)
    batch: bool  # a folder of cases: reported case by case, -o names a folder


def list_inputs(input_path: Path) -> tuple[list[Path], bool]:
    """(scans, batch). A NIfTI file or a DICOM folder is one scan. A folder is a batch: of a
    dataset's images (imagesTr/ and imagesTs/, never labelsTr/; image.nii.gz beside its label.nii.gz,
    or case subfolders holding one), or of the NIfTI files in it (label maps and medseg's own
    outputs left out). A folder with none of these is read as a DICOM series."""
    if not input_path.exists():
        raise MedsegError(f"no such file or folder: {input_path}")
    if input_path.is_file():
        return [input_path], False
    if _is_dataset(input_path):
        return _nifti_in(input_path / "imagesTr") + _nifti_in(input_path / "imagesTs"), True
    single = _single_image(input_path)
    if single is not None:
        return [single], True
    if not any(p.is_file() for p in input_path.rglob("*")):
        raise MedsegError(f"{input_path}: empty folder (no NIfTI scans, no DICOM files)")
    subfolders = sorted(d for d in input_path.iterdir() if d.is_dir() and not d.name.startswith("."))
    images = [p for p in (_single_image(d) for d in subfolders) if p is not None]
    if images:
        return images, True
    files = _nifti_in(input_path)
    return (files, True) if files else ([input_path], False)


def _is_dataset(folder: Path) -> bool:
    return (folder / "imagesTr").is_dir() or (folder / "imagesTs").is_dir()


def batch_name(scan: Path) -> str:
    """A case's name in an output folder: the file's, or its folder's for ``<case>/image.nii.gz``."""
    name = case_name(scan)
    return scan.parent.name if name == "image" else name


def plan_inputs(input_path: Path, output: Path | None) -> InputPlan:
    scans, batch = list_inputs(input_path)
    if not batch:
        return InputPlan([(scans[0], output)], False)
    if not scans:
        raise MedsegError(f"{input_path}: no images found in its imagesTr/ or imagesTs/")
    if output is not None and (is_nifti(output) or (output.exists() and not output.is_dir())):
        raise MedsegError(f"-o {output}: a folder input needs an output folder")
    if output is None:
        if _is_dataset(input_path):
            raise MedsegError(f"{input_path} is a dataset folder (imagesTr/): name an output folder with -o, so that "
                              "predictions are not written among the images training reads")
        return InputPlan([(p, None) for p in scans], True)
    cases = [(p, output / f"{batch_name(p)}_seg.nii.gz") for p in scans]
    seen: dict[Path, Path] = {}
    for scan, target in cases:
        if target in seen:
            raise MedsegError(f"{seen[target]} and {scan} would both be written to {target}")
        seen[target] = scan
    return InputPlan(cases, True)


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_outputs(plan: InputPlan, wanted: list[str], force: bool) -> None:
    """Before any work: no output may be an input (not even with ``force``), and without ``force``
    no output may exist."""
    scans = [scan for scan, _ in plan.cases]
    for scan, target in plan.cases:
        paths = output_paths(scan, target)
        for key in wanted:
            hit = next((s for s in scans if _same_file(paths[key], s)), None)
            if hit is not None:
                what = "is the input scan" if str(paths[key]) == str(hit) else f"is the input scan {hit}"
                raise MedsegError(f"{paths[key]} {what}: choose another output (-o); an input is never overwritten")
        if not force:
            refuse_overwrite(paths, wanted)


def refuse_overwrite(paths: dict[str, Path], wanted: list[str]) -> None:
    taken = next((paths[k] for k in wanted if paths[k].exists()), None)
    if taken is not None:
        raise MedsegError(f"{taken} exists; pass --force to overwrite")


# ---------------------------------------------------------------------------------------------
# writing: lock, stage, publish


class OutputBusy(MedsegError):
    """An output is being written by another process (its lock is held)."""


@contextlib.contextmanager
def output_lock(path: Path):
    """Hold ``.<name>.lock`` beside ``path`` (flock) while its outputs are made; a second holder
    fails at once with one line naming the first. The lock file is removed afterwards."""
    from medseg.locks import LockHeld, held

    made = [d for d in (path.parent, *path.parent.parents) if not d.exists()]  # removed again if they stay empty
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MedsegError(f"cannot create {path.parent}: {e.strerror or e}") from None
    try:
        lock = held(path.with_name(f".{path.name}.lock"))
        lock.__enter__()
    except LockHeld as e:
        raise OutputBusy(f"{path} is being written by another medseg infer ({e.holder}); wait for it or choose another -o") from None
    except OSError as e:
        raise MedsegError(f"cannot write to {path.parent}: {e.strerror or e}") from None
    try:
        yield
    finally:
        lock.__exit__(None, None, None)
        for d in made:  # innermost first; a folder that received outputs is not empty and stays
            with contextlib.suppress(OSError):
                d.rmdir()


def _publish(tmp: str, dest: Path, force: bool) -> None:
    try:
        publish(tmp, dest, force)
    except FileExistsError:
        raise MedsegError(f"{dest} appeared while this scan was segmented; it was not replaced (pass --force to overwrite)") from None


def _write_outputs(seg: Segmentation, img: nib.Nifti1Image, paths: dict[str, Path], wanted: list[str], sidecar: dict[str, Any],
                   hu_window, force: bool, dicom_seg: dict[str, Any] | None = None) -> None:
    """Every output to a hidden temporary file first, then all published; on a failure nothing
    new is left behind. ``dicom_seg``: the keywords of :func:`medseg.data.dicomseg.make_dicom_seg`
    (the source series and the names for the algorithm), for the ``dicom_seg`` output."""
    staged: dict[str, str] = {}
    published: list[Path] = []
    try:
        for key in wanted:
            suffix = {"labels": ".nii.gz", "probabilities": ".nii.gz", "json": ".json", "preview": ".png", "dicom_seg": ".dcm"}[key]
            if key in ("labels", "probabilities") and not str(paths[key]).lower().endswith(".gz"):
                suffix = ".nii"
            staged[key] = tmp = temporary_beside(paths[key], suffix)
            if key == "dicom_seg":  # first in ``wanted``: what it holds goes into the sidecar
                from medseg.data.dicomseg import make_dicom_seg

                dataset, sidecar["dicom_seg"] = make_dicom_seg(seg.labels, seg.names, **(dicom_seg or {}))
                dataset.save_as(tmp, enforce_file_format=True)
            elif key == "labels":
                nib.save(seg.labels, tmp)
            elif key == "probabilities":
                nib.save(seg.probabilities, tmp)
            elif key == "json":
                Path(tmp).write_text(json.dumps(sidecar, indent=2) + "\n")
            else:
                from medseg.viz import save_preview

                save_preview(img, seg.labels, seg.names, tmp, hu_window=hu_window)
        for key in wanted:
            _publish(staged[key], paths[key], force)
            published.append(paths[key])
    except OSError as e:
        if not force:
            for p in published:
                p.unlink(missing_ok=True)
        raise MedsegError(f"cannot write {paths['labels']}: {e.strerror or e}") from None
    except MedsegError:
        for p in published:  # only reached without force: these files are ours, nothing was replaced
            p.unlink(missing_ok=True)
        raise
    finally:
        for tmp in staged.values():
            if os.path.exists(tmp):
                os.unlink(tmp)


def _dicom_info(img: nib.Nifti1Image) -> dict[str, Any]:
    """What ``read_image`` says about a DICOM series it read (``img.extra["dicom"]``), or {}."""
    extra = getattr(img, "extra", None)
    info = extra.get("dicom") if isinstance(extra, dict) else None
    return info if isinstance(info, dict) else {}


def segment_file(predictor: Predictor, input_path: Path, output: Path | None = None, *, force: bool = False,
                 save_probabilities: bool = False, preview: bool = False, classes: list[str] | None = None,
                 series: str | None = None, on_window=None, model_grid: bool = False, output_type: str = "nifti") -> dict[str, Any]:
    """Segment one scan and write its outputs (see the module docstring for the rules). Returns
    ``{"paths", "segmentation", "notes", "series_uid"}``. ``output_type="dicom-seg"`` (a DICOM
    folder input only) writes a DICOM SEG referencing the series instead of the NIfTI label map."""
    check_output_type([(input_path, output)], output_type)
    paths = output_paths(input_path, output)
    wanted = wanted_outputs(save_probabilities, preview, output_type)
    check_outputs(InputPlan([(input_path, output)], False), wanted, force)
    folder = paths["labels"].parent
    if folder.exists() and not os.access(folder, os.W_OK):  # refuse before the work, not after it
        raise MedsegError(f"cannot write to {folder}: choose an output with -o")
    with output_lock(paths["labels"]):
        if not force:
            refuse_overwrite(paths, wanted)  # written by someone else before we held the lock
        for key in wanted:  # temporary files of a medseg infer killed while writing these outputs
            for stale in paths[key].parent.glob(f".{paths[key].name}.*"):
                if not stale.name.endswith(".lock"):
                    stale.unlink(missing_ok=True)
        img = read_image(input_path, series_uid=series) if series else read_image(input_path)
        dicom = _dicom_info(img)
        seg = predictor(img, classes=classes, probabilities=save_probabilities, on_window=on_window, source=str(input_path),
                        model_grid=model_grid)
        run = predictor.run
        sidecar = {"labels": {str(k): v for k, v in seg.names.items()}, "volume_ml": seg.volume_ml,
                   "run": str(predictor.run_dir.resolve()), "run_name": run.name, "run_status": run.status,
                   "checkpoint": predictor.checkpoint, "model": "+".join(dict.fromkeys(r.bundle.model.name for r in predictor.runs)),
                   "medseg_version": __version__,
                   "input": str(input_path.resolve()), "method": seg.method, "resample": seg.resample, "tta": predictor.tta,
                   "overlap": predictor.overlap, "spacing_mm": list(spacing_of(img.affine)), "seconds": round(seg.seconds, 2),
                   "largest_component": [seg.names[v] for v in predictor.largest_component if v in seg.names],
                   "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                   # a cohort re-run skips what this scan file and these settings made
                   "settings": settings_of(predictor, classes, output_type), "input_stat": input_stat(input_path)}
        if len(predictor.runs) > 1:  # a fold ensemble: the mean of these runs' probabilities
            sidecar["ensemble"] = [str(r.path.resolve()) for r in predictor.runs]
            sidecar.update(run=sidecar["ensemble"], run_name=[r.name for r in predictor.runs],
                           run_status=[r.status for r in predictor.runs])
        if dicom.get("series_uid") or series:
            sidecar["dicom_series_uid"] = dicom.get("series_uid") or series
        dicom_seg = None
        if output_type == "dicom-seg":
            dicom_seg = {"series": input_path, "series_uid": dicom.get("series_uid") or series, "model": sidecar["model"],
                         "run": ",".join(r.name for r in predictor.runs)}
        _write_outputs(seg, img, paths, wanted, sidecar, predictor.bundle.data.hu_window, force, dicom_seg=dicom_seg)
    notes = ([dicom["note"]] if dicom.get("note") else []) + seg.notes
    return {"paths": {k: paths[k] for k in wanted}, "segmentation": seg, "notes": notes, "series_uid": sidecar.get("dicom_series_uid")}
