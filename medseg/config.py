"""Bundles: plain JSON validated into typed, frozen-by-convention dataclasses.

A bundle is data, never code: no ``eval``, no imports named by the file. Every key is checked; an
unknown key fails with its full path and the closest valid name. Defaults follow the MONAI BTCV
recipe (spacing 1.5x1.5x2.0 mm, RAS, HU window -175..250, RandCropByPosNegLabel pos 1 / neg 1 /
4 samples, DiceCE, AdamW 1e-4, gaussian sliding window overlap 0.25, 4 windows per batch) except the
ROI and the length of training, which the shipped bundles size for a CPU run on the phantom.

    bundle = load_bundle("bundles/unetr.json", overrides=["train.epochs=2"])
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medseg.errors import BundleError

MAX_ROI_VOXELS = 512**3  # no GPU trains a larger patch; a typo like [20000,20000,1] fails here, not in an allocation
PHANTOM_LABELS = ["liver", "spleen", "kidney_right", "kidney_left", "vertebrae", "aorta"]


@dataclass
class ModelConfig:
    name: str = "swin_unetr"
    # Keyword arguments for the network, checked against its signature when it is built.
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class PhantomConfig:
    cases: int = 8
    seed: int = 0


@dataclass
class CTStats:
    """The foreground intensity statistics ``"ct"`` normalisation uses (nnU-Net's CT scheme): clip
    to [low, high] (the foreground's 0.5 and 99.5 percentiles, ``high`` at least the top of
    ``hu_window``), then subtract ``mean`` and divide by ``std`` (the foreground's)."""

    low: float
    high: float
    mean: float
    std: float


@dataclass
class DataConfig:
    # "phantom", a folder (imagesTr/+labelsTr/, image.nii.gz+label.nii.gz, or case subfolders)
    # or a Decathlon dataset.json.
    source: str = "phantom"
    # Output classes by name; background is class 0 and implied.
    labels: list[str] = field(default_factory=lambda: ["liver", "spleen", "kidney_right", "kidney_left"])
    # What the source's label values mean: a JSON file or a mapping {value: name}. Values whose
    # name is not in `labels` become background. None: the dataset's own (phantom, dataset.json),
    # else values 1..N are taken to be `labels` in order.
    source_labels: str | dict[str, str] | None = None
    phantom: PhantomConfig = field(default_factory=PhantomConfig)
    # Voxel size the volumes are resampled to (mm); "auto": planned from the data (see medseg/plan.py).
    spacing: list[float] | Literal["auto"] = field(default_factory=lambda: [1.5, 1.5, 2.0])
    # "window": clip to `hu_window`, scale to [0, 1] (the BTCV recipe). "ct": clip to the
    # foreground's 0.5-99.5 percentiles (the top at least hu_window's), z-score with its mean/std
    # (`ct_stats`; "auto": planned).
    normalization: Literal["window", "ct"] = "window"
    hu_window: list[float] = field(default_factory=lambda: [-175.0, 250.0])
    ct_stats: CTStats | Literal["auto"] = "auto"
    val_fraction: float = 0.2
    split_seed: int = 0
    # K-fold cross-validation (nnU-Net's 5 folds): with `fold` set (0 .. folds-1), the cases are
    # shuffled by `split_seed`, cut into `folds` parts, and part `fold` is validation (`val_fraction`
    # is then unused). `split_file`: a JSON list of {"train": [names], "val": [names]} (nnU-Net's
    # splits_final.json; `medseg compare` writes one) of which `fold` picks one; `folds` then follows it.
    folds: int = 5
    fold: int | None = None
    split_file: str | None = None
    cache: bool = True
    num_workers: int = 0


@dataclass
class TrainConfig:
    # Patch size (voxels) and volumes per batch; "auto": fitted to plan.budget by medseg's memory estimator.
    roi: list[int] | Literal["auto"] = field(default_factory=lambda: [64, 64, 64])
    batch_size: int | Literal["auto"] = 1
    samples_per_volume: int = 4
    # "pos_neg": RandCropByPosNegLabeld with `pos_neg` ratio; "class_balanced": RandCropByLabelClassesd.
    sampling: Literal["pos_neg", "class_balanced"] = "pos_neg"
    pos_neg: list[float] = field(default_factory=lambda: [1.0, 1.0])
    # Augmentation preset (see medseg/data/augment.py): "strong" (nnU-Net-like spatial + intensity),
    # "light" (the BTCV recipe: flips, rot90, intensity shift) or "none". `augment_p` overrides the
    # probability of single transforms by name, e.g. {"elastic": 0.2, "rotate_scale": 0.3}.
    augment: Literal["strong", "light", "none"] = "light"
    augment_p: dict[str, float] = field(default_factory=dict)
    loss: Literal["dice_ce", "dice", "ce", "dice_focal"] = "dice_ce"
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-4
    weight_decay: float = 1e-5
    # Learning rate of the model's output head (its registered `head`) as a multiple of `lr`. The shipped
    # V-Net uses 25, UNETR 20: their heads follow normalisation, so only the head's weights scale the logits.
    head_lr_scale: float = 1.0
    # SGD uses Nesterov momentum (nnU-Net: 0.99, lr 1e-2).
    momentum: float = 0.99
    scheduler: Literal["none", "cosine", "poly"] = "none"
    # Linear warm-up from 0 over this many optimiser steps, then the scheduler's decay.
    warmup: int = 0
    # Clip the gradients' global L2 norm to this (nnU-Net: 12); null: no clipping.
    grad_clip: float | None = None
    epochs: int = 10
    # Total optimiser steps; when set it replaces `epochs` (epochs = ceil(iterations /
    # iterations_per_epoch), the last one shorter), since one epoch over a single case means little.
    iterations: int | None = None
    # None: one pass over the training volumes (x samples_per_volume patches) per epoch, or 50 when
    # `iterations` is set.
    iterations_per_epoch: int | None = None
    # Wall-clock budget of the optimiser steps (validation not counted), in minutes: when it is spent the
    # epoch ends there (validation, checkpoint) and the run is complete. Whichever of this and the
    # length (iterations/epochs) comes first ends training; the rate schedule follows the length.
    max_minutes: float | None = None
    amp: bool = True
    grad_checkpointing: bool = False
    val_interval: int = 1
    # When to write checkpoint.pt besides the end of training and a requested stop: "epoch",
    # "<N>it" (every N optimiser steps) or "<N>min" (every N minutes of training).
    checkpoint_every: str = "10min"
    seed: int = 0

    def iterations_per_epoch_for(self, loader_len: int) -> int:
        """Optimiser steps in a full epoch."""
        if self.iterations_per_epoch is not None:
            return self.iterations_per_epoch
        return min(50, self.iterations) if self.iterations is not None else loader_len


@dataclass
class SlidingWindowConfig:
    roi: list[int] | None = None  # None: the training ROI
    sw_batch_size: int = 4
    overlap: float = 0.25
    mode: Literal["gaussian", "constant"] = "gaussian"


@dataclass
class PostprocessConfig:
    # Classes (names from data.labels) reduced to their largest 26-connected component after
    # inference, the rest set to background (nnU-Net's and TotalSegmentator's step for single
    # organs). Leave out classes that are several pieces (vertebrae, ribs, lesions). Names that are
    # not in data.labels are skipped with a note (a shipped bundle trained on fewer classes).
    largest_component: list[str] = field(default_factory=list)

    def unknown(self, labels: list[str]) -> str | None:
        """A note naming listed classes that are not in ``labels`` (they are skipped), or None."""
        missing = [n for n in self.largest_component if n not in labels]
        if not missing:
            return None
        return (f"postprocess.largest_component: {', '.join(map(repr, missing))} not in data.labels ({', '.join(labels)}); "
                "skipped")


@dataclass
class PlanConfig:
    # Memory a training step may use when train.roi / train.batch_size are "auto": "auto" (90 % of the
    # GPU's memory; 8 GB on the CPU) or a size such as "24GB".
    budget: str = "auto"
    # Largest patch the planner proposes (voxels), which bounds CPU step time whatever the budget.
    max_roi_voxels: int = 160**3


@dataclass
class TrackingConfig:
    backend: Literal["mlflow", "none"] = "mlflow"
    experiment: str = "medseg"
    # None: MLFLOW_TRACKING_URI if set, else sqlite:///mlflow.db in the working directory.
    uri: str | None = None


@dataclass
class Bundle:
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sliding_window: SlidingWindowConfig = field(default_factory=SlidingWindowConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def infer_roi(self) -> list[int]:
        return list(self.sliding_window.roi or self.train.roi)

    def planned_fields(self) -> list[str]:
        """The fields still on "auto", which :func:`medseg.plan.apply_plan` fills from the data."""
        d, t = self.data, self.train
        auto = [("data.spacing", d.spacing), ("train.roi", t.roi), ("train.batch_size", t.batch_size)]
        if d.normalization == "ct":
            auto.append(("data.ct_stats", d.ct_stats))
        return [k for k, v in auto if v == "auto"]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# loading


def load_bundle(path: str | Path | None = None, overrides: list[str] | None = None) -> Bundle:
    """Read a bundle file (or start from the defaults when ``path`` is None), apply ``--set``
    overrides, and validate. Raises :class:`BundleError` naming the offending key."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_bundle_json(path)
    return bundle_from_dict(raw, overrides)


def read_bundle_json(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        raise BundleError(f"bundle {p} is a folder; give a bundle JSON file, e.g. bundles/swin_unetr.json")
    if not p.is_file():
        raise BundleError(f"bundle not found: {p}")
    try:
        raw = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"bundle {p} is not valid JSON: {e}") from None
    except RecursionError:
        raise BundleError(f"bundle {p} is nested too deeply") from None
    except OSError as e:
        raise BundleError(f"cannot read bundle {p}: {e.strerror or e}") from None
    if not isinstance(raw, dict):
        raise BundleError(f"bundle {p} must hold a JSON object at the top level")
    if set(raw) == {"plan", "bundle"} and isinstance(raw["bundle"], dict):
        return raw["bundle"]  # written by `medseg plan -o`: the planned bundle beside the plan's record
    return raw


def bundle_from_dict(raw: dict[str, Any], overrides: list[str] | None = None) -> Bundle:
    raw = json.loads(json.dumps(raw))  # deep copy, and proof that it is plain JSON
    for item in overrides or []:
        apply_override(raw, item)
    train = raw.get("train")
    if isinstance(train, dict) and isinstance(train.get("augment"), bool):  # run format 1 wrote true/false
        train["augment"] = "light" if train["augment"] else "none"
    bundle = _build(Bundle, raw, "")
    _check_values(bundle)
    return bundle


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.epochs=2"`` -> (["train", "epochs"], 2). The value is JSON when it parses as JSON,
    otherwise the plain string (so ``data.source=../x`` needs no quotes)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise BundleError(f"override {item!r} must look like section.key=value")
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        value = text
    return key.strip().split("."), value


def apply_override(raw: dict[str, Any], item: str) -> None:
    keys, value = parse_override(item)
    node = raw
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise BundleError(f"override {item!r}: {k!r} is not a section")
        node = child
    node[keys[-1]] = value


def _closest(name: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else f"; valid keys: {', '.join(valid)}"


def _build(cls: type, raw: Any, path: str) -> Any:
    where = path or "bundle"
    if not isinstance(raw, dict):
        raise BundleError(f"{where} must be a JSON object, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            full = f"{path}.{key}" if path else key
            raise BundleError(f"unknown bundle key {full!r}{_closest(key, names)}")
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in raw
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise BundleError(f"{where} needs {', '.join(names)}; missing {', '.join(missing)}")
    kwargs = {}
    for name in names:
        if name in raw:
            full = f"{path}.{name}" if path else name
            kwargs[name] = _coerce(hints[name], raw[name], full)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    """Check ``value`` against the type hint ``tp``; return it converted (int -> float, list copies)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, path)
            except BundleError as e:
                # the error of the option the value was meant as: an object for a section, a word for a choice
                meant = (isinstance(value, dict) and dataclasses.is_dataclass(option)) or (
                    isinstance(value, str) and typing.get_origin(option) is Literal)
                errors.insert(0, str(e)) if meant else errors.append(str(e))
        if len(errors) == 1 or isinstance(value, (dict, str)):
            raise BundleError(errors[0])
        raise BundleError(f"{path}: {value!r} has the wrong type")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            match = difflib.get_close_matches(value, [str(a) for a in args], n=1, cutoff=0.5) if isinstance(value, str) else []
            hint = f"; did you mean {match[0]!r}?" if match else ""
            raise BundleError(f"{path} must be one of {choices}, got {value!r}{hint}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise BundleError(f"{path} must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise BundleError(f"{path} must be an object, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise BundleError(f"{path} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise BundleError(f"{path} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise BundleError(f"{path} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if path == "plan.budget" and isinstance(value, (int, float)) and not isinstance(value, bool):
            raise BundleError(f"plan.budget: {value!r} has no unit: give one, e.g. 24GB or 80GiB")
        if not isinstance(value, str):
            raise BundleError(f"{path} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported bundle type {tp!r} at {path}")  # a schema bug, not user input


def _check_values(b: Bundle) -> None:
    """Range checks that types cannot express."""

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise BundleError(msg)

    d, t, sw = b.data, b.train, b.sliding_window
    need(len(d.labels) > 0, "data.labels must name at least one class")
    need(len(set(d.labels)) == len(d.labels), "data.labels has a repeated name")
    need("background" not in d.labels, "data.labels must not list 'background': it is class 0 and implied")
    for name in b.postprocess.largest_component:  # a near miss of a class is a typo; other names are skipped (a note)
        need(bool(name.strip()) and name != "background", f"postprocess.largest_component: {name!r} is not a class name")
        close = difflib.get_close_matches(name, [n for n in d.labels if n != name], n=1, cutoff=0.8) if name not in d.labels else []
        need(not close, f"postprocess.largest_component: {name!r} is not in data.labels; did you mean {close[0]!r}? "
                        "(set postprocess.largest_component to the classes to keep in one piece)" if close else "")
    need(d.spacing == "auto" or (len(d.spacing) == 3 and all(0.05 <= s <= 50 for s in d.spacing)),
         "data.spacing must be \"auto\" or 3 numbers between 0.05 and 50 (mm)")
    need(len(d.hu_window) == 2 and d.hu_window[0] < d.hu_window[1], "data.hu_window must be [low, high] with low < high")
    if isinstance(d.ct_stats, CTStats):
        need(d.ct_stats.low < d.ct_stats.high, "data.ct_stats: low must be below high")
        need(d.ct_stats.std > 0, "data.ct_stats.std must be > 0")
    need(0.0 <= d.val_fraction < 1.0, "data.val_fraction must be in [0, 1)")
    need(d.folds >= 2, "data.folds must be at least 2 (K-fold cross-validation)")
    need(d.fold is None or d.fold >= 0, "data.fold must be >= 0 or null")
    need(d.fold is None or d.split_file is not None or d.fold < d.folds,
         f"data.fold {d.fold} is not one of data.folds {d.folds}'s folds (0 .. {d.folds - 1})")
    need(d.split_file is None or d.fold is not None, "data.split_file needs data.fold: which of its splits to train")
    need(d.phantom.cases >= 1, "data.phantom.cases must be at least 1")
    need(d.num_workers >= 0, "data.num_workers must be >= 0")
    need(t.roi == "auto" or (len(t.roi) == 3 and all(r >= 1 for r in t.roi)), "train.roi must be \"auto\" or 3 positive integers")
    need(t.batch_size == "auto" or t.batch_size >= 1, "train.batch_size must be \"auto\" or >= 1")
    need(t.samples_per_volume >= 1, "train.samples_per_volume must be >= 1")
    need(len(t.pos_neg) == 2 and min(t.pos_neg) >= 0 and sum(t.pos_neg) > 0, "train.pos_neg must be [pos, neg] >= 0, not both 0")
    from medseg.data.augment import check_probabilities

    try:
        check_probabilities(t.augment_p)
    except ValueError as e:
        raise BundleError(f"train.augment_p: {e}") from None
    need(t.lr > 0, "train.lr must be > 0")
    need(t.weight_decay >= 0, "train.weight_decay must be >= 0")
    need(0 < t.head_lr_scale <= 1000, "train.head_lr_scale must be in (0, 1000]")
    need(0 <= t.momentum < 1, "train.momentum must be in [0, 1)")
    need(t.warmup >= 0, "train.warmup must be >= 0 (optimiser steps)")
    need(t.grad_clip is None or t.grad_clip > 0, "train.grad_clip must be > 0 or null")
    need(t.epochs >= 1, "train.epochs must be >= 1")
    need(t.iterations is None or t.iterations >= 1, "train.iterations must be >= 1 or null")
    need(t.iterations_per_epoch is None or t.iterations_per_epoch >= 1, "train.iterations_per_epoch must be >= 1 or null")
    need(t.max_minutes is None or (math.isfinite(t.max_minutes) and t.max_minutes > 0), "train.max_minutes must be > 0 or null")
    need(t.val_interval >= 1, "train.val_interval must be >= 1")
    try:
        parse_checkpoint_every(t.checkpoint_every)
    except ValueError as e:
        raise BundleError(f"train.checkpoint_every: {e}") from None
    for key, roi in (("train.roi", t.roi), ("sliding_window.roi", sw.roi)):
        if isinstance(roi, list) and len(roi) == 3 and math.prod(roi) > MAX_ROI_VOXELS:
            raise BundleError(f"{key} {roi} has {math.prod(roi):,} voxels per patch; at most {MAX_ROI_VOXELS:,} (512^3)")
    need(sw.roi is None or (len(sw.roi) == 3 and all(r >= 1 for r in sw.roi)), "sliding_window.roi must be 3 positive integers or null")
    need(sw.sw_batch_size >= 1, "sliding_window.sw_batch_size must be >= 1")
    need(0.0 <= sw.overlap < 1.0, "sliding_window.overlap must be in [0, 1)")
    if b.plan.budget != "auto":
        from medseg.cost.memory import parse_bytes

        try:
            parse_bytes(b.plan.budget)
        except ValueError as e:
            raise BundleError(f"plan.budget: {e}") from None
    need(8**3 <= b.plan.max_roi_voxels <= MAX_ROI_VOXELS, f"plan.max_roi_voxels must be between 512 and {MAX_ROI_VOXELS:,}")


def parse_checkpoint_every(text: str) -> tuple[str, float]:
    """``"epoch"`` -> ("epoch", 1); ``"500it"`` -> ("it", 500); ``"10min"`` -> ("min", 10)."""
    s = str(text).strip().lower()
    if s == "epoch":
        return "epoch", 1.0
    for unit in ("min", "it"):
        if s.endswith(unit):
            try:
                value = float(s[: -len(unit)])
            except ValueError:
                break
            if value > 0 and (unit == "min" or value == int(value)):
                return unit, value
            break
    raise ValueError(f"{text!r} must be \"epoch\", \"<N>it\" (optimiser steps) or \"<N>min\" (minutes), e.g. \"500it\" or \"10min\"")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-4}} -> {"train.lr": 1e-4}; lists and None kept as values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
