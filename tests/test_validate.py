"""Validation: Dice/IoU from a confusion count equal MONAI's metrics; memory follows the window;
a Dataset is iterated without touching the global RNG; callbacks can stop it."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from medseg.config import bundle_from_dict
from medseg.engine.validate import validate


class Oracle(nn.Module):
    """Answers the label map written in its input (the image channel holds the prediction): the
    sliding window then returns exactly that map, so a test chooses the predictions."""

    def __init__(self, n_classes: int) -> None:
        super().__init__()
        self.n = n_classes

    def forward(self, x):
        return F.one_hot(x[:, 0].round().long(), self.n).permute(0, 4, 1, 2, 3).float() * 10


def bundle_for(n_classes: int, roi=(8, 8, 4)):
    return bundle_from_dict({"data": {"labels": [f"c{i}" for i in range(1, n_classes)]}, "train": {"roi": list(roi)},
                             "sliding_window": {"overlap": 0.25, "sw_batch_size": 2}, "tracking": {"backend": "none"}})


def monai_scores(preds, targets, n_classes):
    from monai.metrics import DiceMetric, MeanIoU
    from monai.networks.utils import one_hot

    dice = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True)
    iou = MeanIoU(include_background=False, reduction="mean_batch", ignore_empty=True)
    for p, t in zip(preds, targets):
        yp, yt = one_hot(torch.as_tensor(p)[None, None].long(), n_classes), one_hot(torch.as_tensor(t)[None, None].long(), n_classes)
        dice(y_pred=yp, y=yt)
        iou(y_pred=yp, y=yt)
    return dice, iou


def mean_over_cases(metric) -> np.ndarray:
    """MONAI's per-case values (NaN: class absent from that case's ground truth), averaged over the
    cases where defined; NaN for a class absent everywhere. MONAI's own mean_batch agrees wherever a
    class is present somewhere, but reports 0, not NaN, for a class absent from every case."""
    per_case = metric.get_buffer().numpy()
    counted = np.isfinite(per_case).sum(0)
    mean = np.where(counted > 0, np.nansum(per_case, 0) / np.maximum(counted, 1), np.nan)
    batch = metric.aggregate().numpy()
    np.testing.assert_allclose(mean[counted > 0], batch[counted > 0], rtol=1e-6)
    return mean


@settings(max_examples=25, deadline=None)
@given(n_classes=st.integers(2, 6), n_cases=st.integers(1, 4), seed=st.integers(0, 2**16), shape=st.tuples(*[st.integers(2, 10)] * 3))
def test_dice_and_iou_equal_monai(n_classes, n_cases, seed, shape):
    """Random multi-class cases, with classes missing from some ground truths (they do not count
    for that case) or from all (NaN, left out of the means), against MONAI's DiceMetric / MeanIoU."""
    rng = np.random.default_rng(seed)
    preds, targets = [], []
    for _ in range(n_cases):
        present = rng.choice(n_classes, size=rng.integers(1, n_classes + 1), replace=False)
        targets.append(rng.choice(present, size=shape).astype(np.float32))
        preds.append(rng.integers(0, n_classes, size=shape).astype(np.float32))
    items = [{"image": torch.from_numpy(p)[None], "label": torch.from_numpy(t)[None]} for p, t in zip(preds, targets)]
    result = validate(Oracle(n_classes), items, bundle_for(n_classes), torch.device("cpu"))
    ref_dice, ref_iou = (mean_over_cases(m) for m in monai_scores(preds, targets, n_classes))
    got_dice = np.array(list(result["dice"].values()))
    got_iou = np.array(list(result["iou"].values()))
    np.testing.assert_allclose(got_dice, ref_dice, rtol=1e-6, atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(got_iou, ref_iou, rtol=1e-6, atol=1e-6, equal_nan=True)
    finite = ref_dice[np.isfinite(ref_dice)]
    assert result["mean_dice"] == pytest.approx(finite.mean()) if finite.size else np.isnan(result["mean_dice"])


def test_a_dataset_is_iterated_without_touching_the_rng_and_callbacks_stop_it():
    from monai.data import Dataset

    rng = np.random.default_rng(0)
    cases = [{"image": torch.from_numpy(rng.integers(0, 3, (12, 10, 6)).astype(np.float32))[None],
              "label": torch.from_numpy(rng.integers(0, 3, (12, 10, 6)).astype(np.float32))[None]} for _ in range(3)]
    data = Dataset(cases)
    state = torch.get_rng_state()
    seen = []
    result = validate(Oracle(3), data, bundle_for(3), torch.device("cpu"), on_case=lambda i, n: seen.append((i, n)))
    assert torch.equal(torch.get_rng_state(), state)  # an exact resume depends on it
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert 0 < result["mean_dice"] < 1

    class Stop(Exception):
        pass

    def stop(i, n):
        raise Stop

    with pytest.raises(Stop):
        validate(Oracle(3), data, bundle_for(3), torch.device("cpu"), on_window=stop)


def test_validation_memory_follows_the_window_not_the_volume():
    """A 1x1x1 convolution to 160 classes on a 96 x 96 x 64 volume, ROI 32^3. MONAI's inferer held a
    float32 classes x volume buffer and validation two one-hot copies (about 3 x 360 MB); the
    streaming window holds open tiles (69 MB here) and labels only. Anonymous RSS of a fresh process,
    sampled after every window and case, above its size before validate(), with glibc's mmap
    threshold fixed so that RSS follows live memory (by default glibc keeps freed blocks of varied
    sizes in its heap, which adds a noisy 100-400 MB that says nothing about what validation holds)."""
    code = textwrap.dedent("""
        import json, torch
        from medseg.config import bundle_from_dict
        from medseg.engine.validate import validate
        n = 160
        torch.manual_seed(0)
        model = torch.nn.Conv3d(1, n, 1).eval()
        bundle = bundle_from_dict({"data": {"labels": [f"c{i}" for i in range(1, n)]}, "train": {"roi": [32, 32, 32]},
                                   "sliding_window": {"overlap": 0.25, "sw_batch_size": 1}, "tracking": {"backend": "none"}})
        items = [{"image": torch.rand(1, 96, 96, 64), "label": torch.randint(0, n, (1, 96, 96, 64)).float()}]
        def anon():  # anonymous memory only: file pages come and go with the machine's memory pressure
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        torch.set_num_threads(1)
        validate(model, [{"image": torch.rand(1, 8, 8, 8), "label": torch.zeros(1, 8, 8, 8)}], bundle, torch.device("cpu"))  # imports
        before = anon()
        peak = [before]
        sample = lambda i, k: peak.append(anon())
        validate(model, items, bundle, torch.device("cpu"), on_case=sample, on_window=sample)
        print(json.dumps({"before": before, "peak": max(peak)}))
    """)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    grew = m["peak"] - m["before"]
    one_buffer = 160 * 96 * 96 * 64 * 4
    print(f"validation added {grew / 2**20:.0f} MiB; one float32 classes x volume buffer is {one_buffer / 2**20:.0f} MiB")
    assert grew < 0.6 * one_buffer
