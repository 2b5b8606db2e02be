"""A timm-style model registry: ``register_model`` / ``create_model`` / ``list_models``.

A registered builder takes ``in_channels``, ``out_channels``, ``roi`` and ``grad_checkpointing`` plus
the network's own keyword arguments (a bundle's ``model.args``), which are checked against the
network's signature so a typo fails with the closest valid name instead of a TypeError deep inside.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

from medseg.errors import BundleError

# Arguments medseg sets itself; a bundle may not pass them in model.args.
RESERVED = {"in_channels", "out_channels", "img_size", "spatial_dims", "roi", "grad_checkpointing", "use_checkpoint"}


@dataclass(frozen=True)
class ModelSpec:
    name: str  # registry key, used in bundles: "swin_unetr"
    display: str  # used in run names: "SwinUNETR"
    builder: Callable
    network: type  # the class whose signature model.args are checked against
    roi_multiple: tuple[int, int, int]  # each ROI axis must be a multiple of this
    description: str
    # smallest ROI per axis: instance norm needs more than one voxel in the deepest feature map (Swin
    # UNETR divides by 32: 64x64x32 leaves 2x2x1, 32^3 one). Per axis is stricter than that rule:
    # Swin UNETR would also run 64x32x32.
    min_roi: tuple[int, int, int] = (1, 1, 1)
    # The network is built for one input size (UNETR's position embedding): windows must equal the ROI.
    fixed_roi: bool = False
    # Name of the module that maps the last features to class logits; train.head_lr_scale applies to it.
    head: str | None = None
    # The network sees one axial slice at a time (fcn2d): trained on ROIs of depth 1, and test-time
    # mirroring across slices adds nothing.
    axial_slices: bool = False

    def accepted_args(self) -> list[str]:
        params = inspect.signature(self.network.__init__).parameters
        return sorted(p for p in params if p not in RESERVED and p != "self" and params[p].kind is not inspect.Parameter.VAR_KEYWORD)


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(name: str, *, display: str, network: type, roi_multiple: tuple[int, int, int], description: str,
                   min_roi: tuple[int, int, int] | None = None, fixed_roi: bool = False, head: str | None = None,
                   axial_slices: bool = False):
    def decorate(builder: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelSpec(name, display, builder, network, roi_multiple, description, min_roi or roi_multiple, fixed_roi, head,
                                    axial_slices)
        return builder

    return decorate


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    if name not in _REGISTRY:
        match = difflib.get_close_matches(name, list(_REGISTRY), n=1, cutoff=0.4)
        hint = f"; did you mean {match[0]!r}?" if match else ""
        raise BundleError(f"unknown model {name!r}{hint} (available: {', '.join(list_models())})")
    return _REGISTRY[name]


def check_roi(name: str, roi) -> None:
    spec = get_spec(name)
    bad = [i for i, (r, m, lo) in enumerate(zip(roi, spec.roi_multiple, spec.min_roi)) if r % m or r < lo]
    if len(roi) != 3 or bad:
        raise BundleError(
            f"ROI {list(roi)} does not suit {spec.display}: each axis must be a multiple of "
            f"{list(spec.roi_multiple)} and at least {list(spec.min_roi)}"
        )


def check_window(name: str, train_roi, window_roi) -> None:
    """The sliding window's ROI must suit the model too, and equal the training ROI for a model
    built for one input size; checked with the bundle, not an epoch later at the first validation."""
    check_roi(name, window_roi)
    spec = get_spec(name)
    if spec.fixed_roi and list(window_roi) != list(train_roi):
        raise BundleError(f"sliding_window.roi {list(window_roi)} must equal train.roi {list(train_roi)} for {spec.display}: "
                          "the network is built for one input size (set sliding_window.roi to null)")


def _optional(annotation) -> bool:
    """Whether None is one of the annotation's top-level alternatives: ``float | None`` and
    ``Optional[float]`` yes, ``tuple[float | None, float]`` no (None only inside the tuple)."""
    text = str(annotation).replace("typing.", "")
    if text.startswith("Optional["):
        return True
    depth, parts, start = 0, [], 0
    for i, ch in enumerate(text):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "|" and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return any(p.strip() in ("None", "NoneType") for p in parts)


def _check_arg_types(spec: ModelSpec, args: dict) -> None:
    """A value whose type cannot be what the network's default is (``"feature_size": "abc"``) is a
    bundle error, not a TypeError deep inside the network."""
    params = inspect.signature(spec.network.__init__).parameters
    for key, value in args.items():
        default = params[key].default if key in params else inspect.Parameter.empty
        if value is None and key in params and _optional(params[key].annotation):
            continue  # optional by the network's own signature (V-Net's dropout_prob_down: float | None)
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, (int, float)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif isinstance(default, (tuple, list)):
            ok = isinstance(value, (list, tuple)) or (isinstance(value, (int, float)) and not isinstance(value, bool))
        else:
            ok = True
        if not ok:
            raise BundleError(f"model.args.{key} must be like its default {default!r}, got {value!r}")
        # sizes and counts whose defaults are positive integers (feature_size, num_heads) cannot be 0 or negative
        defaults = default if isinstance(default, (tuple, list)) else [default]
        values = value if isinstance(value, (tuple, list)) else [value]
        if defaults and all(type(d) is int and d > 0 for d in defaults) \
                and any(isinstance(v, (int, float)) and not isinstance(v, bool) and v <= 0 for v in values):
            raise BundleError(f"model.args.{key} must be positive (default {default!r}), got {value!r}")


def check_head_lr(name: str, head_lr_scale: float) -> ModelSpec:
    spec = get_spec(name)
    if head_lr_scale != 1.0 and spec.head is None:
        raise BundleError(f"train.head_lr_scale: {spec.display} has no registered output head; leave it at 1")
    return spec


def param_groups(name: str, model, head_lr_scale: float = 1.0) -> list[dict]:
    """The model's parameters for the optimiser: the output head (``spec.head``) in a group of its
    own whose learning rate is ``head_lr_scale`` times the schedule's (key ``lr_scale``), the rest in
    another. V-Net's head follows batch norm, so only its own weights can scale the logits up; at a
    CNN's rate that takes hundreds of steps (docs/benchmarks.md)."""
    spec = check_head_lr(name, head_lr_scale)
    if head_lr_scale == 1.0:
        return [{"params": list(model.parameters()), "lr_scale": 1.0}]
    prefix = spec.head + "."
    named = list(model.named_parameters())
    head = [p for n, p in named if n.startswith(prefix)]
    rest = [p for n, p in named if not n.startswith(prefix)]
    if not head:
        raise BundleError(f"train.head_lr_scale: {spec.display} has no parameters under {spec.head!r}")
    return [{"params": rest, "lr_scale": 1.0}, {"params": head, "lr_scale": head_lr_scale}]


