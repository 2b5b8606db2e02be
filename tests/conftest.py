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


@pytest.fixture(scope="session", autouse=True)
def shared_data_stays_untouched(phantom_cache):
    """Fingerprints of ../shared/data go to the session cache even where that folder is writable
    (medseg caches them beside the data otherwise): the tests only ever read it."""
    import medseg.plan as plan

    beside_data = plan.cache_path

    def cache_path(root: Path, digest: str) -> Path:
        if Path(root).resolve().is_relative_to(SHARED_DATA.resolve()):
            return phantom_cache / "fingerprints" / f"fingerprint-{digest}.json"
        return beside_data(root, digest)

    plan.cache_path = cache_path
    yield
    plan.cache_path = beside_data


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


def write_dicom_series(img: nib.Nifti1Image, folder: Path, *, series_uid: str | None = None, description: str = "",
                       prefix: str = "slice", slope: float = 1.0, intercept: float = -1024.0) -> Path:
    """Write a 3D NIfTI image as a DICOM CT series (CT Image Storage, one int16 file per slice) with
    pydicom, not with medseg, so that reading it back with medseg is a real check. The tags follow
    the standard: ImagePositionPatient of slice k is the LPS position of voxel (0, 0, k);
    ImageOrientationPatient holds the LPS directions of the voxel x axis (along a row) and y axis (down
    a column); PixelSpacing is [row spacing (y), column spacing (x)]; stored = (HU - intercept) / slope."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
    from pydicom.valuerep import DSfloat

    def ds_values(values) -> list:
        return [DSfloat(float(v), auto_format=True) for v in values]

    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.affine
    sx, sy, sz = np.linalg.norm(lps[:3, :3], axis=0)
    stored = np.rint((np.asarray(img.dataobj, dtype=np.float64) - intercept) / slope)
    if stored.min() < -32768 or stored.max() > 32767:
        raise ValueError("values do not fit int16 with this slope/intercept")
    series_uid = series_uid or generate_uid()
    study_uid, frame_uid = generate_uid(), generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(img.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID, ds.PatientName = "CT", "medseg-test", "Test^Phantom"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = 1, k + 1, description
        ds.ImagePositionPatient = ds_values(lps[:3, :3] @ [0, 0, k] + lps[:3, 3])
        ds.ImageOrientationPatient = ds_values([*(lps[:3, 0] / sx), *(lps[:3, 1] / sy)])
        ds.PixelSpacing, ds.SliceThickness = ds_values([sy, sx]), DSfloat(float(sz), auto_format=True)
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = DSfloat(slope, auto_format=True), DSfloat(intercept, auto_format=True), "HU"
        ds.Rows, ds.Columns = img.shape[1], img.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).astype("<i2").tobytes()  # rows (y) x columns (x)
        ds.save_as(folder / f"{prefix}{k:03d}.dcm", enforce_file_format=True)
    return folder
