"""Peak memory of a training step and of inference, traced from the real model with nothing computed.

How: the registered model is built, its parameters are replaced by fake tensors (torch's
FakeTensorMode: shapes and dtypes, no storage), and the real work runs on them. For training that
is the loss of the bundle (DiceCE by default), the backward and the optimizer step (AdamW, in its
foreach form as on CUDA), twice, so the optimizer state exists as it does from the second step on.
``LiveTensorBytes`` records every storage an operator creates and, through a weak reference, when
it is freed; the peak of the live bytes is the step's working memory, whatever the architecture.

AMP: the forward and the loss run under CUDA's autocast policy (``medseg.cost.autocast``): matrix
products and convolutions in bf16, norms, softmax and reductions in float32, float32 master weights
and the bf16 weight copies autocast keeps. ``tests/test_cost.py`` checks the casts op by op against
the real CUDA autocast kernels.

Where the memory lives, on a CUDA device:
  device: parameters and buffers, optimizer state, gradients, activations, the training batch,
          one batch of windows and its forward;
  host:   the preprocessed input volume, the sliding window's buffers (medseg runs MONAI's inferer
          with device="cpu" and streams on the CPU), the label map, the window logits copied back.
On a CPU run both are the same RAM and add up, except the copies that only exist when a GPU is
used (``cuda_only``); :attr:`MemoryEstimate.cpu_total` is that sum.

Not modelled: allocator caching and fragmentation (the device total estimates CUDA's
``max_memory_allocated``; ``max_memory_reserved`` is higher), cuDNN/oneDNN workspaces, the CUDA
context (about 0.5 GB), the data loader, and Python + torch + MONAI themselves (about 0.5 GB of RAM).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    """Tracks the bytes of storages created by operators while active: ``live`` now, ``peak`` max."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._alive: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.live -= self._alive.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # An output that shares an input's storage (a view, an in-place result) is not new memory,
        # even when that storage existed before tracking began (a view of a parameter or of the input).
        inputs = {_storage_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                key = _storage_key(t)
                if key is not None and key not in self._alive and key not in inputs:
                    storage = t.untyped_storage()
                    self._alive[key] = storage.nbytes()
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.live)
        return out


def _storage_key(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):  # sparse and other storage-less tensors
        return None


@dataclass
class MemoryEstimate:
    model: str
    roi: tuple[int, ...]
    batch: int
    amp: bool
    checkpointing: bool
    params: int
    device: dict[str, int] = field(default_factory=dict)  # name -> bytes, on the GPU
    host: dict[str, int] = field(default_factory=dict)  # name -> bytes, in RAM
    cuda_only: set[str] = field(default_factory=set)  # host parts that are copies from a GPU

    @property
    def device_total(self) -> int:
        return sum(self.device.values())

    @property
    def host_total(self) -> int:
        return sum(self.host.values())

    @property
    def cpu_total(self) -> int:
        """Everything in RAM when the same run happens on the CPU."""
        return self.device_total + sum(b for name, b in self.host.items() if name not in self.cuda_only)

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "roi": list(self.roi), "batch": self.batch, "amp": self.amp,
                "checkpointing": self.checkpointing, "params": self.params,
                "device_bytes": self.device, "host_bytes": self.host, "cuda_only_host_parts": sorted(self.cuda_only),
                "device_total_bytes": self.device_total, "host_total_bytes": self.host_total, "cpu_run_total_bytes": self.cpu_total}


@dataclass(frozen=True)
class StepTrace:
    first_step: int  # peak bytes created during the first step (optimizer state appears in it)
    steady: int  # peak bytes over two steps: what every later step needs, optimizer state included
    optimizer_state: int


def fake_model(name: str, roi, classes: int, args: dict | None = None, checkpointing: bool = False):
    """(the registered model with fake float32 parameters, the FakeTensorMode that owns them)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from medseg.cost.counted import build_on_meta

    model = build_on_meta(name, roi, classes, args, grad_checkpointing=checkpointing)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        model._apply(lambda t: torch.empty_like(t, device="cpu"))
    return model, mode


def tensor_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def _autocast(amp: bool):
    """(policy context, region factory): CUDA's autocast for CPU tensors, or nothing."""
    if amp:
        from medseg.cost.autocast import cuda_autocast_policy

        return cuda_autocast_policy(torch.bfloat16)
    return contextlib.nullcontext(contextlib.nullcontext)


