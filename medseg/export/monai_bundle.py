"""A run as a MONAI bundle: ``configs/inference.json`` reproduces ``medseg infer`` with MONAI
components only (LoadImaged, Orientationd, Spacingd, ScaleIntensityRanged, CropForegroundd,
SlidingWindowInferer, Activationsd, Invertd, AsDiscreted, KeepLargestConnectedComponentd,
SaveImaged), so ``python -m monai.bundle run`` segments a NIfTI file the way medseg does:

    preprocessing   RAS, the bundle's spacing (bilinear), the clipped linear intensity map, the crop to
                    the body (medseg's rule: normalised value > ``body_threshold``, margin 0)
    inferer         the bundle's window, overlap, blending and padding value (air)
    postprocessing  softmax, Invertd (undo the crop, the resampling and the reorientation: the
                    probabilities are resampled trilinearly onto the scan's grid, as medseg's default
                    ``--resample linear``), the weight that fell outside the body crop given to
                    background (medseg's rule; Invertd pads zeros there), argmax, each
                    ``postprocess.largest_component`` class's largest 26-connected component, and the
                    label map written on the scan's grid

Known differences from medseg: medseg resamples float16 probabilities (the bundle float32), which
moves near-ties only; on the phantom the two agree on 99.99 % of voxels even for a barely trained
network (``tests/test_export.py`` requires 99.9 %). Not reproduced: ``--tta``, ensembles, medseg's
streaming window (MONAI's inferer holds a classes x volume float32 buffer) and ``--resample nearest``.

The loop needs no pytorch-ignite: ``run`` is one MONAI ``$`` expression over the data loader.
MONAI's own networks (vnet, unetr, swin_unetr) are referenced by their MONAI class, so the bundle
needs no medseg; fcn2d and fcn_triplanar are medseg's classes, and the bundle needs medseg installed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medseg.config import Bundle
from medseg.export.describe import Window

MONAI_NETWORKS = ("vnet", "unetr", "swin_unetr")
ORIENTATION_LABELS = [["L", "R"], ["P", "A"], ["I", "S"]]


def _jsonable(value: Any) -> Any:
    """A model argument as config JSON. A string MONAI's ConfigParser would read as code or a reference
    ($, @, %) is refused: a bundle must not run what a run's bundle.json happens to contain."""
    if isinstance(value, str) and value[:1] in ("$", "@", "%"):
        from medseg.errors import MedsegError

        raise MedsegError(f"model argument {value!r} starts with {value[0]!r}, which a MONAI config would evaluate; cannot export it")
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def network_config(bundle: Bundle) -> dict[str, Any]:
    """The network as a MONAI config item, built with the arguments medseg's registry passes
    (``medseg/models/nets.py``), without gradient checkpointing (it changes nothing at inference)."""
    name, k = bundle.model.name, len(bundle.data.labels) + 1
    args = _jsonable(dict(bundle.model.args))
    if name == "vnet":
        return {"_target_": "monai.networks.nets.VNet", "spatial_dims": 3, "in_channels": 1, "out_channels": k, **args}
    if name == "unetr":
        return {"_target_": "monai.networks.nets.UNETR", "in_channels": 1, "out_channels": k, "img_size": list(bundle.train.roi),
                "spatial_dims": 3, **args}
    if name == "swin_unetr":
        return {"_target_": "monai.networks.nets.SwinUNETR", "in_channels": 1, "out_channels": k, "spatial_dims": 3,
                "use_checkpoint": False, **args}
    if name == "fcn2d":
        return {"_target_": "medseg.models.fcn2d.SliceWise",
                "net2d": {"_target_": "medseg.models.fcn2d.FCN2D", "in_channels": 1, "out_channels": k, **args}}
    if name == "fcn_triplanar":
        return {"_target_": "medseg.models.triplanar.TriPlanar", "in_channels": 1, "out_channels": k, **args}
    # any other registered model: medseg's registry builds it
    return {"_target_": "medseg.models.create_model", "name": name, "in_channels": 1, "out_channels": k,
            "roi": list(bundle.train.roi), **args}


def largest_component(bundle: Bundle) -> list[str]:
    """The classes whose largest component is kept (names the run does not have are skipped, as medseg does)."""
    return [n for n in bundle.postprocess.largest_component if n in bundle.data.labels]


def needs_medseg(bundle: Bundle) -> bool:
    return bundle.model.name not in MONAI_NETWORKS


