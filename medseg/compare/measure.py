"""Measurements taken while a model segments: peak memory (CUDA's allocator, or process RSS sampled
by a thread on the CPU), and the metrics on the model grid (the training spacing)."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import torch


class PeakMemory:
    """Peak memory of what runs inside ``with``, above what was in use when it began: on CUDA
    ``torch.cuda.max_memory_allocated`` (reset on entry); on the CPU the process's resident set
    sampled every ``interval`` seconds by a thread (psutil), so a peak shorter than that can be missed."""

    def __init__(self, device: torch.device, interval: float = 0.005) -> None:
        self.device, self.interval = device, interval
        self.peak_bytes = 0
        self.how = ("torch.cuda.max_memory_allocated above the memory allocated before" if device.type == "cuda"
                    else f"process RSS (psutil, sampled every {interval * 1000:g} ms) above the RSS before")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        import psutil

        self._proc = psutil.Process()
        self._base = self._proc.memory_info().rss
        self._peak = self._base
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.is_set():
            self._peak = max(self._peak, self._proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        self._done.set()
        self._thread.join()
        self._peak = max(self._peak, self._proc.memory_info().rss)
        self.peak_bytes = self._peak - self._base


def model_grid_label(bundle, lut: np.ndarray, image: str, label: str) -> tuple[np.ndarray, tuple[float, ...]]:
    """The ground truth as validation sees it: mapped to the output classes and resampled (nearest)
    onto the model grid by the run's own preprocessing. Returns (labels, spacing in mm)."""
    from monai.transforms import Compose

    from medseg.data.transforms import preprocess

    item = Compose(preprocess(bundle, lut))({"image": image, "label": label})
    return np.asarray(item["label"][0]).astype(np.int64), tuple(float(s) for s in bundle.data.spacing)


def score_model_grid(pred: np.ndarray, gt: np.ndarray, spacing, labels: list[str], case: str,
                     scored: list[str] | None = None) -> list[dict[str, Any]]:
    """``medseg evaluate``'s per-class metrics on two model-grid label maps coded 1..N = ``labels``,
    for the classes in ``scored`` (default all; background is what is in none of them, as evaluate does)."""
    from medseg.engine.evaluate import ClassSpec, score_case
    from medseg.errors import MedsegError

    if pred.shape != gt.shape:
        raise MedsegError(f"case {case}: model-grid prediction {pred.shape} and ground truth {gt.shape} differ")
    classes = [ClassSpec(name, (i,), (i,)) for i, name in enumerate(labels, start=1) if scored is None or name in scored]
    return [{"case": case, **row} for row in score_case(pred, gt, spacing, classes)]
