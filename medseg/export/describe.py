"""What every export folder says about its network: ``export.json`` (for programs) and
``README.txt`` (for people). Both are written from the run's own bundle, so they state exactly
what medseg does around the network: RAS, the bundle's spacing, the clipped linear intensity map,
the crop to the body, the sliding window, and the way back to the scan's grid."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from pathlib import Path
from typing import Any

from medseg import __version__
from medseg.config import Bundle

MODEL_NOTES = {
    "fcn2d": ("A 2D network: the graph is medseg's SliceWise wrapper, which folds the window's axial slices (its last axis) into "
              "the 2D FCN-8s's batch and unfolds the result, so it takes and returns 3D windows like the 3D models and the same "
              "sliding window drives it. Each axial slice is segmented on its own."),
    "fcn_triplanar": ("Three 2D FCN-8s (sagittal, coronal, axial) on every slice of the window along their own axis; the output is "
                      "the log of their fused class probabilities, so a softmax of it returns the fused probabilities. In the "
                      "ONNX/TorchScript graph each axis's slices run as one 2D batch (medseg runs them in chunks of 32 to bound "
                      "memory; each slice is normalised on its own, so the result is the same, as the parity check confirms)."),
}


@dataclasses.dataclass(frozen=True)
class Window:
    """The sliding window as medseg runs it for this run (see :class:`medseg.engine.pipeline.WindowSpec`)."""

    roi: tuple[int, ...]
    overlap: float
    mode: str
    sw_batch_size: int
    pad_value: float
    body_threshold: float


def _sha256(path: Path) -> str | None:
    """Which weights were exported, whatever the run did afterwards."""
    import hashlib

    try:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    except OSError:
        return None


def window_of(run, bundle: Bundle) -> Window:
    from medseg.data.transforms import body_threshold
    from medseg.engine.infer import run_window

    spec = run_window(run, bundle)  # as medseg infer runs it (older runs pad with 0)
    return Window(tuple(spec.roi), spec.overlap, spec.mode, spec.sw_batch_size, float(spec.pad_value), float(body_threshold(bundle)))


def intensity(bundle: Bundle) -> dict[str, Any]:
    """medseg's intensity normalisation as the exact clipped linear map (MONAI's ScaleIntensityRanged with clip)."""
    from medseg.data.transforms import intensity_map

    lo, hi, a, b = intensity_map(bundle)
    scale = (b - a) / (hi - lo)
    out: dict[str, Any] = {
        "normalization": bundle.data.normalization,
        "hu_low": lo, "hu_high": hi, "value_low": a, "value_high": b,
        "scale": scale, "offset": a - lo * scale,
        # computed as MONAI's ScaleIntensityRange does, (HU - hu_low) first: air lands on value_low exactly,
        # which the body crop (value > threshold) relies on; scale * HU + offset misses it by float rounding
        "formula": "value = (clip(HU, hu_low, hu_high) - hu_low) / (hu_high - hu_low) * (value_high - value_low) + value_low",
    }
    if bundle.data.normalization == "ct":
        s = bundle.data.ct_stats
        out["ct_stats"] = {"low": s.low, "high": s.high, "mean": s.mean, "std": s.std}  # type: ignore[union-attr]
        out["meaning"] = "clip to the training foreground's percentiles [low, high], then z-score with its mean and std"
    else:
        out["meaning"] = "the HU window [hu_low, hu_high] onto [0, 1]"
    return out


def describe(run, bundle: Bundle, labels: dict[int, str], checkpoint: str, fmt: str, window: Window, files: dict[str, str],
             parameters: int) -> dict[str, Any]:
    """export.json without the parity (added once measured)."""
    from medseg.models import get_spec

    roi = list(window.roi)
    k = len(labels)
    spec = get_spec(bundle.model.name)
    return {
        "format": fmt,
        "files": files,
        "medseg_version": __version__,
        "exported": datetime.now().isoformat(timespec="seconds"),
        "run": {"name": run.name, "path": str(run.path.resolve()), "status": run.status, "checkpoint": checkpoint,
                "best_dice": run.info.get("best_dice"), "best_epoch": run.info.get("best_epoch"), "steps": run.info.get("steps"),
                "weights_sha256": _sha256(run.weights_path(checkpoint))},
        "model": {"name": bundle.model.name, "display": spec.display, "args": bundle.model.args, "parameters": parameters,
                  "train_roi": list(bundle.train.roi)},
        "classes": {str(v): n for v, n in sorted(labels.items())},
        "input": {
            "name": "image",
            "shape": ["batch", 1, *roi],
            "dtype": "float32",
            "channels": 1,
            "window": roi,
            "axes": "(batch, channel, x, y, z) in RAS voxel order: x left->Right, y posterior->Anterior, z inferior->Superior",
            "orientation": "RAS",
            "spacing_mm": list(bundle.data.spacing),
            "resampling": "to spacing_mm with trilinear interpolation (MONAI Spacingd, mode bilinear)",
            "intensity": intensity(bundle),
        },
        "output": {
            "name": "logits",
            "shape": ["batch", k, *roi],
            "dtype": "float32",
            "meaning": "logits per class over the window (class index = label value, see classes); softmax over axis 1 gives "
                       "class probabilities",
        },
        "sliding_window": {
            "roi": roi, "overlap": window.overlap, "mode": window.mode, "sw_batch_size": window.sw_batch_size,
            "pad_value": window.pad_value,
            "note": "windows are blended with MONAI's sliding_window_inference (importance map per mode, sigma_scale 0.125); a "
                    "volume smaller than the window is padded with pad_value (air after normalisation), as training padded patches",
        },
        "body_crop": {
            "threshold": window.body_threshold,
            "rule": "before the sliding window medseg crops the normalised model-grid volume to the bounding box of the voxels "
                    "above threshold (MONAI CropForegroundd, margin 0); outside it the labels are background",
        },
        "back_to_scan": "softmax probabilities resampled trilinearly onto the scan's own grid, labels = their argmax (nnU-Net's way); "
                        "outside the body crop: background",
        "postprocess": {"largest_component": [n for n in bundle.postprocess.largest_component if n in labels.values()],
                        "rule": "each listed class keeps its largest 26-connected component; the rest becomes background"},
        "notes": [MODEL_NOTES[bundle.model.name]] if bundle.model.name in MODEL_NOTES else [],
    }


def _fmt(v: float) -> str:
    return f"{v:.6g}"


def _meaning(imap: dict[str, Any]) -> str:
    if imap["normalization"] == "ct":
        c = imap["ct_stats"]
        return (f"the training foreground's CT normalisation: clip to [{_fmt(c['low'])}, {_fmt(c['high'])}] HU, then "
                f"(HU - {_fmt(c['mean'])}) / {_fmt(c['std'])}")
    return f"the HU window [{_fmt(imap['hu_low'])}, {_fmt(imap['hu_high'])}] onto [0, 1]"


def readme(info: dict[str, Any]) -> str:
    """README.txt: what the folder holds and how to use it, with this run's numbers."""
    fmt = info["format"]
    i, o, sw = info["input"], info["output"], info["sliding_window"]
    imap = i["intensity"]
    roi = "x".join(str(r) for r in i["window"])
    classes = ", ".join(f"{v} {n}" for v, n in info["classes"].items())
    lines = [
        f"{info['model']['display']} from medseg run {info['run']['name']} ({info['run']['checkpoint']} checkpoint), "
        f"exported as {fmt} by medseg {info['medseg_version']}.",
        *([f"NOTE: the run was {info['run']['status']}, not complete, when it was exported: these are its weights of that moment "
           f"(sha256 {info['run']['weights_sha256']})."] if info["run"]["status"] != "complete" else []),
        "",
        "Files:",
        *[f"  {name:<28} {what}" for name, what in info["files"].items()],
        "",
        "The network segments one window of a CT scan that has been prepared exactly as below:",
        f"  input  '{i['name']}': float32 {i['shape']} (the batch axis is free)",
        f"  output '{o['name']}': float32 {o['shape']}: {o['meaning']}",
        f"  classes: {classes}",
        "",
        "Preparing a scan (what medseg infer does; export.json has the same numbers):",
        "  1. reorient to RAS (MONAI Orientationd axcodes='RAS') and resample to "
        f"{' x '.join(_fmt(s) for s in i['spacing_mm'])} mm (Spacingd, bilinear)",
        f"  2. intensity: value = (clip(HU, {_fmt(imap['hu_low'])}, {_fmt(imap['hu_high'])}) - ({_fmt(imap['hu_low'])})) "
        f"/ {_fmt(imap['hu_high'] - imap['hu_low'])} * {_fmt(imap['value_high'] - imap['value_low'])} + ({_fmt(imap['value_low'])})",
        "     (in this order, as MONAI's ScaleIntensityRange: air must land exactly on the low value for step 3;",
        "      clip(HU) * scale + offset misses it by float rounding and then nothing is cropped)",
        f"     ({_meaning(imap)}; {_fmt(imap['value_low'])} is air)",
        f"  3. crop to the body: the bounding box of the voxels with value > {_fmt(info['body_crop']['threshold'])}",
        f"  4. slide a {roi} window over it: overlap {sw['overlap']}, {sw['mode']} blending, padding value {_fmt(sw['pad_value'])}",
        "     (MONAI sliding_window_inference with the network as predictor)",
        "  5. softmax over the classes, resample the probabilities trilinearly back onto the scan's grid, argmax",
    ]
    if info["postprocess"]["largest_component"]:
        lines.append(f"  6. keep the largest 26-connected component of: {', '.join(info['postprocess']['largest_component'])}")
    lines.append("")
    for note in info["notes"]:
        lines += [f"Note: {note}", ""]
    if fmt == "onnx":
        lines += [
            "Running it (pip install onnxruntime monai nibabel):",
            "  import onnxruntime as ort, torch",
            "  from monai.inferers import sliding_window_inference",
            "  session = ort.InferenceSession('model.onnx', providers=['CPUExecutionProvider'])",
            "  net = lambda x: torch.from_numpy(session.run(['logits'], {'image': x.numpy()})[0])",
            f"  logits = sliding_window_inference(volume, {list(i['window'])}, {sw['sw_batch_size']}, net, overlap={sw['overlap']}, "
            f"mode='{sw['mode']}', cval={_fmt(sw['pad_value'])})",
            "  # volume: (1, 1, X, Y, Z) float32 prepared as in steps 1-3",
        ]
    elif fmt == "torchscript":
        lines += [
            "Running it (needs only PyTorch):",
            "  import torch",
            "  net = torch.jit.load('model.torchscript.pt', map_location='cpu').eval()",
            "  with torch.no_grad(): logits = net(window)   # window: (N, 1, "
            f"{', '.join(str(r) for r in i['window'])}) float32 prepared as in steps 1-3",
            "TorchScript is deprecated in recent PyTorch releases (it still loads and runs); ONNX is the longer-lived format.",
        ]
    else:
        lines += [
            "Running it: this folder is a MONAI bundle whose configs/inference.json does steps 1-6 with MONAI transforms",
            "(LoadImaged, Orientationd, Spacingd, ScaleIntensityRanged, CropForegroundd, SlidingWindowInferer, Activationsd,",
            "Invertd, a Lambdad giving the weight outside the body crop to background, AsDiscreted,",
            "KeepLargestConnectedComponentd, SaveImaged) and writes <name>_seg.nii.gz per scan on the scan's own grid.",
            "Every NIfTI file in --dataset_dir is segmented (or pass --datalist \"['a.nii.gz','b.nii.gz']\"):",
            "",
            f"  {info['bundle_command']}",
            "",
            f"Needs: {', '.join(info['bundle_requires'])}. See docs/README.md.",
        ]
    lines += [
        "",
        f"Parity, measured at export on {info['parity']['windows']} random windows, {info['parity']['runtime']} against "
        f"{info['parity']['reference']}: max |logit difference| {info['parity']['max_abs_diff']:.3g}, argmax agreement "
        f"{info['parity']['argmax_agreement']:.4%}.",
        "The weights are those of the run; no licence is stated here: the run's owner decides how they may be shared.",
    ]
    return "\n".join(lines) + "\n"
