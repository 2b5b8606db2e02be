"""The network as a standalone graph (ONNX, TorchScript) and the parity check every export runs.

What is exported is the network on one sliding window, ``(N, C, *roi) -> (N, K, *roi)`` logits,
with the batch axis free: exactly what medseg's sliding window calls (``pipeline.network_fn``
without TTA or autocast, in float32). Two networks need a word:

* ``fcn2d`` is medseg's :class:`~medseg.models.fcn2d.SliceWise` wrapper, as inference uses it: the
  window's axial slices are folded into the 2D FCN's batch and unfolded after it, so the graph takes
  and returns 3D windows like the others (and the same sliding window drives it).
* ``fcn_triplanar``: :meth:`TriPlanar.forward` runs each axis's slices in chunks of
  ``SLICE_CHUNK`` through a Python loop whose length depends on the batch size; a traced or exported
  graph would freeze it at the example's batch. :class:`WholeAxisTriPlanar` runs every slice of an
  axis as one 2D batch instead. The 2D networks normalise each slice on its own (instance norm), so
  the result is the same; the parity check compares the graph against the chunked original. The
  output is the log of the fused probabilities (a softmax of it returns them), as in medseg.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medseg.errors import MedsegError

# Parity tolerance, per element: |got - ref| <= ATOL + RTOL * |ref| (numpy.allclose's rule), and
# the argmax over classes must agree on at least MIN_AGREEMENT of the voxels (exact ties may flip).
ATOL = 1e-3
RTOL = 1e-3
MIN_AGREEMENT = 0.999
PARITY_BATCH = 2  # windows in the check: a batch of 2 also proves the batch axis is free
MAX_BATCH = 4096  # the dynamic batch axis's upper bound declared to torch.export
# ONNX files hold their weights inline below this (protobuf's 2 GiB limit), in model.onnx.data above it.
INLINE_WEIGHTS_LIMIT = 1_800_000_000


@dataclass
class Parity:
    """How an exported network's logits compare with the run's PyTorch model on the same windows."""

    runtime: str  # what ran the export: "onnxruntime 1.32.0 (CPUExecutionProvider)", ...
    reference: str  # what it was compared with
    windows: int  # the batch of random windows both ran
    max_abs_diff: float  # max |exported - PyTorch| over every logit
    argmax_agreement: float  # fraction of voxels whose argmax class agrees
    atol: float = ATOL
    rtol: float = RTOL

    def as_dict(self) -> dict:
        return asdict(self)


class WholeAxisTriPlanar(nn.Module):
    """A :class:`~medseg.models.triplanar.TriPlanar` whose axes each run as one 2D batch (see the
    module docstring). It shares the model's networks (same parameters, same state-dict keys)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(self.model.fused_probabilities(x, chunk=None).clamp_min(1e-12))


def unwrap_checkpointing(model: nn.Module) -> nn.Module:
    """In place: every :class:`~medseg.models.checkpointing.Checkpointed` wrapper replaced by the
    module it wraps. In eval mode the wrapper only calls it, so the network computes the same, and
    its state-dict keys become those of the plain network (MONAI's own class, for a bundle)."""
    from medseg.models.checkpointing import Checkpointed

    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if isinstance(child, Checkpointed):
                parent._modules[name] = child.module
    return model


def graph_module(model: nn.Module) -> nn.Module:
    """What goes into the graph for ``model`` (the run's network, eval mode)."""
    from medseg.models.triplanar import TriPlanar

    return WholeAxisTriPlanar(model).eval() if isinstance(model, TriPlanar) else model


def example_windows(n: int, channels: int, roi, low: float, high: float, seed: int = 0) -> torch.Tensor:
    """``n`` random windows (n, channels, *roi), uniform over the network's input range [low, high]."""
    g = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand((n, channels, *roi), generator=g)


