"""medseg compare: two tiny bundles on the phantom, 2 folds, a few steps. The report's rows must be
what `medseg evaluate` says about each model's saved predictions, every case must be scored by the
fold that did not train on it, and the pictures must be images with a panel per model."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
from PIL import Image

TINY = {
    "fcn": {"model": {"name": "fcn2d", "args": {"features": [8, 16, 16, 32, 32]}},
            "train": {"roi": [64, 64, 1], "samples_per_volume": 8, "lr": 2e-3, "iterations_per_epoch": 4},
            "sliding_window": {"sw_batch_size": 4, "roi": [64, 64, 4]}},
    "tri": {"model": {"name": "fcn_triplanar", "args": {"features": [8, 16, 16, 32, 32], "train_slices": 4}},
            "train": {"roi": [64, 64, 48], "samples_per_volume": 1, "lr": 2e-3, "iterations_per_epoch": 4},
            "sliding_window": {"sw_batch_size": 1}},
}
DATA = {"source": "phantom", "phantom": {"cases": 4, "seed": 0}, "spacing": [4.0, 4.0, 4.0], "labels": ["liver", "spleen"]}


def write_bundles(folder: Path, **changes) -> list[Path]:
    paths = []
    for name, bundle in TINY.items():
        path = folder / f"tiny_{name}.json"
        path.write_text(json.dumps({**bundle, "data": {**DATA, **changes.get(name, {})}}))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One comparison for the module's tests (trained once: 2 models x 2 folds x 8 steps)."""
    import os

    from typer.testing import CliRunner

    from medseg.cli import app

    folder = tmp_path_factory.mktemp("compare")
    old = os.getcwd()
    os.chdir(folder)
    try:
        result = CliRunner().invoke(app, ["compare", *map(str, write_bundles(folder)), "--folds", "2", "--iterations", "8",
                                          "-o", "rep", "--progress", "plain"])
    finally:
        os.chdir(old)
    assert result.exit_code == 0, result.output
    return folder, folder / "rep", result.output


def test_report_files_and_rows_equal_medseg_evaluate(report, phantom_cache, cli, tmp_path):
    folder, rep, _ = report
    for name in ("compare.md", "compare.csv", "compare.json", "dice.png", "slices.png", "curves.png", "splits.json"):
        assert (rep / name).is_file(), name
    data = json.loads((rep / "compare.json").read_text())
    assert [m["name"] for m in data["models"]] == ["tiny_fcn", "tiny_tri"]
    rows = list(csv.DictReader((rep / "compare.csv").open()))

    # The ground truth for `medseg evaluate`, taken from the phantom's own dataset (not compare's links)
    source = next(phantom_cache.glob("phantom-*-seed0"))
    gt = tmp_path / "gt"
    gt.mkdir()
    for case in ("phantom_000", "phantom_001", "phantom_002", "phantom_003"):
        shutil.copy(source / "labelsTr" / f"{case}.nii.gz", gt)
    for model in ("tiny_fcn", "tiny_tri"):
        out = tmp_path / model
        out.mkdir()
        result = cli("evaluate", rep / "predictions" / model, gt, "--gt-labels", source / "dataset.json", "-o", out)
        assert result.exit_code == 0, result.output
        evaluated = json.loads((out / "evaluation.json").read_text())
        mine = {r["class"]: r for r in rows if r["model"] == model and r["space"] == "original"}
        assert set(mine) == {"background", "liver", "spleen", "mean"}
        for cls in ("background", "liver", "spleen"):
            for metric in ("dice", "iou", "precision", "recall", "accuracy", "hd95_mm", "nsd"):
                want = evaluated["mean"][cls][metric]
                got = float(mine[cls][metric]) if mine[cls][metric] else None
                assert (want is None and got is None) or math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12), (model, cls, metric)
        assert math.isclose(float(mine["mean"]["dice"]), evaluated["summary"]["mean_dice"], rel_tol=1e-9)
        # the model grid: the same metric code on other arrays, so close to but not the same numbers
        grid = {r["class"]: r for r in rows if r["model"] == model and r["space"] == "training_spacing"}
        assert float(mine["liver"]["dice"]) > 0.3  # learnt something: the comparison of the two spaces is not 0 vs 0
        assert abs(float(grid["liver"]["dice"]) - float(mine["liver"]["dice"])) < 0.1
        assert int(mine["mean"]["parameters"]) > 0 and float(mine["mean"]["flops_per_volume"]) >= float(mine["mean"]["flops_per_window"]) > 0
        assert float(mine["mean"]["train_seconds"]) > 0 and float(mine["mean"]["infer_seconds_per_volume"]) > 0
        assert int(mine["mean"]["peak_memory_bytes"]) > 0
    md = (rep / "compare.md").read_text()
    assert "tiny_fcn (FCN2D)" in md and "tiny_tri (FCNTriPlanar)" in md and "8 optimiser steps" in md


