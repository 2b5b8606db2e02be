"""medseg evaluate: numbers checked against hand computation, classes matched by name, refusals
(only one side named, not a label map, unwritable output, bad names files), folders, outputs."""

import errno
import json
import math
import tempfile

import nibabel as nib
import numpy as np
import pytest

import medseg.engine.evaluate as ev
from medseg.engine.evaluate import evaluate, load_label_map
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


def save(folder, name, data, affine=AFFINE):
    path = folder / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def names_file(folder, name, labels: dict, wrap=True):
    path = folder / name
    path.write_text(json.dumps({"labels": labels} if wrap else labels))
    return path


def no_scoring(monkeypatch):
    """Make any scoring fail loudly: a refusal must come before the work."""
    def fail(*args, **kwargs):
        raise AssertionError("scored before refusing")

    monkeypatch.setattr(ev, "score_case", fail)


def test_metrics_match_hand_computation(tmp_path):
    pred, gt = cubes(shift=2)
    p, g = save(tmp_path, "case_seg", pred), save(tmp_path, "case", gt)
    names_file(tmp_path, "case_seg.json", {"0": "background", "1": "liver", "2": "spleen"})
    gt_names = names_file(tmp_path, "gt.json", {"1": "liver", "2": "spleen"}, wrap=False)
    report = evaluate(p, g, gt_labels=gt_names)
    liver = report.mean["liver"]
    # overlap 8x10x10 = 800 of 1000 voxels each
    assert liver["dice"] == pytest.approx(2 * 800 / 2000)
    assert liver["iou"] == pytest.approx(800 / 1200)
    assert liver["precision"] == pytest.approx(0.8) and liver["recall"] == pytest.approx(0.8)
    total = gt.size
    assert liver["accuracy"] == pytest.approx((total - 400) / total)  # true negatives outside the scored box count
    # the shifted faces are 2 voxels x 2 mm = 4 mm apart; the side faces coincide
    assert 0 < liver["hd95_mm"] <= 4.0 + 1e-6
    spleen = report.mean["spleen"]  # predicted but absent from the ground truth
    assert spleen["dice"] == 0.0 and spleen["nsd"] == 0.0 and math.isnan(spleen["hd95_mm"])
    assert report.summary["mean_dice"] == pytest.approx((0.8 + 0.0) / 2)
    assert report.summary["mean_dice_with_background"] > report.summary["mean_dice"]


def nsd_cubes():
    """A 10^3 cube and the same cube 2 voxels further along x, at spacing 1 x 3 x 3 mm.

    Boundary voxels (a 6-neighbour outside) of each cube: 488. From the prediction's to the ground
    truth's boundary: the 64 inner voxels of the near x face are 2 mm from the ground truth's x face
    (its side faces are >= 3 mm away, a y/z step being 3 mm); the whole far x face (100) is 2 mm
    from the ground truth's far face; the ring at the first overhanging slice (36) is 1 mm away;
    the rings of the 7 shared slices (252) lie on the ground truth's boundary (0 mm). The reverse
    direction is the mirror image. So 164 of 488 distances are 2 mm, 36 are 1 mm, 288 are 0."""
    gt = np.zeros((30, 16, 16), np.uint8)
    gt[5:15, 3:13, 3:13] = 1
    pred = np.zeros_like(gt)
    pred[7:17, 3:13, 3:13] = 1
    return pred, gt, np.diag([1.0, 3.0, 3.0, 1.0])


@pytest.mark.parametrize("tolerance, expected", [(2.0, 1.0), (1.5, 324 / 488), (0.5, 288 / 488)])
def test_nsd_matches_hand_computation_with_spacing(tmp_path, tolerance, expected):
    pred, gt, affine = nsd_cubes()
    report = evaluate(save(tmp_path, "p", pred, affine), save(tmp_path, "g", gt, affine), nsd_tolerance=tolerance)
    assert report.mean["class_1"]["nsd"] == pytest.approx(expected)
    assert report.nsd_tolerance_mm == tolerance


