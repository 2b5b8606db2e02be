"""Segment a CT with a trained run: ``Predictor(run_dir)(image)`` or ``medseg infer scan.nii.gz``.

The scan goes through the run's own preprocessing (RAS, the bundle's spacing, HU window), is
cropped to the body, segmented with a sliding window (MONAI's for small volumes, medseg's streaming
one when MONAI's classes x volume buffer would be large), and the label map is resampled (nearest
neighbour, through the two affines) onto the input's own grid: the output has exactly the input's
shape, affine and orientation, whatever those are (LPS, oblique, 0.7x0.7x5 mm).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from medseg.config import Bundle, bundle_from_dict
from medseg.data.io import case_name, check_3d, is_nifti, load_array, read_image, spacing_of, write_nifti, write_text_atomic
from medseg.engine.rundir import read_run
from medseg.errors import MedsegError

SKIP_SUFFIXES = ("_seg.nii.gz", "_seg.nii", "_probabilities.nii.gz", "_probabilities.nii")


@dataclass
class Segmentation:
    labels: nib.Nifti1Image  # the input's shape and affine; uint8 (uint16 past 255 classes)
    names: dict[int, str]  # value -> class name, background included
    probabilities: nib.Nifti1Image | None = None  # 4D, uint8 = round(255 p), scl_slope 1/255
    method: str = ""
    seconds: float = 0.0
    volume_ml: dict[str, float] = field(default_factory=dict)


def latest_complete_run(runs_root: str | Path = "runs") -> Path:
    root = Path(runs_root)
    candidates = []
    for path in root.glob("*/run.json") if root.is_dir() else []:
        try:
            info = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if info.get("status") == "complete":
            candidates.append((info.get("finished", ""), path.stat().st_mtime, path.parent))
    if not candidates:
        raise MedsegError(f"no complete training run under {root}/: train one first (medseg train bundles/unetr.json) or pass --run")
    return max(candidates)[2]


class Predictor:
    """A trained run, ready to segment. Heavy objects (the model) are built once."""

    def __init__(self, run_dir: str | Path | None = None, *, runs_root: str | Path = "runs", device: str = "auto",
                 overlap: float | None = None, sw_batch_size: int | None = None, tta: bool = False,
                 method: str = "auto", checkpoint: str = "best") -> None:
        from medseg.engine.train import resolve_device
        from medseg.models import create_model

        self.run_dir = Path(run_dir) if run_dir is not None else latest_complete_run(runs_root)
        self.info = read_run(self.run_dir)  # an explicit --run may be incomplete; the CLI says so
        try:
            self.bundle: Bundle = bundle_from_dict(json.loads((self.run_dir / "bundle.json").read_text()))
            self.names = {int(k): v for k, v in json.loads((self.run_dir / "labels.json").read_text()).items()}
        except (OSError, json.JSONDecodeError) as e:
            raise MedsegError(f"{self.run_dir}: incomplete run directory ({e})") from None
        weights = self.run_dir / f"model_{checkpoint}.pt"
        if not weights.is_file():
            raise MedsegError(f"{self.run_dir}: missing weights {weights.name}")
        self.device = resolve_device(device)
        b = self.bundle
        self.model = create_model(b.model.name, out_channels=len(b.data.labels) + 1, roi=b.train.roi,
                                  grad_checkpointing=b.train.grad_checkpointing, **b.model.args)
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            self.model.load_state_dict(state)
        except Exception as e:  # truncated file, wrong architecture
            raise MedsegError(f"{weights}: cannot load weights ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        self.model.to(self.device).eval()
        sw = b.sliding_window
        self.roi = b.infer_roi
        self.overlap = sw.overlap if overlap is None else overlap
        if not 0 <= self.overlap < 1:
            raise MedsegError(f"--overlap must be in [0, 1), got {self.overlap}")
        self.sw_batch_size = sw.sw_batch_size if sw_batch_size is None else sw_batch_size
        if self.sw_batch_size < 1:
            raise MedsegError("--sw-batch-size must be >= 1")
        self.mode, self.tta, self.method = sw.mode, tta, method

    # -- the network on one batch of windows, with flip test-time augmentation -------------------
    def _predict_windows(self, x: torch.Tensor) -> torch.Tensor:
        amp = self.device.type == "cuda" and self.bundle.train.amp
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            if not self.tta:
                return self.model(x).float()
            flips = [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]  # nnU-Net's 3D mirroring
            if self.bundle.model.name == "fcn2d":
                flips = [f for f in flips if 4 not in f]  # mirroring slices of a 2D model adds nothing
            total = None
            for dims in flips:
                y = self.model(torch.flip(x, dims) if dims else x).float()
                y = torch.flip(y, dims) if dims else y
                total = y if total is None else total + y
            return total / len(flips)

    def preprocess(self, img: nib.Nifti1Image, source: str = "image"):
        """Returns (preprocessed (1,1,X,Y,Z) tensor in RAS at the bundle spacing, its affine)."""
        from monai.data import MetaTensor
        from monai.transforms import Compose

        from medseg.data.transforms import geometry_steps

        check_3d(img, source)
        data = load_array(img, source)
        if data.ndim == 4:
            data = data[..., 0]
        x = MetaTensor(torch.from_numpy(np.ascontiguousarray(data))[None], affine=torch.as_tensor(img.affine, dtype=torch.float64))
        x = Compose(geometry_steps(self.bundle, keys=("image",)))({"image": x})["image"]
        return x.as_tensor()[None].float(), np.asarray(x.affine, dtype=np.float64)

    @torch.no_grad()
    def __call__(self, image: nib.Nifti1Image | str | Path, *, labels: list[str] | None = None,
                 probabilities: bool = False, on_window=None) -> Segmentation:
        from medseg.engine.window import choose_method, monai_sliding_window, stream_sliding_window

        t0 = time.time()
        source = str(image) if not isinstance(image, nib.Nifti1Image) else "image"
        img = read_image(image) if not isinstance(image, nib.Nifti1Image) else image
        keep = self._label_subset(labels)
        x, res_affine = self.preprocess(img, source)
        full_shape = tuple(x.shape[2:])

        # Crop to the body (windowed intensity > 0), as training's CropForeground does.
        body = (x[0, 0] > 0).numpy()
        if body.any():
            idx = [np.nonzero(body.any(axis=tuple(a for a in range(3) if a != d)))[0] for d in range(3)]
            lo, hi = [int(i[0]) for i in idx], [int(i[-1]) + 1 for i in idx]
        else:
            lo, hi = [0, 0, 0], list(full_shape)
        crop = tuple(slice(a, b) for a, b in zip(lo, hi))
        xc = x[(slice(None), slice(None), *crop)]
        n_classes = len(self.names)
        method = choose_method(n_classes, xc.shape[2:], self.method)
        run = stream_sliding_window if method == "stream" else monai_sliding_window
        kwargs = {"on_window": on_window} if method == "stream" else {}
        lab_c, prob_c = run(xc.to(self.device) if method == "monai" else xc, self.roi, self.sw_batch_size, self._predict_windows,
                            overlap=self.overlap, mode=self.mode, device=self.device, return_probabilities=probabilities, **kwargs)
        lab_res = np.zeros(full_shape, dtype=np.uint8 if n_classes <= 256 else np.uint16)
        lab_res[crop] = lab_c.numpy()
        if keep is not None:
            lab_res[~np.isin(lab_res, keep)] = 0

        out = resample_nearest(lab_res, res_affine, img.shape[:3], img.affine)
        label_img = _like(img, out)
        prob_img = None
        if probabilities:
            prob_res = np.zeros((n_classes, *full_shape), dtype=np.float32)
            prob_res[0] = 1.0  # outside the body crop: background
            prob_res[(slice(None), *crop)] = prob_c.float().numpy()
            prob_img = _probabilities_image(prob_res, res_affine, img)
        names = {k: v for k, v in self.names.items() if keep is None or k == 0 or k in keep}
        voxel_ml = float(abs(np.linalg.det(img.affine[:3, :3]))) / 1000.0
        counts = np.bincount(out.ravel(), minlength=n_classes)
        volume = {names[k]: round(float(counts[k]) * voxel_ml, 3) for k in names if k != 0}
        return Segmentation(label_img, names, prob_img, method, time.time() - t0, volume)

    def _label_subset(self, labels: list[str] | None) -> list[int] | None:
        if not labels:
            return None
        by_name = {v: k for k, v in self.names.items() if k != 0}
        unknown = [n for n in labels if n not in by_name]
        if unknown:
            raise MedsegError(f"--labels: {', '.join(unknown)} not in this run's classes ({', '.join(by_name)})")
        return [by_name[n] for n in labels]


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


def resample_nearest(labels: np.ndarray, src_affine: np.ndarray, shape, dst_affine: np.ndarray) -> np.ndarray:
    """Nearest-neighbour resampling of a label volume from one voxel grid to another through their
    affines (voxel -> mm); voxels outside the source become background."""
    from scipy.ndimage import affine_transform

    matrix = np.linalg.inv(src_affine) @ np.asarray(dst_affine, dtype=np.float64)  # dst voxel -> src voxel
    return affine_transform(labels, matrix, output_shape=tuple(int(s) for s in shape), order=0, mode="constant", cval=0)


def _probabilities_image(prob_res: np.ndarray, res_affine: np.ndarray, img: nib.Nifti1Image) -> nib.Nifti1Image:
    from scipy.ndimage import affine_transform

    matrix = np.linalg.inv(res_affine) @ np.asarray(img.affine, dtype=np.float64)
    shape = tuple(int(s) for s in img.shape[:3])
    out = np.empty((*shape, prob_res.shape[0]), dtype=np.uint8)
    for c in range(prob_res.shape[0]):
        p = affine_transform(prob_res[c], matrix, output_shape=shape, order=1, mode="nearest")
        out[..., c] = np.clip(np.rint(p * 255), 0, 255).astype(np.uint8)
    pimg = _like(img, out)
    pimg.header.set_slope_inter(1 / 255, 0)
    return pimg


# ---------------------------------------------------------------------------------------------
# files and folders


def output_paths(input_path: Path, output: Path | None) -> dict[str, Path]:
    """``scan.nii.gz`` -> scan_seg.nii.gz (+ .json labels, _probabilities.nii.gz, _seg.png)."""
    name = case_name(input_path) if is_nifti(input_path) else input_path.name
    seg = output if output is not None else input_path.parent / f"{name}_seg.nii.gz"
    if not is_nifti(seg):
        raise MedsegError(f"-o {seg}: output must end in .nii.gz or .nii")
    stem = case_name(seg)
    base = stem[: -len("_seg")] if stem.endswith("_seg") else stem
    return {"labels": seg, "json": seg.with_name(f"{stem}.json"), "probabilities": seg.with_name(f"{base}_probabilities.nii.gz"),
            "preview": seg.with_name(f"{stem}.png")}


def list_inputs(input_path: Path) -> list[Path]:
    """A NIfTI file, a DICOM folder (one case), or a folder of NIfTI files (batch)."""
    if not input_path.exists():
        raise MedsegError(f"no such file or folder: {input_path}")
    if input_path.is_file():
        return [input_path]
    files = sorted(p for p in input_path.iterdir() if p.is_file() and is_nifti(p) and not p.name.endswith(SKIP_SUFFIXES)
                   and not p.name.startswith("."))
    return files if files else [input_path]  # no NIfTI: read it as a DICOM series


def wanted_outputs(save_probabilities: bool, preview: bool) -> list[str]:
    return ["labels", "json"] + (["probabilities"] if save_probabilities else []) + (["preview"] if preview else [])


def refuse_overwrite(paths: dict[str, Path], wanted: list[str]) -> None:
    taken = next((paths[k] for k in wanted if paths[k].exists()), None)
    if taken is not None:
        raise MedsegError(f"{taken} exists; pass --force to overwrite")


def segment_file(predictor: Predictor, input_path: Path, output: Path | None = None, *, force: bool = False,
                 save_probabilities: bool = False, preview: bool = False, labels: list[str] | None = None,
                 on_window=None) -> dict[str, Any]:
    """Segment one scan and write its outputs atomically. Refuses to overwrite without ``force``."""
    paths = output_paths(input_path, output)
    wanted = wanted_outputs(save_probabilities, preview)
    if not force:
        refuse_overwrite(paths, wanted)
    folder = paths["labels"].parent
    if folder.exists() and not os.access(folder, os.W_OK):  # refuse before the work, not after it
        raise MedsegError(f"cannot write to {folder}: choose an output with -o")
    img = read_image(input_path)
    seg = predictor(img, labels=labels, probabilities=save_probabilities, on_window=on_window)
    try:
        write_nifti(seg.labels, paths["labels"])
        if seg.probabilities is not None:
            write_nifti(seg.probabilities, paths["probabilities"])
    except OSError as e:
        raise MedsegError(f"cannot write {paths['labels']}: {e.strerror or e}") from None
    sidecar = {"labels": {str(k): v for k, v in seg.names.items()}, "volume_ml": seg.volume_ml,
               "run": str(predictor.run_dir.resolve()), "input": str(input_path.resolve()), "method": seg.method,
               "tta": predictor.tta, "overlap": predictor.overlap, "spacing_mm": list(spacing_of(img.affine)),
               "seconds": round(seg.seconds, 2)}
    write_text_atomic(paths["json"], json.dumps(sidecar, indent=2) + "\n")
    if preview:
        from medseg.viz import save_preview

        save_preview(img, seg.labels, seg.names, paths["preview"], hu_window=predictor.bundle.data.hu_window)
    return {"paths": {k: paths[k] for k in wanted}, "segmentation": seg}