def test_every_case_is_scored_by_the_fold_that_did_not_train_on_it(report):
    _, rep, _ = report
    splits = json.loads((rep / "splits.json").read_text())
    assert sorted(n for s in splits for n in s["val"]) == ["phantom_000", "phantom_001", "phantom_002", "phantom_003"]
    for model in ("tiny_fcn", "tiny_tri"):
        for k, split in enumerate(splits):
            run = rep / "runs" / model / f"fold{k}"
            saved = json.loads((run / "splits.json").read_text())
            assert sorted(c["name"] for c in saved["val"]) == sorted(split["val"]) and saved["fold"] == k
            assert json.loads((run / "run.json").read_text())["steps"] == 8  # the budget
            for case in split["val"]:
                sidecar = json.loads((rep / "predictions" / model / f"{case}_seg.json").read_text())
                assert Path(sidecar["run"]).name == f"fold{k}" and sidecar["checkpoint"] == "last"
    bundles = [json.loads((rep / "runs" / m / "fold0" / "bundle.json").read_text()) for m in ("tiny_fcn", "tiny_tri")]
    assert bundles[0]["data"]["ct_stats"] == bundles[1]["data"]["ct_stats"]  # one plan for every model


def test_pictures_are_images_with_a_panel_per_model(report):
    _, rep, _ = report
    figures = json.loads((rep / "compare.json").read_text())["figures"]
    assert figures["slices"]["panels"] == ["image", "ground truth", "tiny_fcn", "tiny_tri"]
    with Image.open(rep / "slices.png") as img:
        img.verify()
    with Image.open(rep / "slices.png") as img:
        assert img.size[0] == round(2.6 * 110 * 4)  # 2.6 inches per panel at 110 dpi
        assert len(set(img.convert("RGB").getdata())) > 50  # drawn, not blank
    for name in ("dice.png", "curves.png"):
        with Image.open(rep / name) as img:
            img.verify()
    assert figures["dice"]["models"] == ["tiny_fcn", "tiny_tri"] and figures["dice"]["classes"] == ["liver", "spleen"]


def test_mlflow_holds_a_parent_a_child_per_model_and_the_folds_under_it(report):
    folder, rep, _ = report
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("medseg").experiment_id])
    parents = [r for r in runs if r.data.tags.get("medseg.compare")]
    assert len(parents) == 1
    models = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert set(models) == {"tiny_fcn", "tiny_tri"}
    for run in models.values():
        folds = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == run.info.run_id]
        assert sorted(r.data.tags["medseg.fold"] for r in folds) == ["0", "1"]
        assert "dice" in run.data.metrics and "flops_per_volume" in run.data.metrics