def inference_config(bundle: Bundle, labels: dict[int, str], window: Window) -> dict[str, Any]:
    from medseg.data.transforms import intensity_map

    lo, hi, a, b = intensity_map(bundle)
    by_name = {n: v for v, n in labels.items() if v != 0}
    largest = [by_name[n] for n in largest_component(bundle)]
    post: list[dict[str, Any]] = [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image", "nearest_interp": False,
         "to_tensor": True},
        # Invertd pads the body crop's outside with zero probabilities; medseg counts that weight as
        # background, which decides the voxels on the crop's edge (5 % of them for a poor network)
        {"_target_": "Lambdad", "keys": "pred", "func": "$lambda p: torch.cat([p[:1] + 1 - p.sum(0, keepdim=True), p[1:]])"},
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
    ]
    if largest:
        post.append({"_target_": "KeepLargestConnectedComponentd", "keys": "pred", "applied_labels": largest, "is_onehot": False,
                     "independent": True, "connectivity": 3})
    post.append({"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg", "output_ext": ".nii.gz",
                 "output_dtype": "$numpy.uint8" if len(labels) <= 256 else "$numpy.uint16", "resample": False,
                 "separate_folder": False, "print_log": False})
    return {
        "imports": ["$import collections", "$import glob", "$import os", "$import numpy", "$import torch", "$import monai"],
        "bundle_root": ".",
        "ckpt_path": "$@bundle_root + '/models/model.pt'",
        "dataset_dir": ".",
        "output_dir": "eval",  # relative to where it runs, never inside the bundle (a re-export would replace the bundle)
        "datalist": "$sorted(glob.glob(os.path.join(@dataset_dir, '*.nii.gz')) + glob.glob(os.path.join(@dataset_dir, '*.nii')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": network_config(bundle),
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image", "reader": "NibabelReader", "image_only": True},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS", "labels": ORIENTATION_LABELS},
                {"_target_": "Spacingd", "keys": "image", "pixdim": list(bundle.data.spacing), "mode": "bilinear"},
                {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": lo, "a_max": hi, "b_min": a, "b_max": b, "clip": True},
                {"_target_": "CropForegroundd", "keys": "image", "source_key": "image",
                 "select_fn": f"$lambda x: x > {window.body_threshold!r}", "margin": 0, "allow_smaller": True},
            ],
        },
        "dataset": {"_target_": "Dataset", "data": "$[{'image': f} for f in @datalist]", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False, "num_workers": 0},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": list(window.roi), "sw_batch_size": window.sw_batch_size,
                    "overlap": window.overlap, "mode": window.mode, "cval": window.pad_value, "sw_device": "@device",
                    "device": "$torch.device('cpu')"},
        "postprocessing": {"_target_": "Compose", "transforms": post},
        "predict": "$lambda batch: monai.data.decollate_batch({'image': batch['image'], 'pred': @inferer(batch['image'].to(@device), "
                   "@network)})",
        "initialize": [
            "$torch.set_grad_enabled(False)",
            "$@network.load_state_dict(torch.load(@ckpt_path, map_location=@device, weights_only=True))",
            "$@network.eval()",
        ],
        # each scan saved and dropped (a list of results would hold every scan in memory)
        "run": ["$collections.deque((@postprocessing(item) for batch in @dataloader for item in @predict(batch)), maxlen=0)"],
    }


def metadata(bundle: Bundle, labels: dict[int, str], window: Window, run_name: str, parameters: int) -> dict[str, Any]:
    import monai
    import nibabel
    import numpy
    import torch

    from medseg import __version__
    from medseg.data.transforms import intensity_map
    from medseg.models import get_spec

    lo, hi, a, b = intensity_map(bundle)
    spec = get_spec(bundle.model.name)
    k = len(labels)
    roi = list(window.roi)
    classes = {str(v): n for v, n in sorted(labels.items())}
    required = {"nibabel": nibabel.__version__}
    if largest_component(bundle):
        try:
            import skimage

            required["scikit-image"] = skimage.__version__
        except ImportError:
            required["scikit-image"] = "any"
    if needs_medseg(bundle):
        required["medseg"] = __version__
    try:
        import fire

        required["fire"] = getattr(fire, "__version__", "any")  # python -m monai.bundle needs it
    except ImportError:
        required["fire"] = "any"
    return {
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by medseg {__version__} from run {run_name}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": required,
        "name": f"medseg {spec.display} {run_name}",
        "task": f"CT segmentation of {', '.join(n for v, n in sorted(labels.items()) if v)}",
        "description": f"{spec.display} trained with medseg ({parameters:,} parameters). configs/inference.json reproduces "
                       "medseg infer: RAS, resampling, clipped linear intensity map, crop to the body, sliding window, "
                       "probabilities resampled back to the scan's grid, argmax"
                       + (", largest connected component per listed class" if largest_component(bundle) else "")
                       + (". The network is medseg's own class: medseg must be installed." if needs_medseg(bundle) else "."),
        "authors": "the medseg run's owner",
        "copyright": "not stated: the run's owner decides how the weights may be shared",
        "data_source": str(bundle.data.source),
        "data_type": "nifti",
        "image_classes": "single-channel CT in Hounsfield units",
        "label_classes": classes,
        "pred_classes": classes,
        "intended_use": "research; not a medical device",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image", "format": "hounsfield", "modality": "CT", "num_channels": 1, "spatial_shape": roi,
                    "dtype": "float32", "value_range": [a, b], "is_patch_data": True, "channel_def": {"0": "image"},
                    "hu_range": [lo, hi], "pixdim": list(bundle.data.spacing), "orientation": "RAS",
                }
            },
            "outputs": {
                "pred": {
                    "type": "image", "format": "segmentation", "num_channels": k, "spatial_shape": roi, "dtype": "float32",
                    "value_range": [], "is_patch_data": True, "channel_def": classes,
                    "description": "logits per class (softmax gives the class probabilities)",
                }
            },
        },
    }


