"""medseg infer: geometry kept exactly, labels = argmax of the saved probabilities, the run's own
model and AMP rule, DICOM and batch inputs, and bad input (one line, nothing written)."""

import contextlib
import fcntl
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
RUN_NAME = "Threshold-AdamW-DiceCE-20261121-1200-run01"


class Threshold(nn.Module):
    """A test network whose answer is known in any geometry: class 1 where the (windowed) intensity
    exceeds LEVEL. Its one parameter lets it round-trip through a state dict (a negative scale
    inverts the answer: how the tests tell one checkpoint from another)."""

    def __init__(self, in_channels: int = 1, out_channels: int = 2, scale: float = 50.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))

    def forward(self, x):
        fg = self.scale * (x - LEVEL)
        return torch.cat([-fg, fg], dim=1)


def register_threshold() -> None:
    from medseg.models import registry

    if "threshold_test" not in registry._REGISTRY:
        registry.register_model("threshold_test", display="Threshold", network=Threshold, roi_multiple=(1, 1, 1),
                                description="test only")(lambda in_channels, out_channels, roi, grad_checkpointing=False: Threshold())


def make_threshold_run(root: Path, spacing=(2.0, 2.0, 2.5)) -> Path:
    """A complete run directory of the threshold model under ``root``."""
    register_threshold()
    run = root / RUN_NAME
    run.mkdir(parents=True)
    bundle = {"model": {"name": "threshold_test", "args": {}}, "data": {"labels": ["bright"], "spacing": list(spacing)},
              "train": {"roi": [32, 32, 16]}, "sliding_window": {"overlap": 0.25, "sw_batch_size": 4}}
    (run / "bundle.json").write_text(json.dumps(bundle))
    (run / "labels.json").write_text(json.dumps({"0": "background", "1": "bright"}))
    (run / "run.json").write_text(json.dumps({"format_version": RUN_FORMAT_VERSION, "status": "complete", "name": run.name,
                                              "finished": "2026-11-21T12:00:00"}))
    torch.save(Threshold().state_dict(), run / "model_best.pt")
    return run


@pytest.fixture
def threshold_run(tmp_path):
    from medseg.models import registry

    yield make_threshold_run(tmp_path / "runs")
    registry._REGISTRY.pop("threshold_test", None)


def direct_threshold(img: nib.Nifti1Image) -> np.ndarray:
    hu = np.asarray(img.dataobj, dtype=np.float32)
    return ((np.clip(hu, -175, 250) + 175) / 425 > LEVEL).astype(np.uint8)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def reoriented(img: nib.Nifti1Image, codes) -> nib.Nifti1Image:
    return img.as_reoriented(nib.orientations.ornt_transform(nib.io_orientation(img.affine), nib.orientations.axcodes2ornt(codes)))


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def files_under(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------
# geometry and consistency


@pytest.mark.parametrize("resample", ["linear", "nearest"])
def test_geometry_round_trips_for_ras_las_lps(threshold_run, resample):
    ras = make_case(seed=2, index=0).image
    assert nib.aff2axcodes(ras.affine) == ("R", "A", "S")
    predictor = Predictor(threshold_run, device="cpu", resample=resample)
    results = {}
    for codes in [("R", "A", "S"), ("L", "A", "S"), ("L", "P", "S")]:
        img = reoriented(ras, codes)
        seg = predictor(img)
        assert seg.resample == resample
        seg = seg.labels
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


def oblique_cases():
    angle = np.deg2rad(20)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0, 0], [np.sin(angle), np.cos(angle), 0.1, 0], [0, -0.1, 1, 0], [0, 0, 0, 1]])
    thick = np.diag([0.7, 0.7, 5.0, 1.0])
    thick[:3, 3] = [-105, -95, -45]
    oblique = rot @ np.diag([1.5, -1.5, 3.0, 1.0])
    oblique[:3, 3] = [-110, 100, -45]
    return [(thick, (300, 270, 19)), (oblique, (150, 135, 32))]


def test_geometry_for_thick_slices_and_oblique_affines(threshold_run):
    predictor = Predictor(threshold_run, device="cpu")
    for affine, shape in oblique_cases():
        img = world_volume(shape, affine)
        seg = predictor(img).labels
        assert seg.shape == img.shape
        np.testing.assert_array_equal(seg.affine, img.affine)
        out, ref = np.asarray(seg.dataobj), direct_threshold(img)
        assert ref.sum() > 1000
        assert dice(out, ref) > 0.9
        assert max(dice(out[::-1], ref), dice(np.roll(out, 4, axis=2), ref)) < 0.75  # the bar tells right from wrong


