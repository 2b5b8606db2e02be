"""The command line: bad input gives one clear line, exit status 2, and no run marked complete."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_case, write_case

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"


def error_lines(result) -> list[str]:
    text = result.stderr if hasattr(result, "stderr") else result.output
    return [line for line in text.splitlines() if line.startswith("error:")]


def assert_one_line_error(result, needle: str, workdir: Path) -> None:
    assert result.exit_code == 2, result.output
    lines = error_lines(result)
    assert len(lines) == 1 and needle in lines[0], result.output
    assert "Traceback" not in result.output
    complete = [p for p in (workdir / "runs").glob("*/run.json") if json.loads(p.read_text())["status"] == "complete"] \
        if (workdir / "runs").exists() else []
    assert not complete


def dataset(workdir: Path, problem: str) -> Path:
    img, lab = tiny_case()
    img = img.astype(np.float32)
    folder = workdir / f"data_{problem}"
    if problem == "corrupt":
        write_case(folder, "a", img, lab)
        path = folder / "imagesTr" / "a.nii.gz"
        path.write_bytes(path.read_bytes()[:400])
    elif problem == "shape":
        write_case(folder, "a", img, lab[:, :-2, :])
    elif problem == "2d":
        write_case(folder, "a", img[:, :, 0], lab[:, :, 0])
    elif problem == "nan":
        img[5, 5, 5] = np.nan
        write_case(folder, "a", img, lab)
    elif problem == "empty":
        folder.mkdir()
    return folder


@pytest.mark.parametrize("problem, needle", [
    ("corrupt", "a.nii.gz"),
    ("shape", "image shape (40, 36, 20) != label shape (40, 34, 20)"),
    ("2d", "expected a 3D volume"),
    ("nan", "1 voxels are NaN"),
    ("empty", "no cases found"),
])
def test_bad_data_is_one_line(problem, needle, workdir, cli):
    source = dataset(workdir, problem)
    result = cli("train", BUNDLES / "unetr.json", "--tracking", "none", "--no-progress",
                 "--set", f"data.source={source}", "--set", 'data.labels=["blob"]')
    assert_one_line_error(result, needle, workdir)
    assert not (workdir / "runs").exists(), "no run directory for input that never trained"


def test_unknown_model_and_key_are_one_line(workdir, cli):
    result = cli("train", BUNDLES / "unetr.json", "--set", "model.name=unet_r")
    assert_one_line_error(result, "unknown model 'unet_r'; did you mean 'unetr'?", workdir)
    result = cli("train", BUNDLES / "unetr.json", "--set", "train.learning_rate=0.1")
    assert_one_line_error(result, "unknown bundle key 'train.learning_rate'", workdir)
    result = cli("train", workdir / "nope.json")
    assert_one_line_error(result, "bundle not found", workdir)
    result = cli("train", BUNDLES / "unetr.json", "--set", "model.args.hiden_size=96")
    assert_one_line_error(result, "did you mean 'hidden_size'", workdir)


def test_resume_errors(workdir, cli):
    result = cli("train", "--resume")
    assert_one_line_error(result, "--resume needs --run-dir", workdir)
    result = cli("train", "--resume", "--run-dir", workdir)
    assert_one_line_error(result, "not a medseg run directory", workdir)


def test_entry_point_prints_one_line_and_exits_2(workdir):
    """Through the installed console script, as a user runs it."""
    exe = Path(sys.executable).with_name("medseg")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "medseg.cli"]
    proc = subprocess.run(cmd + ["train", str(BUNDLES / "vnet.json"), "--set", "train.epoch=1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: unknown bundle key 'train.epoch'; did you mean 'epochs'?"]


def test_models_and_synth_commands(workdir, cli):
    result = cli("models")
    assert result.exit_code == 0
    for name in ("vnet", "unetr", "swin_unetr", "fcn2d"):
        assert name in result.output
    result = cli("synth", workdir / "ph", "--cases", "2", "--seed", "4")
    assert result.exit_code == 0, result.output
    meta = json.loads((workdir / "ph" / "dataset.json").read_text())
    assert meta["numTraining"] == 2 and meta["labels"]["1"] == "liver"
    assert len(list((workdir / "ph" / "imagesTr").glob("*.nii.gz"))) == 2