@contextlib.contextmanager
def _fake_safe_one_hot():
    """MONAI's one_hot allocates its output with ``torch.zeros(..., device=labels.device)``, which
    outside FakeTensorMode is a real tensor: tracing a big ROI then used gigabytes of real memory.
    The same zeros + scatter, made from the labels tensor, stays fake (and costs the same bytes)."""
    import monai.losses.dice as dice

    original = dice.one_hot

    def one_hot(labels, num_classes, dtype=torch.float, dim=1):
        shape = list(labels.shape)
        shape[dim] = num_classes
        return labels.new_zeros(shape, dtype=dtype).scatter_(dim, labels.long(), 1)

    dice.one_hot = one_hot
    try:
        yield
    finally:
        dice.one_hot = original


def trace_training(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, optimizer, amp: bool = False) -> StepTrace:
    """Two real training steps (as ``medseg.engine.train.train_epoch`` runs them) under the tracker.
    Works on real tensors as well as fake ones: the benchmark and the tests use both."""
    peaks = []
    with _autocast(amp) as region, LiveTensorBytes() as tracker:
        for _ in range(2):
            optimizer.zero_grad(set_to_none=True)
            with region():  # a model that trains on part of the patch scores it itself (fcn_triplanar: slices per axis)
                loss = model.training_loss(x, y, loss_fn) if hasattr(model, "training_loss") else loss_fn(model(x), y)
            loss.backward()
            del loss
            optimizer.step()
            peaks.append(tracker.peak)
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor))
    return StepTrace(peaks[0], peaks[1], state)


def trace_forward(model: torch.nn.Module, x: torch.Tensor, amp: bool = False) -> int:
    """Peak bytes created by one inference forward, as medseg's ``Inferer`` runs it (float32 logits)."""
    with _autocast(amp) as region, torch.no_grad(), LiveTensorBytes() as tracker:
        with region():
            y = model(x).float()
        del y
    return tracker.peak


def loss_and_optimizer(model: torch.nn.Module, train_cfg=None):
    """The bundle's loss and optimizer (defaults: DiceCE, AdamW), the optimizer in its foreach form,
    which is what torch picks on CUDA (on the CPU it loops over parameters, with smaller temporaries)."""
    from medseg.config import TrainConfig
    from medseg.engine.components import make_loss, make_optimizer

    cfg = train_cfg or TrainConfig()
    optimizer = make_optimizer(cfg, model.parameters())
    for group in optimizer.param_groups:
        group["foreach"] = True
    return make_loss(cfg.loss), optimizer


def training_memory(name: str, roi, batch: int = 2, classes: int = 14, args: dict | None = None, amp: bool = False,
                    checkpointing: bool = False, train_cfg=None) -> MemoryEstimate:
    model, mode = fake_model(name, roi, classes, args, checkpointing)
    model.train()
    with mode:
        x = torch.empty((batch, 1, *roi))
        y = torch.zeros((batch, 1, *roi))
    loss_fn, optimizer = loss_and_optimizer(model, train_cfg)
    with _fake_safe_one_hot():
        trace = trace_training(model, x, y, loss_fn, optimizer, amp)
    batch_bytes = 2 * x.numel() * 4
    opt_name = type(optimizer).__name__
    device = {"parameters and buffers (float32)": tensor_bytes(model),
              f"optimizer state ({opt_name})": trace.optimizer_state,
              "gradients, activations, temporaries (traced)": trace.steady - trace.optimizer_state,
              "batch: image + label (float32)": batch_bytes}
    host = {"batch as loaded, before .to(device)": batch_bytes}
    params = sum(p.numel() for p in model.parameters())
    return MemoryEstimate(name, tuple(roi), batch, amp, checkpointing, params, device, host, cuda_only=set(host))


def inference_memory(name: str, roi, sw_batch_size: int = 4, classes: int = 14, args: dict | None = None, amp: bool = False,
                     volume=None, overlap: float = 0.25, method: str = "auto", resample: str = "auto") -> MemoryEstimate:
    from medseg.engine.window import choose_method

    model, mode = fake_model(name, roi, classes, args)
    model.eval()
    with mode:
        x = torch.empty((sw_batch_size, 1, *roi))
    device = {"parameters and buffers (float32)": tensor_bytes(model),
              "window batch (float32)": x.numel() * 4,
              "forward of one window batch (traced)": trace_forward(model, x, amp)}
    host: dict[str, int] = {}
    if volume is not None:
        check_overlap(overlap)
        chosen = choose_method(classes, volume, method)
        logits = sw_batch_size * classes * math.prod(roi) * 4
        # The previous batch's logits are still referenced while the next batch runs: MONAI keeps
        # them on the window device, the stream holds their float32 copy on the host.
        (device if chosen == "monai" else host)["previous window batch's logits (float32)"] = logits
        host |= sliding_window_buffers(classes, volume, roi, overlap, chosen, resample)
    params = sum(p.numel() for p in model.parameters())
    return MemoryEstimate(name, tuple(roi), sw_batch_size, amp, False, params, device, host)


