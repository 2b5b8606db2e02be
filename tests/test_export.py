"""medseg export: ONNX and TorchScript parity for every registered model (checked here again,
independently of the export's own check), a MONAI bundle whose ``python -m monai.bundle run``
agrees with ``medseg infer``, and bad inputs (one line, exit status 2, nothing written)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.export import export_run
from medseg.models import get_spec, list_models

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"

# Small versions of the registered models (model.args, train ROI, window ROI), for speed only: a
# model missing here is tested at its registry minimum ROI with its default arguments.
TINY = {
    "vnet": ({}, [32, 32, 32], None),
    "unetr": ({"feature_size": 8, "hidden_size": 96, "mlp_dim": 192, "num_heads": 4}, [32, 32, 32], None),
    "swin_unetr": ({"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [3, 3, 3, 3]}, [64, 64, 32], None),
    "fcn2d": ({"features": [8, 16, 16, 16, 16]}, [32, 32, 1], [32, 32, 4]),
    "fcn_triplanar": ({"features": [8, 8, 16, 16, 16], "fusion": "vote"}, [32, 32, 32], None),
}


def fake_run(root: Path, name: str, seed: int = 0) -> Path:
    """A complete run directory of an untrained (seeded) ``name``: what export needs, without training."""
    from medseg import RUN_FORMAT_VERSION
    from medseg.config import bundle_from_dict
    from medseg.engine.run import build_model, labels_json

    args, roi, window = TINY.get(name, ({}, list(get_spec(name).min_roi), None))
    raw = {"model": {"name": name, "args": args}, "data": {"labels": ["liver", "spleen"], "spacing": [4.0, 4.0, 4.0]},
           "train": {"roi": roi, "batch_size": 1}, "sliding_window": {"sw_batch_size": 2, "roi": window},
           "tracking": {"backend": "none"}}
    bundle = bundle_from_dict(raw)
    run = root / f"{name}-run"
    run.mkdir(parents=True)
    (run / "bundle.json").write_text(json.dumps(bundle.to_dict()))
    (run / "labels.json").write_text(json.dumps(labels_json(bundle.data.labels)))
    (run / "run.json").write_text(json.dumps({"format_version": RUN_FORMAT_VERSION, "status": "complete", "name": run.name}))
    torch.manual_seed(seed)
    torch.save(build_model(bundle).state_dict(), run / "model_best.pt")
    return run


def run_model(run: Path, checkpoint: str = "best"):
    from medseg.engine.run import Run

    return Run.open(run).build_model(checkpoint, "cpu")


def windows(n: int, roi, seed: int = 1) -> torch.Tensor:
    """Other windows than the export's own check used (its seed is 0)."""
    return torch.rand((n, 1, *roi), generator=torch.Generator().manual_seed(seed))


def assert_parity(got: np.ndarray, ref: np.ndarray) -> None:
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-3, rtol=1e-3)
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.999


def one_error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


# ---------------------------------------------------------------------------------------------
# every registered model


@pytest.mark.parametrize("name", list_models())
def test_onnx_parity_every_model(name, tmp_path, cli):
    import onnxruntime as ort

    run = fake_run(tmp_path, name)
    out = tmp_path / "onnx"
    result = cli("export", run, "--format", "onnx", "-o", out)
    assert result.exit_code == 0, result.output
    assert "parity: max |logit difference|" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["README.txt", "export.json", "model.onnx"]
    info = json.loads((out / "export.json").read_text())
    roi = info["input"]["window"]
    assert roi == (TINY[name][2] or TINY[name][1] if name in TINY else list(get_spec(name).min_roi))
    assert info["input"]["shape"] == ["batch", 1, *roi] and info["output"]["shape"] == ["batch", 3, *roi]
    assert info["parity"]["argmax_agreement"] >= 0.999 and info["parity"]["max_abs_diff"] < 1e-3
    assert "onnxruntime" in (out / "README.txt").read_text()
    assert info["parity"]["windows"] == 2  # exported with a batch of 1, checked with 2: the batch axis is free
    # again, here, independently of the export's own check: onnxruntime on another window against the run's model
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"] and [o.name for o in session.get_outputs()] == ["logits"]
    assert isinstance(session.get_inputs()[0].shape[0], str)  # symbolic batch
    x = windows(1, roi)
    with torch.no_grad():
        ref = run_model(run)(x).numpy()
    assert_parity(session.run(["logits"], {"image": x.numpy()})[0], ref)