@pytest.mark.parametrize("resample", ["linear", "nearest"])
def test_labels_are_an_argmax_of_the_saved_probabilities(threshold_run, tmp_path, cli, resample):
    """Read back from the files: on every voxel the saved label's probability is the largest
    (uint8 rounding may tie). The old code resampled labels nearest and probabilities linearly."""
    affine, shape = oblique_cases()[1]
    nib.save(world_volume(shape, affine), tmp_path / "obl.nii.gz")
    result = cli("infer", tmp_path / "obl.nii.gz", "--run", threshold_run, "--save-probabilities", "--resample", resample)
    assert result.exit_code == 0, result.output
    labels = np.asarray(nib.load(tmp_path / "obl_seg.nii.gz").dataobj)
    probs = nib.load(tmp_path / "obl_probabilities.nii.gz")
    stored = np.asarray(probs.dataobj.get_unscaled())
    assert stored.dtype == np.uint8 and probs.shape == (*shape, 2)
    assert np.allclose(np.asarray(probs.dataobj).sum(-1), 1.0, atol=0.01)
    at_label = np.take_along_axis(stored, labels[..., None].astype(np.int64), axis=-1)[..., 0]
    assert (at_label >= stored.max(axis=-1)).all()
    assert 0.01 < (labels == 1).mean() < 0.5  # both classes present: the check is not vacuous
    assert json.loads((tmp_path / "obl_seg.json").read_text())["resample"] == resample


def test_probabilities_hold_no_float32_classes_x_volume_array(tmp_path):
    """--save-probabilities used to allocate a float32 classes x volume array (plus float32 copies
    per class); now the host arrays are the uint8 output and slabs. tracemalloc sees every numpy
    allocation (torch's float16 model-grid buffer is allowed and not counted)."""
    import tracemalloc

    from medseg.models import registry

    n_classes = 24

    class Many(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.linspace(-3, 3, n_classes))

        def forward(self, x):
            return self.w.view(1, -1, 1, 1, 1) * x

    registry.register_model("many_test", display="Many", network=Many, roi_multiple=(1, 1, 1),
                            description="test only")(lambda in_channels, out_channels, roi, grad_checkpointing=False: Many())
    try:
        run = make_threshold_run(tmp_path / "runs", spacing=(2.0, 2.0, 2.0))
        bundle = json.loads((run / "bundle.json").read_text())
        bundle["model"]["name"] = "many_test"
        bundle["data"]["labels"] = [f"c{i}" for i in range(1, n_classes)]
        (run / "bundle.json").write_text(json.dumps(bundle))
        (run / "labels.json").write_text(json.dumps({"0": "background", **{str(i): f"c{i}" for i in range(1, n_classes)}}))
        torch.save(Many().state_dict(), run / "model_best.pt")
        predictor = Predictor(run, device="cpu", method="stream")
        shape = (64, 64, 48)
        rng = np.random.default_rng(0)
        img = nib.Nifti1Image(rng.integers(-100, 250, shape).astype(np.int16), np.diag([2.0, 2.0, 2.0, 1.0]))
        float32_volume = n_classes * np.prod(shape) * 4
        tracemalloc.start()
        seg = predictor(img, probabilities=True)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    finally:
        registry._REGISTRY.pop("many_test", None)
    assert seg.probabilities.shape == (*shape, n_classes) and seg.probabilities.get_data_dtype() == np.uint8
    print(f"numpy peak {peak / 2**20:.1f} MiB; one float32 classes x volume {float32_volume / 2**20:.1f} MiB")
    assert peak < 0.6 * float32_volume


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


# ---------------------------------------------------------------------------------------------
# the run: checkpoint, status, mixed precision