def test_a_rerun_reuses_the_runs_and_another_protocol_is_refused(report, cli, monkeypatch):
    folder, rep, _ = report
    monkeypatch.chdir(folder)
    bundles = write_bundles(folder)
    result = cli("compare", *bundles, "--folds", "2", "--iterations", "9", "-o", "rep", "--progress", "off")
    assert result.exit_code == 2 and "holds another comparison" in result.output  # another budget
    before = (rep / "runs" / "tiny_fcn" / "fold0" / "checkpoint.pt").stat().st_mtime
    # the same protocol from another folder, bundles named by absolute path, tracking off: a continuation
    monkeypatch.chdir(rep)
    result = cli("compare", *(b.resolve() for b in bundles), "--folds", "2", "--iterations", "8", "-o", rep, "--progress", "off",
                 "--tracking", "none")
    assert result.exit_code == 0, result.output
    assert result.output.count("is complete: reused") == 4
    assert (rep / "runs" / "tiny_fcn" / "fold0" / "checkpoint.pt").stat().st_mtime == before
    # again with MLflow: the same parent and model runs continue (no second tree)
    monkeypatch.chdir(folder)
    result = cli("compare", *bundles, "--folds", "2", "--iterations", "8", "-o", "rep", "--progress", "off")
    assert result.exit_code == 0, result.output
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("medseg").experiment_id])
    assert len([r for r in runs if r.data.tags.get("medseg.compare")]) == 1
    assert {r.info.status for r in runs} == {"FINISHED"}
    # the folds of one model are an ensemble
    image = next(Path(json.loads((rep / "compare.json").read_text())["models"][0]["folds"][0]["cases"][0]["image"]).parent.glob("*.nii.gz"))
    result = cli("infer", image, "--run", rep / "runs" / "tiny_fcn", "-o", folder / "ens_seg.nii.gz")
    assert result.exit_code == 0 and "ensemble of 2 runs" in result.output, result.output
    # a run in the folder that was trained otherwise is not silently reused
    saved = rep / "runs" / "tiny_fcn" / "fold0" / "bundle.json"
    bundle = json.loads(saved.read_text())
    bundle["train"]["lr"] = 0.5
    saved.write_text(json.dumps(bundle))
    result = cli("compare", *bundles, "--folds", "2", "--iterations", "8", "-o", "rep", "--progress", "off", "--tracking", "none")
    assert result.exit_code == 2 and "was trained with train.lr = 0.5" in " ".join(result.output.split())