def sliding_window_buffers(classes: int, volume, roi, overlap: float, method: str = "auto", resample: str = "auto") -> dict[str, int]:
    """Host memory of whole-volume inference besides the network: the preprocessed input, the
    window's accumulators and the label map. MONAI: float32 classes x volume output, its count map
    (freed before the argmax) then the int64 argmax. Streaming: the frontier of open tiles, (classes
    + 1) float32 channels, simulated without allocating (``frontier_voxels``), and one weighted window.
    Linear resampling back to the scan's grid (``medseg infer --resample``, ``auto`` while it fits
    the pipeline's limit) also keeps float16 class probabilities of the whole volume; the scan-grid
    output and the 32 MB resampling slabs depend on the scan's own grid and are not included."""
    from medseg.engine.pipeline import choose_resample
    from medseg.engine.window import choose_method, frontier_voxels, label_dtype

    padded = tuple(max(v, r) for v, r in zip(volume, roi))
    voxels, padded_voxels = math.prod(volume), math.prod(padded)
    label_bytes = voxels * torch.empty((), dtype=label_dtype(classes)).element_size()
    parts = {"input volume (float32)": voxels * 4}
    if choose_method(classes, volume, method) == "monai":
        parts["MONAI output (float32, classes x volume)"] = classes * padded_voxels * 4
        parts["MONAI count map, then the int64 argmax"] = padded_voxels * 8
    else:
        parts["streaming frontier (float32, classes + 1)"] = (classes + 1) * frontier_voxels(volume, roi, overlap) * 4
        parts["one weighted window (float32)"] = classes * math.prod(roi) * 4
    parts["label map"] = label_bytes
    if choose_resample(resample, classes, volume, save_probabilities=False)[0] == "linear":
        parts["class probabilities for linear resampling (float16)"] = classes * voxels * 2
    return parts


def check_overlap(overlap: float) -> None:
    """Sliding-window overlap: 0 <= overlap < 1, as ``medseg infer`` requires (1 would never advance)."""
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")


def plan_for_budget(name: str, budget_bytes: int, multiple: int, batches=(1, 2, 4), classes: int = 14, args: dict | None = None,
                    amp: bool = False, checkpointing: bool = False, max_side: int = 512, train_cfg=None) -> list[dict[str, Any]]:
    """nnU-Net-style: for each batch size, the largest isotropic ROI (a multiple of ``multiple``)
    whose training step fits ``budget_bytes`` of GPU memory (the device total). Memory grows
    monotonically with the ROI and the batch, so the search is a bisection over multiples, below
    the ROI found for the previous (smaller) batch."""
    from medseg.models import get_spec

    lowest = max(multiple, max(get_spec(name).min_roi))
    plans, hi = [], max_side // multiple
    for batch in sorted(batches):
        def fits(side: int, batch: int = batch) -> MemoryEstimate | None:
            est = training_memory(name, (side,) * 3, batch, classes, args, amp, checkpointing, train_cfg)
            return est if est.device_total <= budget_bytes else None

        lo, best = -(-lowest // multiple), None
        while lo <= hi:
            mid = (lo + hi) // 2
            est = fits(mid * multiple)
            if est is not None:
                best, lo = est, mid + 1
            else:
                hi = mid - 1
        plans.append({"batch": batch, "roi": list(best.roi) if best else None, "device_bytes": best.device_total if best else None})
        hi = best.roi[0] // multiple if best else 0  # a larger batch fits no larger ROI
    return plans


UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


MAX_BYTES = 10**15


def parse_bytes(text: str) -> int:
    """'24GB' -> 24e9, '24GiB' -> 24 * 2^30, '512MB'. A bare number is refused: '24' would be 24
    bytes, which nobody means."""
    s = text.strip().upper().replace(" ", "")
    number = s.rstrip("KMGTIB")
    unit = s[len(number):]
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a size (e.g. 24GB, 80GiB)") from None
    if not unit:
        raise ValueError(f"{text!r} has no unit: give one, e.g. 24GB or 80GiB")
    if unit not in UNITS:
        raise ValueError(f"cannot read {text!r} as a size: unknown unit {unit!r} (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    if not value > 0 or math.isinf(value):
        raise ValueError(f"size {text!r} must be positive")
    size = value * UNITS[unit]
    if size > MAX_BYTES:
        raise ValueError(f"size {text!r} is beyond any machine (at most 1 PB)")
    return int(size)