def test_nsd_tolerance_option_reaches_the_report(tmp_path, cli):
    pred, gt, affine = nsd_cubes()
    p, g = save(tmp_path, "p", pred, affine), save(tmp_path, "g", gt, affine)
    result = cli("evaluate", p, g, "--nsd-tolerance", "1.5", "-o", tmp_path / "r")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["nsd_tolerance_mm"] == 1.5 and data["mean"]["class_1"]["nsd"] == pytest.approx(324 / 488)
    assert "nsd" in (tmp_path / "r.csv").read_text().splitlines()[0].split(",")


def test_classes_matched_by_name_not_value(tmp_path):
    """Prediction coded liver=1, spleen=2; ground truth coded spleen=1, liver=5 (TotalSegmentator):
    a perfect prediction scores 1.0 (matching by value scored liver against spleen)."""
    gt = np.zeros((20, 20, 20), np.uint8)
    gt[2:8, 2:8, 2:8] = 5
    gt[12:18, 12:18, 12:18] = 1
    gt[2:5, 15:18, 15:18] = 7  # pancreas: in the ground truth only
    pred = np.zeros_like(gt)
    pred[gt == 5], pred[gt == 1] = 1, 2
    p, g = save(tmp_path, "x_seg", pred), save(tmp_path, "x", gt)
    names_file(tmp_path, "x_seg.json", {"0": "background", "1": "liver", "2": "spleen", "3": "tumour"})
    gt_names = names_file(tmp_path, "ts.json", {"1": "spleen", "5": "liver", "6": "stomach", "7": "pancreas"}, wrap=False)
    report = evaluate(p, g, gt_labels=gt_names)
    assert report.mean["liver"]["dice"] == 1.0 and report.mean["spleen"]["dice"] == 1.0
    assert report.mean["liver"]["nsd"] == 1.0
    assert report.mean["background"]["dice"] == 1.0  # pancreas is not scored, so not counted against the prediction
    assert set(report.mean) == {"background", "liver", "spleen"}
    row = next(r for r in report.rows if r["class"] == "liver")
    assert (row["pred_value"], row["gt_value"]) == (1, 5)
    notes = " | ".join(report.notes)
    assert "tumour" in notes and "2 ground-truth class(es)" in notes  # stomach, pancreas
    # name -> value files (nnU-Net v2 style) work as well
    flipped = names_file(tmp_path, "flip.json", {"spleen": 1, "liver": 5}, wrap=False)
    again = evaluate(p, g, gt_labels=flipped)
    assert again.mean["liver"]["dice"] == 1.0 and again.mean["background"]["dice"] == 1.0
    assert any("value(s) 7 have no name" in n for n in again.notes)  # not a named class for sure: background


def test_names_on_one_side_only_are_refused(tmp_path, monkeypatch):
    no_scoring(monkeypatch)
    pred, gt = cubes(0)
    p, g = save(tmp_path, "c_seg", pred), save(tmp_path, "c", gt)
    names_file(tmp_path, "c_seg.json", {"1": "liver", "2": "spleen"})
    with pytest.raises(MedsegError, match="pass --gt-labels"):
        evaluate(p, g)
    bare = save(tmp_path, "bare", pred)  # no sidecar
    gt_names = names_file(tmp_path, "gt.json", {"1": "liver"}, wrap=False)
    with pytest.raises(MedsegError, match="pass --pred-labels"):
        evaluate(bare, g, gt_labels=gt_names)
    with pytest.raises(MedsegError, match="no class names in common"):
        evaluate(p, g, gt_labels=names_file(tmp_path, "other.json", {"1": "heart"}, wrap=False))