@torch.no_grad()
def reference_logits(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    return model(x).float().numpy()


def compare(ref: np.ndarray, got: np.ndarray, runtime: str, reference: str, what: str) -> Parity:
    """The parity of ``got`` with ``ref`` (N, K, *spatial); a MedsegError past the tolerance."""
    if got.shape != ref.shape:
        raise MedsegError(f"{what}: the exported network returns shape {list(got.shape)}, PyTorch {list(ref.shape)}")
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    if not np.isfinite(got).all():
        raise MedsegError(f"{what}: the exported network returns NaN or infinite logits")
    agreement = float((got.argmax(1) == ref.argmax(1)).mean())
    parity = Parity(runtime, reference, int(ref.shape[0]), float(diff.max()), agreement)
    bad = diff > ATOL + RTOL * np.abs(ref)
    if bad.any() or agreement < MIN_AGREEMENT:
        raise MedsegError(f"{what}: the exported network disagrees with PyTorch (max |logit difference| {parity.max_abs_diff:.3g}, "
                          f"{int(bad.sum())} logits beyond {ATOL:g} + {RTOL:g}|x|, argmax agreement {agreement:.4%}); nothing was written")
    return parity


@contextlib.contextmanager
def quiet_export():
    """torch's exporters announce their steps, deprecations and absent optional packages
    (torchvision's operators); none of it is the user's business when the export works."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def parameter_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) + sum(b.numel() * b.element_size() for b in model.buffers())


def write_onnx(module: nn.Module, example: torch.Tensor, path: Path, opset: int | None = None) -> list[str]:
    """``module`` on one window to ONNX with a free batch axis (input ``image``, output ``logits``),
    by torch's dynamo exporter. Returns the files written (model.onnx, and model.onnx.data for
    weights past protobuf's limit)."""
    external = parameter_bytes(module) > INLINE_WEIGHTS_LIMIT
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    try:
        with quiet_export(), torch.no_grad():
            torch.onnx.export(module, (example[:1],), str(path), input_names=["image"], output_names=["logits"],
                              dynamic_shapes=({0: batch},), dynamo=True, external_data=external, optimize=True,
                              opset_version=opset, verbose=False)
    except Exception as e:  # an operator the exporter cannot translate, a graph break: say which, in one line
        raise MedsegError(f"torch.onnx.export failed for this network ({_first_line(e)})") from None
    return [p.name for p in sorted(path.parent.glob(path.name + "*"))]


def onnx_opset(path: Path) -> int:
    import onnx

    return next(o.version for o in onnx.load(str(path), load_external_data=False).opset_import if o.domain in ("", "ai.onnx"))


def onnx_session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def check_onnx(path: Path, model: nn.Module, x: torch.Tensor) -> Parity:
    import onnxruntime as ort

    session = onnx_session(path)
    got = session.run(["logits"], {"image": x.numpy()})[0]
    return compare(reference_logits(model, x), got, f"onnxruntime {ort.__version__} (CPUExecutionProvider)",
                   f"PyTorch {torch.__version__} eager, CPU, float32", "onnx")


def write_torchscript(module: nn.Module, example: torch.Tensor, path: Path) -> list[str]:
    """``module`` traced on one window (torch.jit.trace) and saved. Tracing records the shape
    arithmetic, so other batch sizes run too (the parity check runs a batch of 2)."""
    try:
        with quiet_export(), torch.no_grad():
            traced = torch.jit.trace(module, example[:1], check_trace=False)
            torch.jit.save(traced, str(path))
    except Exception as e:
        raise MedsegError(f"torch.jit.trace failed for this network ({_first_line(e)})") from None
    return [path.name]


def check_torchscript(path: Path, model: nn.Module, x: torch.Tensor) -> Parity:
    with quiet_export(), torch.no_grad():
        loaded = torch.jit.load(str(path), map_location="cpu")
        got = loaded(x).float().numpy()
    return compare(reference_logits(model, x), got, f"TorchScript (torch.jit.load, PyTorch {torch.__version__})",
                   f"PyTorch {torch.__version__} eager, CPU, float32", "torchscript")


def window_voxels(roi) -> int:
    return math.prod(int(r) for r in roi)
