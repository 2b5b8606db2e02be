"""Fold ensembles: ``medseg infer --run A --run B ...`` (or a folder of runs) averages the runs'
class probabilities; its labels are their argmax, so where every run agrees the ensemble agrees."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from medseg import RUN_FORMAT_VERSION


class Level(nn.Module):
    """Class 1 where the windowed intensity exceeds ``level``, with a soft edge of width 1/``scale``:
    runs with different levels disagree on a known band of a ramp."""

    def __init__(self, in_channels: int = 1, out_channels: int = 2, level: float = 0.7, scale: float = 10.0) -> None:
        super().__init__()
        self.level = nn.Parameter(torch.tensor(level))
        self.scale = nn.Parameter(torch.tensor(scale))

    def forward(self, x):
        fg = self.scale * (x - self.level)
        return torch.cat([-fg, fg], dim=1)


@pytest.fixture
def level_model():
    from medseg.models import registry

    registry.register_model("level_test", display="Level", network=Level, roi_multiple=(1, 1, 1),
                            description="test only")(lambda in_channels, out_channels, roi, grad_checkpointing=False: Level())
    yield
    registry._REGISTRY.pop("level_test", None)


def make_run(root: Path, name: str, level: float, scale: float, spacing=(2.0, 2.0, 2.5)) -> Path:
    run = root / name
    run.mkdir(parents=True)
    bundle = {"model": {"name": "level_test", "args": {}}, "data": {"labels": ["bright"], "spacing": list(spacing)},
              "train": {"roi": [32, 32, 16]}, "sliding_window": {"overlap": 0.25, "sw_batch_size": 4}, "postprocess": {}}
    (run / "bundle.json").write_text(json.dumps(bundle))
    (run / "labels.json").write_text(json.dumps({"0": "background", "1": "bright"}))
    (run / "run.json").write_text(json.dumps({"format_version": RUN_FORMAT_VERSION, "status": "complete", "name": name,
                                              "finished": "2026-12-06T12:00:00"}))
    torch.save(Level(level=level, scale=scale).state_dict(), run / "model_best.pt")
    return run


def ramp_scan(path: Path) -> Path:
    """A body whose intensity rises along x from -100 to 250 HU (windowed 0.18 .. 1.0), in air."""
    shape = (48, 40, 24)
    hu = np.full(shape, -1000.0, np.float32)
    hu[4:44, 4:36, 2:22] = np.linspace(-100, 250, 40)[:, None, None]
    affine = np.diag([1.8, 1.9, 3.1, 1.0])
    nib.save(nib.Nifti1Image(hu.astype(np.int16), affine), path)
    return path


def read(path: Path):
    img = nib.load(path)
    return np.asarray(img.dataobj.get_unscaled() if img.ndim == 4 else img.dataobj)


def test_ensemble_is_the_mean_of_the_runs_probabilities(level_model, tmp_path, cli):
    folds = tmp_path / "folds"
    runs = [make_run(folds, f"fold{k}", level, scale) for k, (level, scale) in enumerate([(0.55, 8.0), (0.7, 20.0), (0.85, 5.0)])]
    scan = ramp_scan(tmp_path / "ramp.nii.gz")
    singles = []
    for k, run in enumerate(runs):
        out = tmp_path / f"single{k}_seg.nii.gz"
        result = cli("infer", scan, "--run", run, "-o", out, "--save-probabilities")
        assert result.exit_code == 0, result.output
        singles.append((read(out), read(tmp_path / f"single{k}_probabilities.nii.gz").astype(np.float64)))
    result = cli("infer", scan, "--run", runs[0], "--run", runs[1], "--run", runs[2], "-o", tmp_path / "ens_seg.nii.gz",
                 "--save-probabilities")
    assert result.exit_code == 0, result.output
    assert "ensemble of 3 runs" in result.output
    labels, probs = read(tmp_path / "ens_seg.nii.gz"), read(tmp_path / "ens_probabilities.nii.gz").astype(np.float64)

    # probabilities: the mean of the runs' (each saved rounded to 1/255, so within one step)
    mean = np.mean([p for _, p in singles], axis=0)
    assert np.abs(probs - mean).max() <= 1.0
    assert np.abs(probs - singles[1][1]).max() > 20  # the runs differ: the check is not vacuous

    # labels: the argmax of the mean; where the runs agree, that answer
    stack = np.stack([lab for lab, _ in singles])
    agree = (stack == stack[0]).all(0)
    assert np.array_equal(labels[agree], stack[0][agree])
    assert (~agree).sum() > 500  # a band of the ramp where the levels disagree
    majority = (stack.sum(0) >= 2).astype(np.uint8)
    # on the band, the mean and the majority agree but for voxels on the edge of the middle run's level
    assert (labels[~agree] == majority[~agree]).mean() > 0.9

    sidecar = json.loads((tmp_path / "ens_seg.json").read_text())
    assert [Path(p).name for p in sidecar["ensemble"]] == ["fold0", "fold1", "fold2"]

    # a folder of runs is the same ensemble; a run in it that is not complete is left out, with a note
    killed = make_run(folds, "fold3", 0.1, 5.0)
    (killed / "run.json").write_text(json.dumps({**json.loads((killed / "run.json").read_text()), "status": "failed"}))
    result = cli("infer", scan, "--run", folds, "-o", tmp_path / "dir_seg.nii.gz")
    assert result.exit_code == 0, result.output
    assert np.array_equal(read(tmp_path / "dir_seg.nii.gz"), labels)
    assert "left out of the ensemble, not complete: fold3 (failed)" in " ".join(result.output.split())


def test_runs_that_cannot_be_averaged_are_refused(level_model, tmp_path, cli):
    a = make_run(tmp_path / "runs", "a", 0.6, 10.0)
    b = make_run(tmp_path / "runs", "b", 0.6, 10.0, spacing=(3.0, 3.0, 3.0))
    scan = ramp_scan(tmp_path / "ramp.nii.gz")
    result = cli("infer", scan, "--run", a, "--run", b)
    assert result.exit_code == 2
    assert "cannot ensemble a and b: their data.spacing differ" in " ".join(result.output.split())
    result = cli("infer", scan, "--run", a, "--run", a)
    assert result.exit_code == 2 and "named twice" in result.output
    for run, fold in ((a, 1), (b, 1)):  # two runs that are the same fold of the same split
        bundle = json.loads((run / "bundle.json").read_text())
        bundle["data"].update(fold=fold, folds=3, spacing=[2.0, 2.0, 2.5])
        (run / "bundle.json").write_text(json.dumps(bundle))
    result = cli("infer", scan, "--run", a, "--run", b)
    assert result.exit_code == 2 and "fold 1 of the same split is named twice" in " ".join(result.output.split())
    assert not (tmp_path / "ramp_seg.nii.gz").exists()