def test_a_predicted_value_without_a_name_is_an_error(tmp_path):
    pred, gt = cubes(0)  # prediction holds 1 and 2
    p, g = save(tmp_path, "c_seg", pred), save(tmp_path, "c", gt)
    names_file(tmp_path, "c_seg.json", {"1": "liver"})
    gt_names = names_file(tmp_path, "gt.json", {"1": "liver"}, wrap=False)
    with pytest.raises(MedsegError, match=r"c_seg\.nii\.gz: prediction value\(s\) 2 have no name"):
        evaluate(p, g, gt_labels=gt_names)


def test_decathlon_ground_truth_names_come_from_its_dataset_json(tmp_path, cli):
    root, preds = tmp_path / "Task", tmp_path / "pred"
    (root / "labelsTr").mkdir(parents=True)
    preds.mkdir()
    (root / "dataset.json").write_text(json.dumps({"name": "t", "labels": {"0": "background", "1": "spleen", "2": "liver"}}))
    _, gt = cubes(0)
    save(root / "labelsTr", "case1", gt * 2)  # liver coded 2 in the dataset
    save(preds, "case1_seg", gt)  # liver coded 1 in the prediction
    names_file(preds, "case1_seg.json", {"0": "background", "1": "liver"})
    result = cli("evaluate", preds, root)  # the Decathlon folder itself
    assert result.exit_code == 0, result.output
    assert "dataset.json" in result.output and "note" in result.output
    data = json.loads((preds / "evaluation.json").read_text())
    assert data["mean"]["liver"]["dice"] == 1.0 and "spleen" not in data["mean"]


@pytest.mark.parametrize("kind", ["ct_int16", "ct_float_fractional", "many_values"])
def test_images_are_refused_as_label_maps_before_scoring(tmp_path, monkeypatch, kind):
    no_scoring(monkeypatch)
    rng = np.random.default_rng(0)
    _, gt = cubes(0)
    if kind == "ct_int16":
        image = rng.integers(-1024, 1500, gt.shape).astype(np.int16)
    elif kind == "ct_float_fractional":
        image = rng.normal(40, 300, gt.shape).astype(np.float32)
    else:  # a CT stored with an offset: no negatives, whole numbers, thousands of distinct values
        image = rng.integers(0, 4096, gt.shape).astype(np.uint16)
    p = save(tmp_path, "ct", image)
    with pytest.raises(MedsegError, match=r"ct\.nii\.gz: not a label map"):
        evaluate(p, save(tmp_path, "g", gt))


def test_label_maps_load_as_small_integers(tmp_path):
    _, gt = cubes(0)
    img = nib.load(save(tmp_path, "f64", gt.astype(np.float64)))
    data, values = load_label_map(img, "f64")
    assert data.dtype == np.uint8 and np.array_equal(data, gt) and list(values) == [0, 1]
    wide = gt.astype(np.int32) * 300
    data, _ = load_label_map(nib.load(save(tmp_path, "i32", wide)), "i32")
    assert data.dtype == np.uint16 and np.array_equal(data, wide)


def test_evaluation_memory_stays_near_the_label_maps(tmp_path):
    """Peak numpy memory (tracemalloc; torch's own buffers are not traced) per voxel of one map.
    Before: float64 maps, a two-channel float32 one-hot of the whole volume for every class, and
    MONAI's distance transforms on the whole volume: 468 bytes per voxel. Now ~16."""
    import tracemalloc

    import monai.metrics  # noqa: F401  (imports are not what is measured)

    shape = (80, 80, 80)
    gt = np.zeros(shape, np.uint8)
    for k in range(1, 9):  # eight small classes
        gt[k * 8 : k * 8 + 6, 10:20, 10:20] = k
    p, g = save(tmp_path, "p", gt), save(tmp_path, "g", gt)
    tracemalloc.start()
    evaluate(p, g)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak / gt.size < 24, f"{peak / gt.size:.1f} bytes per voxel"