@pytest.mark.parametrize("name", list_models())
def test_torchscript_parity_every_model(name, tmp_path):
    run = fake_run(tmp_path, name)
    result = export_run(run, "torchscript", tmp_path / "ts")
    assert result.parity["max_abs_diff"] < 1e-3
    net = torch.jit.load(str(result.path / "model.torchscript.pt"), map_location="cpu")
    x = windows(1, json.loads((result.path / "export.json").read_text())["input"]["window"])  # the export's own check ran 2
    with torch.no_grad():
        assert_parity(net(x).numpy(), run_model(run)(x).numpy())


@pytest.mark.parametrize("name", list_models())
def test_monai_bundle_network_every_model(name, tmp_path):
    """The bundle's network_def (MONAI's class for MONAI's networks) with models/model.pt is the run's network."""
    from medseg.export.monai_bundle import bundle_network

    run = fake_run(tmp_path, name)
    result = export_run(run, "monai-bundle", tmp_path / "bundle")
    config = json.loads((result.path / "configs" / "inference.json").read_text())
    target = config["network_def"]["_target_"]
    meta = json.loads((result.path / "configs" / "metadata.json").read_text())
    if name in ("vnet", "unetr", "swin_unetr"):
        assert target.startswith("monai.networks.nets.") and "medseg" not in meta["required_packages_version"]
    else:
        assert target.startswith("medseg.") and "medseg" in meta["required_packages_version"]
    fmt = meta["network_data_format"]
    assert fmt["inputs"]["image"]["spatial_shape"] == fmt["outputs"]["pred"]["spatial_shape"]
    assert fmt["outputs"]["pred"]["num_channels"] == 3 and fmt["outputs"]["pred"]["channel_def"]["2"] == "spleen"
    x = windows(2, fmt["inputs"]["image"]["spatial_shape"])
    with torch.no_grad():
        assert_parity(bundle_network(result.path)(x).numpy(), run_model(run)(x).numpy())


def test_triplanar_graph_has_no_frozen_batch(tmp_path):
    """TriPlanar's chunk loop depends on the batch size; a graph of forward as it is would freeze
    it at the example's batch (1): the export's graph must not (the check runs a batch of 2)."""
    from medseg.export import graph

    run = fake_run(tmp_path, "fcn_triplanar")
    model = run_model(run)
    traced = torch.jit.trace(model, windows(1, [32, 32, 32]), check_trace=False)
    with pytest.raises(RuntimeError):  # what a naive trace does with another batch
        traced(windows(2, [32, 32, 32]))
    assert isinstance(graph.graph_module(model), graph.WholeAxisTriPlanar)


def test_parity_failure_writes_nothing(tmp_path, monkeypatch):
    from medseg.errors import MedsegError
    from medseg.export import graph

    run = fake_run(tmp_path, "fcn2d")
    monkeypatch.setattr(graph, "ATOL", -1.0)  # nothing can pass
    with pytest.raises(MedsegError, match="disagrees with PyTorch"):
        export_run(run, "torchscript", tmp_path / "out" / "ts")
    assert not (tmp_path / "out" / "ts").exists()
    assert list((tmp_path / "out").iterdir()) == []  # no temporary folder left behind


# ---------------------------------------------------------------------------------------------
# a trained run: the CLI, and the MONAI bundle against medseg infer


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    from medseg.config import load_bundle
    from medseg.engine.train import train

    ws = tmp_path_factory.mktemp("export")
    run = ws / "run"
    train(load_bundle(BUNDLES / "smoke.json", ["train.epochs=1", "train.iterations_per_epoch=1", "train.samples_per_volume=1",
                                               'postprocess.largest_component=["liver","spleen"]']),
          run_dir=run, progress="off")
    return run