def check_model_args(name: str, args: dict) -> ModelSpec:
    """Names and types of a bundle's model.args, checked without building the network (plan and
    train do this before reading any data)."""
    spec = get_spec(name)
    accepted = spec.accepted_args()
    for key in args:
        if key not in accepted:
            match = difflib.get_close_matches(key, accepted, n=1, cutoff=0.5)
            hint = f"; did you mean {match[0]!r}?" if match else f"; it takes: {', '.join(accepted)}"
            raise BundleError(f"model.args: {spec.name} has no argument {key!r}{hint}")
    _check_arg_types(spec, args)
    return spec


def check_before_data(name: str, args: dict, head_lr_scale: float, roi, window_roi) -> ModelSpec:
    """What `medseg plan` and `medseg train` refuse before reading any data: model arguments, the
    head's rate, and the ROI and window when they are given rather than planned."""
    spec = check_model_args(name, args)
    check_head_lr(name, head_lr_scale)
    if roi != "auto":
        check_window(name, roi, window_roi)
    return spec


def create_model(name: str, *, out_channels: int, roi, in_channels: int = 1, grad_checkpointing: bool = False, **args):
    spec = check_model_args(name, args)
    check_roi(name, roi)
    try:
        return spec.builder(in_channels=in_channels, out_channels=out_channels, roi=tuple(roi), grad_checkpointing=grad_checkpointing, **args)
    # MONAI validates its own arguments by raising these
    except (ValueError, AssertionError, TypeError, KeyError, IndexError, RuntimeError, OverflowError, ZeroDivisionError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BundleError(f"model.args for {spec.name}: {detail}") from None