def command(folder: str = "DIR", data: str = "SCANS_DIR", output: str = "OUT_DIR") -> str:
    import shlex

    q = shlex.quote
    return (f"python -m monai.bundle run --config_file {q(folder + '/configs/inference.json')} "
            f"--meta_file {q(folder + '/configs/metadata.json')} --bundle_root {q(folder)} --dataset_dir {q(data)} --output_dir {q(output)}")


def requirements(bundle: Bundle) -> list[str]:
    needs = ["monai", "torch", "nibabel", "fire (python -m monai.bundle)"]
    if largest_component(bundle):
        needs.append("scikit-image (KeepLargestConnectedComponentd)")
    if needs_medseg(bundle):
        needs.append(f"medseg (the network is medseg's {bundle.model.name} class)")
    return needs


def docs(bundle: Bundle, labels: dict[int, str], window: Window, run_name: str) -> str:
    classes = ", ".join(f"{v} = {n}" for v, n in sorted(labels.items()))
    largest = largest_component(bundle)
    largest_step = f"the largest connected component of {', '.join(largest)}; " if largest else ""
    return f"""# medseg {bundle.model.name}: {run_name}

A MONAI bundle exported by `medseg export` from the medseg run `{run_name}`.

## Use

```bash
{command()}
```

segments every `*.nii.gz` / `*.nii` CT in `SCANS_DIR` and writes `OUT_DIR/<name>_seg.nii.gz` on each scan's own grid
(shape and affine), uint8 labels: {classes}. Name files instead with `--datalist "['a.nii.gz','b.nii.gz']"`.
`--bundle_root` must be this folder (the weights are `models/model.pt`, a state dict). Needs {', '.join(requirements(bundle))}.

## What it does

`configs/inference.json` repeats `medseg infer` step by step with MONAI transforms: RAS; resampling to
{list(bundle.data.spacing)} mm; the intensity map (ScaleIntensityRanged with clip); the crop to the body (values > {window.body_threshold!r});
a {list(window.roi)} sliding window (overlap {window.overlap}, {window.mode} blending, padding value {window.pad_value!r});
softmax; Invertd back onto the scan's grid (probabilities resampled trilinearly; the weight outside the body crop
counts as background, as in medseg); argmax;
{largest_step}SaveImaged.
On the phantom the labels agree with `medseg infer` on 99.99 % of voxels (medseg's tests require 99.9 %).
Not included: medseg's test-time mirroring (`--tta`), fold ensembles and its memory-bounded streaming window
(MONAI's inferer holds classes x volume float32 on the CPU).

## Licence

None is stated: the weights belong to whoever trained the run.
"""


def write_bundle(folder: Path, model, bundle: Bundle, labels: dict[int, str], window: Window, run_name: str, parameters: int) -> list[str]:
    """The bundle's files under ``folder``; returns their paths relative to it."""
    import torch

    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    (folder / "docs").mkdir()
    torch.save(model.state_dict(), folder / "models" / "model.pt")
    (folder / "configs" / "inference.json").write_text(json.dumps(inference_config(bundle, labels, window), indent=2) + "\n")
    (folder / "configs" / "metadata.json").write_text(json.dumps(metadata(bundle, labels, window, run_name, parameters), indent=2) + "\n")
    (folder / "docs" / "README.md").write_text(docs(bundle, labels, window, run_name))
    return ["configs/inference.json", "configs/metadata.json", "models/model.pt", "docs/README.md"]


def bundle_network(folder: Path):
    """The network the written bundle builds (its ``network_def``) with its ``models/model.pt``: what
    ``monai.bundle run`` will run, for the parity check."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(folder / "configs" / "inference.json"))
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(folder / "models" / "model.pt", map_location="cpu", weights_only=True))
    return net.eval()
