"""Shared fixtures: a session phantom cache, the real CT folder (skip when absent), a CLI runner."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def phantom_cache(tmp_path_factory) -> Path:
    """Phantom cases are written once per session, never into the user's ~/.cache."""
    path = tmp_path_factory.mktemp("medseg-cache")
    old = os.environ.get("MEDSEG_CACHE")
    os.environ["MEDSEG_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("MEDSEG_CACHE", None)
    else:
        os.environ["MEDSEG_CACHE"] = old


@pytest.fixture(autouse=True)
def no_global_tracking(monkeypatch):
    """A test decides its own tracking store; never write to one named by the environment."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """Run in a scratch folder so runs/ and mlflow.db land there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "ct_abdomen_3mm" / "image.nii.gz").is_file():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


@pytest.fixture
def cli():
    from medseg.cli import app

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args])

    return invoke


def write_case(folder: Path, name: str, image: np.ndarray, label: np.ndarray, affine=None, label_affine=None) -> None:
    """A case in Decathlon layout under ``folder``."""
    affine = np.diag([2.0, 2.0, 3.0, 1.0]) if affine is None else affine
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, affine), folder / "imagesTr" / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(label, affine if label_affine is None else label_affine), folder / "labelsTr" / f"{name}.nii.gz")


def tiny_case(seed: int = 0, shape=(40, 36, 20)) -> tuple[np.ndarray, np.ndarray]:
    """A body-like ellipse with one bright blob labeled 1: enough for error-path tests."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    image = np.where(x**2 + y**2 < 0.8, 40.0, -1000.0) + rng.normal(0, 10, shape)
    label = ((x - 0.2) ** 2 + y**2 + z**2 < 0.15).astype(np.uint8)
    image[label == 1] = 150.0
    return image.astype(np.int16), label


def write_dicom_series(img: nib.Nifti1Image, folder: Path) -> Path:
    """Write a 3D NIfTI image as a DICOM CT series (one file per slice) with SimpleITK."""
    import SimpleITK as sitk

    from medseg.data.io import nifti_to_sitk

    volume = nifti_to_sitk(img)
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.1"
    direction = volume.GetDirection()
    for z in range(volume.GetDepth()):
        sl = volume[:, :, z]
        tags = {
            "0008|0060": "CT", "0020|000d": uid, "0020|000e": uid + ".1", "0020|0013": str(z + 1),
            "0020|0032": "\\".join(str(v) for v in volume.TransformIndexToPhysicalPoint((0, 0, z))),
            "0020|0037": "\\".join(str(v) for v in (direction[0], direction[3], direction[6], direction[1], direction[4], direction[7])),
            "0028|0030": f"{volume.GetSpacing()[1]}\\{volume.GetSpacing()[0]}", "0018|0050": str(volume.GetSpacing()[2]),
        }
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{z:03d}.dcm"))
        writer.Execute(sl)
    return folder