def test_checkpoint_last_and_sidecar(threshold_run, tmp_path, cli):
    """--checkpoint last loads the model in checkpoint.pt (here an inverted threshold); the sidecar
    says which run, status, checkpoint, model, version and resampling made the labels."""
    torch.save({"model": Threshold(scale=-50.0).state_dict(), "optimizer": {}, "epoch": 3}, threshold_run / "checkpoint.pt")
    img = make_case(seed=3, index=0).image
    nib.save(img, tmp_path / "a.nii.gz")
    best = cli("infer", tmp_path / "a.nii.gz", "--run", threshold_run, "-o", tmp_path / "best_seg.nii.gz")
    last = cli("infer", tmp_path / "a.nii.gz", "--run", threshold_run, "-o", tmp_path / "last_seg.nii.gz", "--checkpoint", "last")
    assert best.exit_code == 0 and last.exit_code == 0, best.output + last.output
    b = np.asarray(nib.load(tmp_path / "best_seg.nii.gz").dataobj)
    la = np.asarray(nib.load(tmp_path / "last_seg.nii.gz").dataobj)
    assert dice(b, direct_threshold(img)) > 0.9 and dice(la, direct_threshold(img)) < 0.1
    sidecar = json.loads((tmp_path / "last_seg.json").read_text())
    from medseg import __version__

    assert sidecar["labels"] == {"0": "background", "1": "bright"} and "volume_ml" in sidecar
    assert (sidecar["run_name"], sidecar["run_status"], sidecar["checkpoint"], sidecar["model"]) == (RUN_NAME, "complete", "last", "threshold_test")
    assert sidecar["medseg_version"] == __version__ and sidecar["resample"] == "linear"
    assert "dicom_series_uid" not in sidecar
    bad = cli("infer", tmp_path / "a.nii.gz", "--run", threshold_run, "--checkpoint", "newest")
    assert bad.exit_code == 2 and "--checkpoint must be best or last" in error_lines(bad.output)[0]


def test_killed_run_is_noted(threshold_run, tmp_path, cli):
    info = json.loads((threshold_run / "run.json").read_text())
    (threshold_run / "run.json").write_text(json.dumps({**info, "status": "running", "pid": 999999}))
    nib.save(make_case(seed=3, index=0).image, tmp_path / "a.nii.gz")
    result = cli("infer", tmp_path / "a.nii.gz", "--run", threshold_run)
    assert result.exit_code == 0, result.output
    assert "is killed, not complete; using its best checkpoint" in " ".join(result.output.split())
    assert json.loads((tmp_path / "a_seg.json").read_text())["run_status"] == "killed"


def test_mixed_precision_follows_the_device_rule(threshold_run, monkeypatch):
    """Inference asks medseg.engine.device for the AMP mode (it used to hard-code bf16) and runs the
    network inside that autocast."""
    from medseg.engine import device

    seen = {"modes": [], "entered": 0}

    @contextlib.contextmanager
    def recording():
        seen["entered"] += 1
        yield

    monkeypatch.setattr(device, "amp_mode", lambda enabled, dev: "fp16" if enabled else "off")
    monkeypatch.setattr(device, "autocast", lambda mode, dev: seen["modes"].append(mode) or recording)
    predictor = Predictor(threshold_run, device="cpu")
    predictor(make_case(seed=3, index=0).image)
    assert predictor.amp == "fp16" and seen["modes"] == ["fp16"] and seen["entered"] > 0


# ---------------------------------------------------------------------------------------------
# the command line