def test_unwritable_output_is_refused_before_scoring(tmp_path, cli, monkeypatch):
    pred, gt = cubes(0)
    p, g = save(tmp_path, "p", pred), save(tmp_path, "g", gt)
    no_scoring(monkeypatch)
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    result = cli("evaluate", p, g, "-o", blocker / "report")  # a file where a folder should be
    assert result.exit_code == 2 and "cannot write the report" in result.output, result.output
    # a read-only filesystem (simulated: the tests may run as root, which ignores permissions)
    real = tempfile.TemporaryFile

    def read_only(*args, dir=None, **kwargs):
        if dir is not None and str(dir).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*args, dir=dir, **kwargs)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    result = cli("evaluate", p, g, "-o", tmp_path / "ro" / "report")
    assert result.exit_code == 2 and "Read-only file system" in result.output, result.output
    assert not list((tmp_path / "ro").iterdir())


@pytest.mark.parametrize("content", [b"\xff\xfe{\x00\"\x001", b"[1, 2]", b'{"labels": "liver"}', b'{"1": 5}', b"{not json"])
def test_bad_labels_files_are_one_line_and_exit_2(tmp_path, cli, content):
    pred, gt = cubes(0)
    p, g = save(tmp_path, "p", pred), save(tmp_path, "g", gt)
    bad = tmp_path / "bad.json"
    bad.write_bytes(content)
    for option in ("--pred-labels", "--gt-labels"):
        result = cli("evaluate", p, g, option, bad)
        assert result.exit_code == 2, result.output
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and option in lines[0] and "bad.json" in lines[0]


def test_perfect_prediction_by_value_says_so(tmp_path):
    _, gt = cubes(0)
    report = evaluate(save(tmp_path, "p", gt), save(tmp_path, "g", gt))
    assert report.mean["class_1"]["dice"] == 1.0 and report.mean["class_1"]["hd95_mm"] == 0.0
    assert report.mean["class_1"]["nsd"] == 1.0
    assert any("matched by value" in n for n in report.notes)


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
    assert rows[0].startswith("case,class,pred_value,gt_value,dice") and any(r.startswith("mean,class_1") for r in rows)
    (tmp_path / "reports").mkdir()  # -o an existing folder: the report goes inside it
    assert cli("evaluate", tmp_path / "pred", tmp_path / "gt", "-o", tmp_path / "reports").exit_code == 0
    assert (tmp_path / "reports" / "evaluation.csv").is_file()
    missing = cli("evaluate", tmp_path / "pred", tmp_path / "nowhere")
    assert missing.exit_code == 2 and "no such file" in missing.output


def test_real_ct_perfect_prediction_scores_one(tmp_path, cli, shared_data):
    """TotalSegmentator-coded ground truth (liver 5, spleen 1, stomach 6) against a perfect
    prediction coded 1/2/3 with a sidecar naming them: Dice 1.0 each (0.000 when matched by value)."""
    label = nib.load(shared_data / "ct_abdomen_3mm" / "label.nii.gz")
    gt = np.asarray(label.dataobj)
    pred = np.zeros(gt.shape, np.uint8)
    for value, ts_value in ((1, 5), (2, 1), (3, 6)):
        pred[gt == ts_value] = value
    nib.save(nib.Nifti1Image(pred, label.affine), tmp_path / "pred.nii.gz")
    names_file(tmp_path, "pred.json", {"0": "background", "1": "liver", "2": "spleen", "3": "stomach"})
    result = cli("evaluate", tmp_path / "pred.nii.gz", shared_data / "ct_abdomen_3mm" / "label.nii.gz",
                 "--gt-labels", shared_data / "totalseg_v2_labels.json", "-o", tmp_path / "report")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "report.json").read_text())
    for organ in ("liver", "spleen", "stomach"):
        assert data["mean"][organ]["dice"] == 1.0 and data["mean"][organ]["nsd"] == 1.0
    assert set(data["mean"]) == {"background", "liver", "spleen", "stomach"}
    assert data["mean"]["background"]["dice"] == 1.0