def test_cli_torchscript_on_a_trained_run(trained, tmp_path, cli):
    """The CLI on a trained run: export.json states the run's preprocessing exactly; --checkpoint,
    --force (an earlier export is replaced whole, nothing else is left beside it)."""
    from medseg.data.transforms import intensity_map
    from medseg.engine.run import Run

    out = tmp_path / "ts"
    result = cli("export", trained, "-f", "torchscript", "-o", out, "--checkpoint", "last")
    assert result.exit_code == 0, result.output
    assert "argmax agreement 100" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["README.txt", "export.json", "model.torchscript.pt"]
    info = json.loads((out / "export.json").read_text())
    bundle = Run.open(trained).bundle
    lo, hi, a, b = intensity_map(bundle)
    i = info["input"]
    assert i["window"] == bundle.infer_roi and i["spacing_mm"] == bundle.data.spacing and i["orientation"] == "RAS"
    assert (i["intensity"]["hu_low"], i["intensity"]["hu_high"], i["intensity"]["value_low"], i["intensity"]["value_high"]) == (lo, hi, a, b)
    assert i["intensity"]["scale"] * lo + i["intensity"]["offset"] == pytest.approx(a)
    assert i["intensity"]["scale"] * hi + i["intensity"]["offset"] == pytest.approx(b)
    assert info["classes"] == {"0": "background", "1": "liver", "2": "spleen"}
    assert info["run"] == {**info["run"], "name": trained.name, "checkpoint": "last", "status": "complete"}
    assert info["model"]["name"] == "unetr" and info["medseg_version"]
    assert info["postprocess"]["largest_component"] == ["liver", "spleen"]
    assert info["sliding_window"]["roi"] == bundle.infer_roi and info["sliding_window"]["pad_value"] == a
    readme = (out / "README.txt").read_text()
    assert "clip(HU, -175, 250)" in readme and "torch.jit.load" in readme and "2 spleen" in readme
    # the recipe as written, in float32 as a user's pipeline runs it: air must not pass the body-crop threshold
    # (scale * HU + offset gave 3e-8 > 0 for air, so nothing was cropped and 10-30 % of voxels differed from medseg infer)
    air = np.float32(-1000.0)
    im = {k: np.float32(v) for k, v in i["intensity"].items() if isinstance(v, (int, float))}
    value = (np.clip(air, im["hu_low"], im["hu_high"]) - im["hu_low"]) / (im["hu_high"] - im["hu_low"]) * (
        im["value_high"] - im["value_low"]) + im["value_low"]
    assert "(clip(HU, hu_low, hu_high) - hu_low)" in i["intensity"]["formula"]
    assert not value > info["body_crop"]["threshold"]
    assert len(info["run"]["weights_sha256"]) == 64

    first = (out / "model.torchscript.pt").stat().st_mtime_ns
    assert "exists; pass --force" in one_error_line(cli("export", trained, "-f", "torchscript", "-o", out))
    result = cli("export", trained, "-f", "torchscript", "-o", out, "--force")
    assert result.exit_code == 0, result.output
    assert (out / "model.torchscript.pt").stat().st_mtime_ns != first
    assert json.loads((out / "export.json").read_text())["run"]["checkpoint"] == "best"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ts"]  # the earlier export and the staging folder are gone


def components(mask: np.ndarray) -> int:
    from scipy import ndimage

    return ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))[1]


def test_monai_bundle_agrees_with_medseg_infer(trained, tmp_path, cli):
    pytest.importorskip("fire", reason="python -m monai.bundle needs fire")
    pytest.importorskip("skimage", reason="MONAI's KeepLargestConnectedComponentd needs scikit-image")
    from medseg.data.phantom import make_case

    bundle_dir = tmp_path / "bundle"
    result = cli("export", trained, "--format", "monai-bundle", "-o", bundle_dir)
    assert result.exit_code == 0, result.output
    assert "run it: python -m monai.bundle run --config_file" in result.output
    assert {"configs/inference.json", "configs/metadata.json", "models/model.pt", "docs/README.md", "export.json", "README.txt"} \
        == {str(p.relative_to(bundle_dir)) for p in bundle_dir.rglob("*") if p.is_file()}
    scans = tmp_path / "scans"
    scans.mkdir()
    case = make_case(seed=3, index=1)  # an odd case: stored LPS, so the bundle must reorient and invert
    scan = scans / "case.nii.gz"
    nib.save(case.image, scan)
    assert nib.aff2axcodes(case.image.affine) == ("L", "P", "S")

    result = cli("infer", scan, "-o", tmp_path / "medseg" / "case_seg.nii.gz", "--run", trained)
    assert result.exit_code == 0, result.output
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", bundle_dir / "configs" / "inference.json",
           "--meta_file", bundle_dir / "configs" / "metadata.json", "--bundle_root", bundle_dir,
           "--dataset_dir", scans, "--output_dir", tmp_path / "monai"]
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    ours = nib.load(tmp_path / "medseg" / "case_seg.nii.gz")
    theirs = nib.load(tmp_path / "monai" / "case_seg.nii.gz")
    assert theirs.shape == case.image.shape == ours.shape
    np.testing.assert_allclose(theirs.affine, case.image.affine, atol=1e-5)
    a, b = np.asarray(ours.dataobj), np.asarray(theirs.dataobj)
    assert b.dtype == np.uint8
    agreement = float((a == b).mean())
    assert agreement >= 0.999, f"bundle agrees with medseg infer on {agreement:.4%} of voxels"
    assert (b > 0).any() and set(np.unique(b)) <= {0, 1, 2}
    for value in (1, 2):  # postprocess.largest_component ran: one 26-connected piece per class
        assert components(b == value) <= 1