def test_cli_single_file_dicom_and_batch(threshold_run, tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ./runs holds the threshold run: found without --run
    data = tmp_path / "scans"
    data.mkdir()
    case = make_case(seed=3, index=0).image
    nib.save(case, data / "a.nii.gz")
    nib.save(reoriented(case, ("L", "P", "S")), data / "b.nii.gz")

    result = cli("infer", data / "a.nii.gz", "--preview", "--save-probabilities")
    assert result.exit_code == 0, result.output
    assert RUN_NAME in result.output  # says which run it used
    seg = nib.load(data / "a_seg.nii.gz")
    assert seg.shape == case.shape and np.allclose(seg.affine, case.affine)
    sidecar = json.loads((data / "a_seg.json").read_text())
    assert sidecar["labels"] == {"0": "background", "1": "bright"} and sidecar["volume_ml"]["bright"] > 0
    assert (data / "a_seg.png").stat().st_size > 10_000
    probs = nib.load(data / "a_probabilities.nii.gz")
    assert probs.shape == (*case.shape, 2)
    p = np.asarray(probs.dataobj)
    assert np.allclose(p.sum(axis=-1), 1.0, atol=0.02)
    assert not [p for p in data.iterdir() if p.name.startswith(".")], "no lock or temporary file left"

    again = cli("infer", data / "a.nii.gz")
    assert again.exit_code == 2 and "exists; pass --force" in again.output

    batch = cli("infer", data, "-o", tmp_path / "out")
    assert batch.exit_code == 0, batch.output
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == ["a_seg.nii.gz", "b_seg.nii.gz"]
    assert "2 of 2 scans segmented" in batch.output
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
    assert json.loads((tmp_path / "dicom" / "ct_series_seg.json").read_text())["dicom_series_uid"] == ref.extra["dicom"]["series_uid"]


def test_series_picks_one_of_several_and_notes_it(threshold_run, tmp_path, cli):
    case = make_case(seed=3, index=0).image
    small = nib.Nifti1Image(np.asarray(case.dataobj)[::2, ::2, :16], case.affine @ np.diag([2, 2, 1, 1]))
    folder = tmp_path / "study"
    write_dicom_series(small, folder, series_uid="1.2.826.0.1.3680043.8.498.1", prefix="big")
    write_dicom_series(nib.Nifti1Image(np.asarray(small.dataobj)[:, :, :6], small.affine), folder,
                       series_uid="1.2.826.0.1.3680043.8.498.2", prefix="small")
    result = cli("infer", folder, "--run", threshold_run, "--series", "1.2.826.0.1.3680043.8.498.2")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "note:" in text and "1.2.826.0.1.3680043.8.498.1" in text  # names the series it did not read
    assert nib.load(tmp_path / "study_seg.nii.gz").shape[2] == 6
    assert json.loads((tmp_path / "study_seg.json").read_text())["dicom_series_uid"] == "1.2.826.0.1.3680043.8.498.2"
    wrong = cli("infer", folder, "--run", threshold_run, "--series", "9.9.9", "-o", tmp_path / "x_seg.nii.gz")
    assert wrong.exit_code == 2 and "9.9.9" in error_lines(wrong.output)[0]
    assert not (tmp_path / "x_seg.nii.gz").exists()


def test_classes_option_and_help(threshold_run, tmp_path, cli):
    nib.save(make_case(seed=3, index=0).image, tmp_path / "a.nii.gz")
    result = cli("infer", tmp_path / "a.nii.gz", "--run", threshold_run, "--classes", "bright")
    assert result.exit_code == 0, result.output
    assert np.asarray(nib.load(tmp_path / "a_seg.nii.gz").dataobj).any()
    unknown = cli("infer", tmp_path / "a.nii.gz", "--run", threshold_run, "--classes", "liver", "--force")
    assert unknown.exit_code == 2 and "--classes: liver not in this run's classes" in error_lines(unknown.output)[0]
    old = cli("infer", tmp_path / "a.nii.gz", "--run", threshold_run, "--labels", "bright", "--force")
    assert old.exit_code == 2 and "No such option" in old.output
    help_text = cli("infer", "--help").output
    assert [line for line in help_text.splitlines() if "<bool>" in line and "--help" not in line] == []  # flags take no value
    assert "<list" not in help_text and "NAME" in help_text
    for option in ("--classes", "--checkpoint", "--resample", "--series"):
        assert option in help_text


def test_resample_auto_falls_back_to_nearest_with_a_note(threshold_run, tmp_path, cli, monkeypatch):
    from medseg.engine import pipeline

    monkeypatch.setattr(pipeline, "PROBABILITY_BUFFER_LIMIT", 1000)
    nib.save(make_case(seed=3, index=0).image, tmp_path / "a.nii.gz")
    result = cli("infer", tmp_path / "a.nii.gz", "--run", threshold_run)
    assert result.exit_code == 0, result.output
    assert "note: labels resampled nearest-neighbour" in " ".join(result.output.split())
    assert json.loads((tmp_path / "a_seg.json").read_text())["resample"] == "nearest"


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
                                             ("empty", "empty folder (no NIfTI scans, no DICOM files)")])
