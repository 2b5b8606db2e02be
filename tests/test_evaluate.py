"""medseg evaluate: numbers checked against hand computation, geometry checks, folders, outputs."""

import json
import math

import nibabel as nib
import numpy as np
import pytest

from medseg.engine.evaluate import evaluate
from medseg.errors import MedsegError

AFFINE = np.diag([2.0, 1.0, 1.0, 1.0])


def cubes(shift: int):
    """Ground truth: a 10^3 cube of class 1. Prediction: the same cube shifted ``shift`` voxels
    along x, plus class 2 in the prediction only."""
    gt = np.zeros((30, 20, 20), np.uint8)
    gt[5:15, 5:15, 5:15] = 1
    pred = np.zeros_like(gt)
    pred[5 + shift : 15 + shift, 5:15, 5:15] = 1
    pred[25:28, 0:3, 0:3] = 2
    return pred, gt


def save(tmp_path, name, data, affine=AFFINE):
    path = tmp_path / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def test_metrics_match_hand_computation(tmp_path):
    pred, gt = cubes(shift=2)
    p, g = save(tmp_path, "case_seg", pred), save(tmp_path, "case", gt)
    (tmp_path / "case_seg.json").write_text(json.dumps({"labels": {"0": "background", "1": "liver", "2": "spleen"}}))
    report = evaluate(p, g)
    liver = report.mean["liver"]
    # overlap 8x10x10 = 800 of 1000 voxels each
    assert liver["dice"] == pytest.approx(2 * 800 / 2000)
    assert liver["iou"] == pytest.approx(800 / 1200)
    assert liver["precision"] == pytest.approx(0.8) and liver["recall"] == pytest.approx(0.8)
    total = gt.size
    assert liver["accuracy"] == pytest.approx((total - 400) / total)
    # the shifted faces are 2 voxels x 2 mm = 4 mm apart; the side faces coincide
    assert 0 < liver["hd95_mm"] <= 4.0 + 1e-6
    spleen = report.mean["spleen"]  # predicted but absent from the ground truth
    assert spleen["dice"] == 0.0 and math.isnan(spleen["hd95_mm"])
    assert report.summary["mean_dice"] == pytest.approx((0.8 + 0.0) / 2)
    assert report.summary["mean_dice_with_background"] > report.summary["mean_dice"]


def test_perfect_prediction_and_absent_classes(tmp_path):
    _, gt = cubes(0)
    report = evaluate(save(tmp_path, "p", gt), save(tmp_path, "g", gt))
    assert report.mean["class_1"]["dice"] == 1.0 and report.mean["class_1"]["hd95_mm"] == 0.0


def test_geometry_and_content_are_checked(tmp_path):
    pred, gt = cubes(0)
    g = save(tmp_path, "g", gt)
    with pytest.raises(MedsegError, match="shape"):
        evaluate(save(tmp_path, "p1", pred[:, :, :10]), g)
    with pytest.raises(MedsegError, match="different affines"):
        evaluate(save(tmp_path, "p2", pred, np.diag([1.0, 1.0, 1.0, 1.0])), g)
    with pytest.raises(MedsegError, match="not a label map"):
        evaluate(save(tmp_path, "p3", pred.astype(np.float32) + 0.5), g)


def test_folders_cli_and_outputs(tmp_path, cli):
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    for i, shift in enumerate((0, 2)):
        pred, gt = cubes(shift)
        save(tmp_path / "pred", f"c{i}_seg", pred)
        save(tmp_path / "gt", f"c{i}", gt)
    result = cli("evaluate", tmp_path / "pred", tmp_path / "gt")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "pred" / "evaluation.json").read_text())
    assert data["cases"] == ["c0", "c1"]
    assert data["mean"]["class_1"]["dice"] == pytest.approx((1.0 + 0.8) / 2)
    assert data["mean"]["class_2"]["hd95_mm"] is None  # NaN written as null
    rows = (tmp_path / "pred" / "evaluation.csv").read_text().splitlines()
    assert rows[0].startswith("case,class,value,dice") and any(r.startswith("mean,class_1") for r in rows)
    missing = cli("evaluate", tmp_path / "pred", tmp_path / "nowhere")
    assert missing.exit_code == 2 and "no such file" in missing.output