def test_bundles_that_disagree_on_the_protocol_are_refused(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bundles = write_bundles(tmp_path, tri={"spacing": [3.0, 3.0, 3.0]})
    result = cli("compare", *bundles, "--folds", "2", "--iterations", "8", "--tracking", "none")
    assert result.exit_code == 2
    assert "disagree on data.spacing (tiny_fcn [4.0, 4.0, 4.0], tiny_tri [3.0, 3.0, 3.0])" in " ".join(result.output.split())
    assert "--allow-mixed" in result.output and not (tmp_path / "compare").exists()
    bundles = write_bundles(tmp_path, tri={"phantom": {"cases": 5, "seed": 0}})
    result = cli("compare", *bundles, "--folds", "2", "--iterations", "8", "--allow-mixed")
    assert result.exit_code == 2 and "data.phantom" in result.output and "same cases" in result.output
    result = cli("compare", *bundles[:1], "--folds", "2")
    assert result.exit_code == 2 and "--iterations N" in result.output


def test_mistakes_are_refused_before_the_report_folder_is_written(tmp_path, cli, monkeypatch):
    import fcntl
    import os

    monkeypatch.chdir(tmp_path)
    bundles = write_bundles(tmp_path)
    cases = [
        (["-o", bundles[0]], "is a file; the report needs a folder"),
        (["--test-labels", bundles[0]], "--test-labels names the classes of a --test set"),
        (["--set", "data.fold=1"], "data.fold / data.split_file are chosen by medseg compare"),
        ([], "axes must name distinct axes"),  # the tri-planar's own check, which only building the network makes
    ]
    bad_axes = json.loads(bundles[1].read_text())
    bad_axes["model"]["args"]["axes"] = ["axial", "coronl"]
    (tmp_path / "bad_axes.json").write_text(json.dumps(bad_axes))
    for extra, message in cases:
        chosen = [bundles[0], tmp_path / "bad_axes.json"] if not extra else bundles
        result = cli("compare", *chosen, "--folds", "2", "--iterations", "8", "--tracking", "none", *extra)
        assert result.exit_code == 2 and message in " ".join(result.output.split()), (extra, result.output)
        assert len(error_lines := [ln for ln in result.output.splitlines() if ln.startswith("error:")]) == 1, error_lines
        assert not (tmp_path / "compare").exists(), extra
    result = cli("compare", bundles[0], tmp_path / "." / bundles[0].name, "--iterations", "8")
    assert result.exit_code == 2 and "is named twice" in result.output
    # a second compare on a report folder that one is writing
    (tmp_path / "busy").mkdir()
    fd = os.open(tmp_path / "busy" / ".compare.lock", os.O_RDWR | os.O_CREAT)
    os.write(fd, b"pid 1 on elsewhere")
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        result = cli("compare", *bundles, "--folds", "2", "--iterations", "8", "--tracking", "none", "-o", tmp_path / "busy")
    finally:
        os.close(fd)
    assert result.exit_code == 2 and "being written by another medseg compare (pid 1 on elsewhere)" in " ".join(result.output.split())
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == [".compare.lock"]


def test_split_files_must_score_every_case_once(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bundles = write_bundles(tmp_path)
    cases = ["phantom_000", "phantom_001", "phantom_002", "phantom_003"]
    for splits, message in [
        ([{"train": cases[2:], "val": cases[:2]}], "2 case(s) are in no split's validation part (first: phantom_002)"),
        ([{"train": cases[2:], "val": cases[:2]}, {"train": [cases[0], cases[3]], "val": cases[1:3]}],
         "phantom_001 is validated in splits 0 and 1"),
    ]:
        (tmp_path / "split.json").write_text(json.dumps(splits))
        result = cli("compare", *bundles, "--split", tmp_path / "split.json", "--iterations", "8", "--tracking", "none")
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
        assert not (tmp_path / "compare" / "runs").exists()  # refused before any training
    result = cli("compare", *bundles, "--split", tmp_path / "split.json", "--folds", "3", "--iterations", "8")
    assert result.exit_code == 2 and "leave out --folds" in result.output


def test_allow_mixed_records_what_differs(tmp_path):
    from medseg.compare.protocol import check_protocol, load_entries

    entries = load_entries(write_bundles(tmp_path, tri={"labels": ["liver"]}), [], data=None, iterations=8, minutes=None, test=False)
    assert check_protocol(entries, allow_mixed=True) == {"data.labels": {"tiny_fcn": ["liver", "spleen"], "tiny_tri": ["liver"]}}


def test_test_set_protocol_trains_on_every_case_and_scores_the_named_classes(tmp_path, cli, monkeypatch):
    """--test: one run per model on every case, scored on another labelled set; a test set that names
    fewer classes than the models predict (msd_spleen_8 names only the spleen) is scored on those."""
    from medseg.data.phantom import write_phantom

    monkeypatch.chdir(tmp_path)
    held_out = write_phantom(tmp_path / "held_out", 1, seed=7)
    (tmp_path / "names.json").write_text(json.dumps({"1": "liver"}))  # the phantom codes liver 1
    bundles = write_bundles(tmp_path)
    result = cli("compare", bundles[0], "--iterations", "4", "--test", held_out, "--test-labels", tmp_path / "names.json",
                 "--tracking", "none", "--progress", "off", "-o", "rep")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "rep" / "compare.json").read_text())
    (model,) = data["models"]
    assert set(model["original"]["per_class"]) == {"background", "liver"}
    assert set(model["training_spacing"]["per_class"]) == {"background", "liver"}
    assert [f["run"] for f in model["folds"]] == [str(tmp_path / "rep" / "runs" / "tiny_fcn" / "all")]
    saved = json.loads((tmp_path / "rep" / "runs" / "tiny_fcn" / "all" / "splits.json").read_text())
    assert len(saved["train"]) == 4 and saved["val"] == saved["train"]  # every case trains
    assert sorted(p.name for p in (tmp_path / "rep" / "predictions" / "tiny_fcn").glob("*.nii.gz")) == ["phantom_000_seg.nii.gz"]
    assert data["protocol"]["folds"] is None and "scored on the --test set" in " ".join(data["notes"])
    result = cli("compare", bundles[0], "--iterations", "4", "--test", held_out, "--folds", "3")
    assert result.exit_code == 2 and "leave out --folds" in result.output