def test_bad_inputs_are_one_line_and_write_nothing(problem, needle, threshold_run, tmp_path, cli):
    path = bad_inputs(tmp_path)[problem]
    before = set(tmp_path.rglob("*"))
    result = cli("infer", path, "--run", threshold_run)
    assert result.exit_code == 2, result.output
    lines = error_lines(result.output)
    assert len(lines) == 1 and needle in lines[0], result.output
    assert path.name in lines[0], "the error names the file"
    assert "Traceback" not in result.output
    assert set(tmp_path.rglob("*")) == before, "no output, not even a temporary file"


def test_output_equal_to_the_input_is_refused_even_with_force(threshold_run, tmp_path, cli):
    scan = tmp_path / "ct.nii.gz"
    nib.save(make_case(seed=0, index=0).image, scan)
    (tmp_path / "link.nii.gz").symlink_to(scan)
    before = files_under(tmp_path)
    for output in (scan, tmp_path / "." / "ct.nii.gz", tmp_path / "link.nii.gz"):
        result = cli("infer", scan, "-o", output, "--force", "--run", threshold_run)
        assert result.exit_code == 2, result.output
        lines = error_lines(result.output)
        assert len(lines) == 1 and "is the input" in lines[0], result.output
    assert files_under(tmp_path) == before  # the CT is intact, nothing written


def test_dataset_folders_segment_images_only(threshold_run, tmp_path, cli):
    img = make_case(seed=3, index=0).image
    label = nib.Nifti1Image(direct_threshold(img), img.affine)
    pair = tmp_path / "case7"
    pair.mkdir()
    nib.save(img, pair / "image.nii.gz")
    nib.save(label, pair / "label.nii.gz")

    as_file = cli("infer", pair, "-o", tmp_path / "pred.nii.gz", "--run", threshold_run)
    assert as_file.exit_code == 2 and "a folder input needs an output folder" in error_lines(as_file.output)[0]
    assert not (tmp_path / "pred.nii.gz").exists()  # neither a file nor a folder of that name

    result = cli("infer", pair, "-o", tmp_path / "pred", "--run", threshold_run)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == ["case7_seg.json", "case7_seg.nii.gz", "summary.csv", "summary.json"]

    decathlon = tmp_path / "Task01"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (decathlon / sub).mkdir(parents=True)
    nib.save(img, decathlon / "imagesTr" / "ct_001.nii.gz")
    nib.save(label, decathlon / "labelsTr" / "ct_001.nii.gz")
    nib.save(reoriented(img, ("L", "P", "S")), decathlon / "imagesTs" / "ct_101.nii.gz")
    beside = cli("infer", decathlon, "--run", threshold_run)
    assert beside.exit_code == 2 and "name an output folder with -o" in error_lines(beside.output)[0]
    result = cli("infer", decathlon, "-o", tmp_path / "pred_task", "--run", threshold_run)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "pred_task").glob("*.nii.gz")) == ["ct_001_seg.nii.gz", "ct_101_seg.nii.gz"]
    assert not list((decathlon / "labelsTr").glob("*_seg*")) and not list((decathlon / "imagesTr").glob("*_seg*"))