# ---------------------------------------------------------------------------------------------
# bad input: one line, exit status 2, nothing written


def test_bad_inputs(trained, tmp_path, cli):
    ws = tmp_path / "ws"
    (ws / "folder").mkdir(parents=True)
    (ws / "afile").write_text("x")
    (ws / "taken").mkdir()
    (ws / "taken" / "notes.txt").write_text("mine")
    no_best = fake_run(ws, "fcn2d")
    (no_best / "model_best.pt").unlink()
    before = sorted(p.relative_to(ws) for p in ws.rglob("*"))
    cases = {
        "not a medseg run directory": ("export", ws / "folder", "-f", "onnx", "-o", ws / "x"),
        "no such folder": ("export", ws / "absent", "-f", "onnx", "-o", ws / "x"),
        "--format must be onnx, torchscript or monai-bundle, got 'onx'; did you mean 'onnx'?":
            ("export", trained, "-f", "onx", "-o", ws / "x"),
        "is a file": ("export", trained, "-f", "onnx", "-o", ws / "afile"),
        "exists; pass --force": ("export", trained, "-f", "onnx", "-o", ws / "folder"),
        "is not a medseg export": ("export", trained, "-f", "onnx", "-o", ws / "taken", "--force"),
        "no best checkpoint": ("export", no_best, "-f", "onnx", "-o", ws / "x"),
        "no last checkpoint": ("export", no_best, "-f", "onnx", "-o", ws / "x", "--checkpoint", "last"),
        "--checkpoint must be best or last": ("export", trained, "-f", "onnx", "-o", ws / "x", "--checkpoint", "final"),
    }
    for expected, args in cases.items():
        assert expected in one_error_line(cli(*args)), expected
    assert sorted(p.relative_to(ws) for p in ws.rglob("*")) == before  # nothing written, nothing replaced
    assert (ws / "taken" / "notes.txt").read_text() == "mine"


def test_monai_bundle_preprocessing_matches_medseg_for_ct_normalisation(tmp_path):
    """The shipped bundles use "ct" normalisation, where the body threshold and the window's pad value
    are not MONAI's defaults (0): the bundle's own preprocessing, run by MONAI's ConfigParser on a
    phantom scan, gives medseg's normalised values and body crop; its inferer pads with medseg's air."""
    from monai.bundle import ConfigParser

    from medseg.config import load_bundle
    from medseg.data.phantom import write_phantom
    from medseg.data.transforms import body_threshold, pad_value
    from medseg.engine.pipeline import body_box, preprocess
    from medseg.export.describe import window_of
    from medseg.export.monai_bundle import inference_config

    class _Run:
        info: dict = {}

    bundle = load_bundle(BUNDLES / "fcn2d.json", ["data.spacing=[3.0, 3.0, 3.0]", 'data.ct_stats={"low": -100, "high": 250, "mean": 50, "std": 40}'])
    assert bundle.data.normalization == "ct" and pad_value(bundle) != 0 and body_threshold(bundle) != 0
    labels = {0: "background", **{i: n for i, n in enumerate(bundle.data.labels, start=1)}}
    config = inference_config(bundle, labels, window_of(_Run(), bundle))
    assert config["inferer"]["cval"] == pad_value(bundle)
    write_phantom(tmp_path / "ds", 1, seed=4)
    scan = next((tmp_path / "ds" / "imagesTr").glob("*.nii.gz"))
    parser = ConfigParser(config)
    got = parser.get_parsed_content("preprocessing")({"image": str(scan)})["image"]
    x, _ = preprocess(nib.load(scan), bundle, str(scan))
    want = x[(0, 0, *body_box(x, body_threshold(bundle)))]
    assert tuple(got.shape[1:]) == tuple(want.shape)
    assert np.allclose(np.asarray(got[0]), want.numpy(), atol=1e-4)


def test_force_keeps_files_the_export_did_not_write(trained, tmp_path, cli):
    out = tmp_path / "ts"
    assert cli("export", trained, "-f", "torchscript", "-o", out).exit_code == 0
    (out / "eval").mkdir()
    (out / "eval" / "scan_seg.nii.gz").write_bytes(b"a result the user keeps")
    line = one_error_line(cli("export", trained, "-f", "torchscript", "-o", out, "--force"))
    assert "eval/scan_seg.nii.gz" in line and "did not write" in line
    assert (out / "eval" / "scan_seg.nii.gz").read_bytes() == b"a result the user keeps"
