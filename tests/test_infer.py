"""medseg infer: geometry kept exactly, streaming window == MONAI, DICOM and batch inputs, bad input."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import write_dicom_series
from torch import nn

from medseg import RUN_FORMAT_VERSION
from medseg.data.phantom import make_case
from medseg.engine.infer import Predictor, resample_nearest
from medseg.engine.window import stream_sliding_window

LEVEL = 0.95  # windowed intensity above which the test model says "bright" (HU ~229 with -175..250)


class Threshold(nn.Module):
    """A test network whose answer is known in any geometry: class 1 where the (windowed) intensity
    exceeds LEVEL. Its one parameter lets it round-trip through a state dict."""

    def __init__(self, in_channels: int = 1, out_channels: int = 2) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(50.0))

    def forward(self, x):
        fg = self.scale * (x - LEVEL)
        return torch.cat([-fg, fg], dim=1)


@pytest.fixture
def threshold_run(tmp_path):
    from medseg.models import registry

    registry.register_model("threshold_test", display="Threshold", network=Threshold, roi_multiple=(1, 1, 1),
                            description="test only")(lambda in_channels, out_channels, roi, grad_checkpointing=False: Threshold())
    run = tmp_path / "runs" / "Threshold-AdamW-DiceCE-20261121-1200-run01"
    run.mkdir(parents=True)
    bundle = {"model": {"name": "threshold_test", "args": {}}, "data": {"labels": ["bright"], "spacing": [2.0, 2.0, 2.5]},
              "train": {"roi": [32, 32, 16]}, "sliding_window": {"overlap": 0.25, "sw_batch_size": 4}}
    (run / "bundle.json").write_text(json.dumps(bundle))
    (run / "labels.json").write_text(json.dumps({"0": "background", "1": "bright"}))
    (run / "run.json").write_text(json.dumps({"format_version": RUN_FORMAT_VERSION, "status": "complete", "name": run.name,
                                              "finished": "2026-11-21T12:00:00"}))
    torch.save(Threshold().state_dict(), run / "model_best.pt")
    yield run
    registry._REGISTRY.pop("threshold_test", None)


def direct_threshold(img: nib.Nifti1Image) -> np.ndarray:
    hu = np.asarray(img.dataobj, dtype=np.float32)
    return ((np.clip(hu, -175, 250) + 175) / 425 > LEVEL).astype(np.uint8)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def reoriented(img: nib.Nifti1Image, codes) -> nib.Nifti1Image:
    return img.as_reoriented(nib.orientations.ornt_transform(nib.io_orientation(img.affine), nib.orientations.axcodes2ornt(codes)))


def test_geometry_round_trips_for_ras_las_lps(threshold_run):
    ras = make_case(seed=2, index=0).image
    assert nib.aff2axcodes(ras.affine) == ("R", "A", "S")
    predictor = Predictor(threshold_run, device="cpu")
    results = {}
    for codes in [("R", "A", "S"), ("L", "A", "S"), ("L", "P", "S")]:
        img = reoriented(ras, codes)
        seg = predictor(img).labels
        assert seg.shape == img.shape
        np.testing.assert_array_equal(seg.affine, img.affine)
        assert nib.aff2axcodes(seg.affine) == codes and seg.get_data_dtype() == np.uint8
        out = np.asarray(seg.dataobj)
        assert dice(out, direct_threshold(img)) > 0.9  # the labels sit on the right anatomy
        results[codes] = np.asarray(reoriented(seg, ("R", "A", "S")).dataobj)
    base = results[("R", "A", "S")]
    for codes, out in results.items():
        assert (out == base).mean() >= 0.999, codes


def world_volume(shape, affine) -> nib.Nifti1Image:
    """A body (40 HU) holding two bright (600 HU) objects placed asymmetrically in world (RAS mm)
    coordinates: a sphere right-anterior-superior and a box left-posterior. Defined in mm, so the same
    anatomy appears whatever the voxel grid, and a flipped or shifted mapping cannot score well."""
    ijk = np.indices(shape).reshape(3, -1)
    x, y, z = (affine[:3, :3] @ ijk + affine[:3, 3:4]).reshape(3, *shape)
    hu = np.full(shape, -1000.0, np.float32)
    hu[(x / 110) ** 2 + (y / 85) ** 2 < 1] = 40.0
    hu[(x - 45) ** 2 + (y - 25) ** 2 + (z - 15) ** 2 < 28**2] = 600.0
    hu[(np.abs(x + 50) < 15) & (np.abs(y + 40) < 12) & (np.abs(z + 10) < 20)] = 600.0
    return nib.Nifti1Image(hu.astype(np.int16), affine)


def test_geometry_for_thick_slices_and_oblique_affines(threshold_run):
    predictor = Predictor(threshold_run, device="cpu")
    angle = np.deg2rad(20)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0, 0], [np.sin(angle), np.cos(angle), 0.1, 0], [0, -0.1, 1, 0], [0, 0, 0, 1]])
    thick = np.diag([0.7, 0.7, 5.0, 1.0])
    thick[:3, 3] = [-105, -95, -45]
    oblique = rot @ np.diag([1.5, -1.5, 3.0, 1.0])
    oblique[:3, 3] = [-110, 100, -45]
    for affine, shape in ((thick, (300, 270, 19)), (oblique, (150, 135, 32))):
        img = world_volume(shape, affine)
        seg = predictor(img).labels
        assert seg.shape == img.shape
        np.testing.assert_array_equal(seg.affine, img.affine)
        out, ref = np.asarray(seg.dataobj), direct_threshold(img)
        assert ref.sum() > 1000
        assert dice(out, ref) > 0.9
        assert max(dice(out[::-1], ref), dice(np.roll(out, 4, axis=2), ref)) < 0.75  # the bar tells right from wrong


def test_resample_nearest_identity_and_flip():
    labels = np.random.default_rng(0).integers(0, 5, (7, 6, 5)).astype(np.uint8)
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    np.testing.assert_array_equal(resample_nearest(labels, affine, labels.shape, affine), labels)
    flipped = affine @ np.array([[-1, 0, 0, 6], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    np.testing.assert_array_equal(resample_nearest(labels, affine, labels.shape, flipped), labels[::-1])


@pytest.mark.parametrize("shape, roi, overlap", [((70, 61, 45), (32, 32, 16), 0.25), ((40, 30, 10), (32, 32, 16), 0.5),
                                                 ((64, 64, 64), (32, 32, 32), 0.0)])
def test_streaming_window_matches_monai(shape, roi, overlap):
    from monai.inferers import sliding_window_inference

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 6, 3, padding=1)).eval()
    x = torch.randn(1, 1, *shape)
    with torch.no_grad():
        ref = sliding_window_inference(x, roi, 3, net, overlap=overlap, mode="gaussian")[0]
    padded = tuple(max(s, r) for s, r in zip(shape, roi))
    logits = torch.zeros((6, *padded))
    labels, probs = stream_sliding_window(x, roi, 3, net, overlap=overlap, mode="gaussian", return_probabilities=True,
                                          logits_out=logits)
    assert labels.shape == shape and labels.dtype == torch.uint8
    assert (labels.long() == ref.argmax(0)).float().mean() >= 0.999
    crop = tuple(slice((p - s) // 2, (p - s) // 2 + s) for p, s in zip(padded, shape))
    torch.testing.assert_close(logits[(slice(None), *crop)], ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(probs.float(), torch.softmax(ref, 0), rtol=0, atol=2e-3)  # float16 storage


def test_streaming_and_monai_agree_inside_the_predictor(threshold_run):
    img = make_case(seed=5, index=1).image
    a = Predictor(threshold_run, device="cpu", method="monai")(img)
    b = Predictor(threshold_run, device="cpu", method="stream")(img)
    assert (a.method, b.method) == ("monai", "stream")
    assert (np.asarray(a.labels.dataobj) == np.asarray(b.labels.dataobj)).mean() >= 0.999


def test_cli_single_file_dicom_and_batch(threshold_run, tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ./runs holds the threshold run: found without --run
    data = tmp_path / "scans"
    data.mkdir()
    case = make_case(seed=3, index=0).image
    nib.save(case, data / "a.nii.gz")
    nib.save(reoriented(case, ("L", "P", "S")), data / "b.nii.gz")

    result = cli("infer", data / "a.nii.gz", "--preview", "--save-probabilities")
    assert result.exit_code == 0, result.output
    assert "Threshold-AdamW-DiceCE-20261121-1200-run01" in result.output  # says which run it used
    seg = nib.load(data / "a_seg.nii.gz")
    assert seg.shape == case.shape and np.allclose(seg.affine, case.affine)
    sidecar = json.loads((data / "a_seg.json").read_text())
    assert sidecar["labels"] == {"0": "background", "1": "bright"} and sidecar["volume_ml"]["bright"] > 0
    assert (data / "a_seg.png").stat().st_size > 10_000
    probs = nib.load(data / "a_probabilities.nii.gz")
    assert probs.shape == (*case.shape, 2)
    p = np.asarray(probs.dataobj)
    assert np.allclose(p.sum(axis=-1), 1.0, atol=0.02)

    again = cli("infer", data / "a.nii.gz")
    assert again.exit_code == 2 and "exists; pass --force" in again.output

    batch = cli("infer", data, "-o", tmp_path / "out")
    assert batch.exit_code == 0, batch.output
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == ["a_seg.nii.gz", "b_seg.nii.gz"]
    b_seg = nib.load(tmp_path / "out" / "b_seg.nii.gz")
    assert nib.aff2axcodes(b_seg.affine) == ("L", "P", "S")

    series = write_dicom_series(nib.Nifti1Image(np.asarray(case.dataobj)[::2, ::2, :16], case.affine @ np.diag([2, 2, 1, 1])),
                                tmp_path / "dicom" / "ct_series")
    result = cli("infer", series, "--run", threshold_run)
    assert result.exit_code == 0, result.output
    seg = nib.load(tmp_path / "dicom" / "ct_series_seg.nii.gz")
    from medseg.data.io import read_dicom_series

    ref = read_dicom_series(series)
    assert seg.shape == ref.shape and np.allclose(seg.affine, ref.affine, atol=1e-4)
    assert dice(np.asarray(seg.dataobj), direct_threshold(ref)) > 0.85


def bad_inputs(tmp_path: Path) -> dict[str, Path]:
    good = make_case(seed=0, index=0).image
    nib.save(good, tmp_path / "good.nii.gz")
    (tmp_path / "notes.txt").write_text("not an image")
    raw = (tmp_path / "good.nii.gz").read_bytes()
    (tmp_path / "truncated.nii.gz").write_bytes(raw[: len(raw) // 3])
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 10, 3), np.int16), np.eye(4)), tmp_path / "four_d.nii.gz")
    (tmp_path / "empty_dicom").mkdir()
    return {"missing": tmp_path / "missing.nii.gz", "text": tmp_path / "notes.txt", "truncated": tmp_path / "truncated.nii.gz",
            "4d": tmp_path / "four_d.nii.gz", "empty": tmp_path / "empty_dicom"}


@pytest.mark.parametrize("problem, needle", [("missing", "no such file"), ("text", "not a NIfTI file"),
                                             ("truncated", "corrupt or truncated"), ("4d", "expected a 3D volume"),
                                             ("empty", "no DICOM series")])
def test_bad_inputs_are_one_line_and_write_nothing(problem, needle, threshold_run, tmp_path, cli):
    path = bad_inputs(tmp_path)[problem]
    before = set(tmp_path.rglob("*"))
    result = cli("infer", path, "--run", threshold_run)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], result.output
    assert "Traceback" not in result.output
    assert set(tmp_path.rglob("*")) == before, "no output, not even a temporary file"


def test_bad_run_directories(threshold_run, tmp_path, cli, monkeypatch):
    scan = tmp_path / "scan.nii.gz"
    nib.save(make_case(seed=0, index=0).image, scan)
    monkeypatch.chdir(tmp_path / "runs")  # no ./runs here
    result = cli("infer", scan)
    assert result.exit_code == 2 and "train one first" in result.output
    info = json.loads((threshold_run / "run.json").read_text())
    (threshold_run / "run.json").write_text(json.dumps({**info, "format_version": 99}))
    result = cli("infer", scan, "--run", threshold_run)
    assert result.exit_code == 2 and "run format 99 is not supported" in result.output
    (threshold_run / "run.json").write_text(json.dumps(info))
    (threshold_run / "model_best.pt").unlink()
    result = cli("infer", scan, "--run", threshold_run)
    assert result.exit_code == 2 and "missing weights model_best.pt" in result.output
    assert not list(tmp_path.glob("scan_seg*"))