def test_batch_reports_a_bad_case_and_goes_on(threshold_run, tmp_path, cli):
    data = tmp_path / "scans"
    data.mkdir()
    case = make_case(seed=3, index=0).image
    nib.save(case, data / "a.nii.gz")
    nib.save(case, data / "c.nii.gz")
    raw = (data / "a.nii.gz").read_bytes()
    (data / "b.nii.gz").write_bytes(raw[: len(raw) // 3])
    result = cli("infer", data, "-o", tmp_path / "out", "--run", threshold_run)
    assert result.exit_code == 1, result.output
    lines = error_lines(result.output)
    assert len(lines) == 1 and "b.nii.gz" in lines[0] and "corrupt or truncated" in lines[0], result.output
    assert "2 of 3 scans segmented; failed: b.nii.gz" in " ".join(result.output.split())
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == ["a_seg.nii.gz", "c_seg.nii.gz"]
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]

    only_bad = tmp_path / "bad_only"
    only_bad.mkdir()
    (only_bad / "b.nii.gz").write_bytes(raw[: len(raw) // 3])
    result = cli("infer", only_bad, "-o", tmp_path / "out2", "--run", threshold_run)
    assert result.exit_code == 1
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == ["summary.csv", "summary.json"]  # the failure, reported
    assert json.loads((tmp_path / "out2" / "summary.json").read_text())["counts"] == {"done": 0, "failed": 1, "pending": 0}


def test_a_locked_output_fails_naming_the_holder(threshold_run, tmp_path, cli):
    scan = tmp_path / "a.nii.gz"
    nib.save(make_case(seed=3, index=0).image, scan)
    lock = tmp_path / ".a_seg.nii.gz.lock"
    with open(lock, "w") as f:  # another medseg infer writing a_seg.nii.gz (its lock, taken by hand)
        f.write("pid 4242 on otherhost")
        f.flush()
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = cli("infer", scan, "--run", threshold_run)
    assert result.exit_code == 2, result.output
    lines = error_lines(result.output)
    assert len(lines) == 1 and "being written by another medseg infer (pid 4242 on otherhost)" in lines[0]
    assert not (tmp_path / "a_seg.nii.gz").exists()


def test_a_file_that_appears_meanwhile_is_not_replaced(threshold_run, tmp_path, cli, monkeypatch):
    scan = tmp_path / "a.nii.gz"
    nib.save(make_case(seed=3, index=0).image, scan)
    target = tmp_path / "a_seg.nii.gz"
    real_call = Predictor.__call__

    def slow_call(self, *args, **kwargs):
        result = real_call(self, *args, **kwargs)
        target.write_bytes(b"written by someone else meanwhile")
        return result

    monkeypatch.setattr(Predictor, "__call__", slow_call)
    result = cli("infer", scan, "--run", threshold_run)
    assert result.exit_code == 2, result.output
    assert "appeared while this scan was segmented" in error_lines(result.output)[0]
    assert target.read_bytes() == b"written by someone else meanwhile"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["a.nii.gz", "a_seg.nii.gz"]  # no sidecar, no temp, no lock
    target.unlink()
    target.write_bytes(b"old")
    forced = cli("infer", scan, "--run", threshold_run, "--force")
    assert forced.exit_code == 0, forced.output
    assert nib.load(target).shape == nib.load(scan).shape


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


def test_a_scan_that_is_not_ct_gets_a_note(threshold_run):
    """A label map, a mask or an all-air volume passed as the scan is segmented into nonsense
    volumes; the user is told it does not look like CT, and a real CT gets no such note."""
    predictor = Predictor(threshold_run, device="cpu")
    case = make_case(seed=4, index=0)
    ct_notes = predictor(case.image).notes
    assert not [n for n in ct_notes if "Hounsfield" in n]
    label_as_scan = nib.Nifti1Image(np.asarray(case.label.dataobj).astype(np.int16), case.label.affine)
    assert any("does not look like CT" in n for n in predictor(label_as_scan).notes)
    air = nib.Nifti1Image(np.full((40, 40, 20), -1000, np.int16), np.diag([3.0, 3.0, 3.0, 1.0]))
    assert any("nothing in this scan is brighter" in n for n in predictor(air).notes)


def test_largest_component_keeps_one_piece_per_listed_class():
    from medseg.engine.postprocess import keep_largest_component

    labels = np.zeros((20, 20, 20), dtype=np.uint8)
    labels[2:8, 2:8, 2:8] = 1  # 216 voxels
    labels[8, 8, 8] = 1  # touches the big block at a corner only: 26-connected, kept
    labels[15:17, 15:17, 15:17] = 1  # 8 voxels apart: removed
    labels[12:14, 2:4, 2:4] = 2  # class 2 in two pieces, not listed: untouched
    labels[12:14, 15:17, 15:17] = 2
    before2 = (labels == 2).sum()
    assert keep_largest_component(labels, [1, 3]) == {1: 8}
    assert (labels == 1).sum() == 217 and labels[15, 15, 15] == 0 and labels[8, 8, 8] == 1
    assert (labels == 2).sum() == before2


def test_infer_applies_postprocess_largest_component(threshold_run):
    """A scan with a large and a small bright block: both are segmented as shipped; with the class in
    postprocess.largest_component only the large one is, the small one's voxels are background, and
    the note says how many voxels went."""
    hu = np.full((48, 48, 24), -100, dtype=np.int16)
    hu[5:25, 5:25, 4:16] = 400
    hu[38:44, 38:44, 16:22] = 400
    img = nib.Nifti1Image(hu, np.diag([2.0, 2.0, 2.5, 1.0]))
    plain = Predictor(threshold_run, device="cpu")(img)
    seg = np.asarray(plain.labels.dataobj)
    assert seg[40, 40, 18] == 1 and seg[15, 15, 10] == 1
    bundle = json.loads((threshold_run / "bundle.json").read_text())
    bundle["postprocess"] = {"largest_component": ["spleen", "bright"]}  # spleen: not this run's class, skipped
    (threshold_run / "bundle.json").write_text(json.dumps(bundle))
    raw = np.asarray(Predictor(threshold_run, device="cpu", postprocess=False)(img).labels.dataobj)
    assert np.array_equal(raw, seg)  # --no-postprocess: the argmax as it was
    post = Predictor(threshold_run, device="cpu")(img)
    kept = np.asarray(post.labels.dataobj)
    assert kept[40, 40, 18] == 0 and kept[15, 15, 10] == 1
    assert np.array_equal(kept, np.where(np.arange(48)[:, None, None] < 30, seg, 0))  # the big block's labels unchanged
    small = int(seg.sum() - kept.sum())
    assert small > 0 and any(f"bright {small * 0.01:.1f} ml ({small} voxels)" in n for n in post.notes)
    assert post.volume_ml["bright"] == pytest.approx(kept.sum() * 2 * 2 * 2.5 / 1000, abs=1e-3)


def test_infer_cli_records_and_skips_postprocess(threshold_run, tmp_path, cli):
    bundle = json.loads((threshold_run / "bundle.json").read_text())
    bundle["postprocess"] = {"largest_component": ["bright"]}
    (threshold_run / "bundle.json").write_text(json.dumps(bundle))
    hu = np.full((48, 48, 24), -100, dtype=np.int16)
    hu[5:25, 5:25, 4:16] = 400
    hu[38:44, 38:44, 16:22] = 400
    nib.save(nib.Nifti1Image(hu, np.diag([2.0, 2.0, 2.5, 1.0])), tmp_path / "scan.nii.gz")
    for flag, expected, small in (([], ["bright"], 0), (["--no-postprocess"], [], 1)):
        out = tmp_path / f"seg{len(flag)}.nii.gz"
        res = cli("infer", tmp_path / "scan.nii.gz", "--run", threshold_run, "-o", out, *flag)
        assert res.exit_code == 0, res.output
        assert json.loads(out.with_name(out.name.replace(".nii.gz", ".json")).read_text())["largest_component"] == expected
        assert np.asarray(nib.load(out).dataobj)[40, 40, 18] == small


def test_runs_are_padded_as_they_were_trained(threshold_run):
    """Windows smaller than the ROI are padded with air for a run trained on air-padded patches
    (format 3), and with 0 for runs of formats 1-2, which were trained on zero-padded patches."""
    from medseg.engine.infer import Predictor

    bundle = json.loads((threshold_run / "bundle.json").read_text())
    bundle["data"].update(normalization="ct", ct_stats={"low": -100, "high": 250, "mean": 50, "std": 40})
    (threshold_run / "bundle.json").write_text(json.dumps(bundle))
    assert Predictor(threshold_run, device="cpu").window.pad_value == pytest.approx((-100 - 50) / 40)
    info = json.loads((threshold_run / "run.json").read_text())
    (threshold_run / "run.json").write_text(json.dumps({**info, "format_version": 2}))
    assert Predictor(threshold_run, device="cpu").window.pad_value == 0.0


def test_a_cohort_leaves_a_case_another_process_is_writing(threshold_run, tmp_path, cli):
    """A duplicate worker (a requeued array task) meets a case being written: it leaves it, not fails it."""
    data = tmp_path / "scans"
    data.mkdir()
    for i, name in enumerate(("a", "b")):
        nib.save(make_case(seed=3, index=i).image, data / f"{name}.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".a_seg.nii.gz.lock", "w") as f:  # another medseg infer holds a's output
        f.write("pid 4242 on otherhost")
        f.flush()
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = cli("infer", data, "-o", out, "--run", threshold_run)
    assert result.exit_code == 0, result.output
    assert "being written by another medseg infer (pid 4242 on otherhost)" in " ".join(result.output.split())
    assert (out / "b_seg.nii.gz").exists() and not (out / "a_seg.nii.gz").exists()
    rows = {r["name"]: r["status"] for r in json.loads((out / "summary.json").read_text())["cases"]}
    assert rows == {"a": "pending", "b": "done"}
