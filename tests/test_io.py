import gzip
import os
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import write_dicom_series
from hypothesis import given, settings
from hypothesis import strategies as st

from medseg.data.io import check_3d, load_array, read_image, spacing_of, write_nifti
from medseg.data.phantom import make_case
from medseg.errors import DataError


def test_nifti_round_trip_keeps_geometry(tmp_path):
    case = make_case(seed=3, index=1)  # an LPS-stored case with anisotropic spacing
    path = write_nifti(case.image, tmp_path / "ct.nii.gz")
    back = read_image(path)
    assert back.shape == case.image.shape
    np.testing.assert_allclose(back.affine, case.image.affine, atol=1e-5)
    assert nib.aff2axcodes(back.affine) == ("L", "P", "S")
    np.testing.assert_array_equal(np.asarray(back.dataobj), np.asarray(case.image.dataobj))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary file left behind"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600


def tag_geometry(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Affine (RAS+) and HU volume computed straight from the files' tags with pydicom, as the DICOM
    standard defines them, independently of medseg: slices ordered along the normal of
    ImageOrientationPatient, the first slice's ImagePositionPatient the origin, PixelSpacing
    [between rows, between columns], stored value * RescaleSlope + RescaleIntercept, LPS -> RAS."""
    slices = [pydicom.dcmread(f) for f in files]
    iop = np.array(slices[0].ImageOrientationPatient, dtype=float)
    row, col = iop[:3], iop[3:]
    slices.sort(key=lambda d: float(np.dot(np.cross(row, col), np.array(d.ImagePositionPatient, dtype=float))))
    first, last = (np.array(d.ImagePositionPatient, dtype=float) for d in (slices[0], slices[-1]))
    between_rows, between_columns = (float(v) for v in slices[0].PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = row * between_columns, col * between_rows
    lps[:3, 2], lps[:3, 3] = (last - first) / (len(slices) - 1), first
    hu = np.stack([d.pixel_array.T * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in slices], axis=-1)
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, hu


def small_volume(seed: int, shape=(12, 10, 8), affine=None) -> nib.Nifti1Image:
    data = np.random.default_rng(seed).integers(-1000, 1500, shape).astype(np.int16)
    return nib.Nifti1Image(data, np.diag([0.8, 0.7, 3.0, 1.0]) if affine is None else affine)


def same_image(a: nib.Nifti1Image, b: nib.Nifti1Image) -> bool:
    """Same voxels at the same world positions, whatever the storage order (DICOM has no
    handedness: a left-handed NIfTI comes back with its slices in the other order). Each voxel of
    ``b`` is mapped through the affines to its voxel in ``a``; the map must be a one-to-one flip or
    permutation of the grid."""
    to_a = np.linalg.inv(a.affine) @ b.affine
    if np.prod(a.shape) != np.prod(b.shape) or not np.allclose(to_a, np.round(to_a), atol=1e-3):
        return False
    to_a = np.round(to_a).astype(int)
    ijk = np.indices(b.shape).reshape(3, -1)
    in_a = to_a[:3, :3] @ ijk + to_a[:3, 3:]
    if (in_a < 0).any() or (in_a >= np.array(a.shape)[:, None]).any():
        return False
    return np.array_equal(np.asarray(a.dataobj)[tuple(in_a)], np.asarray(b.dataobj).reshape(-1))


def test_real_scanner_series_matches_its_tags(shared_data):
    """GE scanner DICOM, read by medseg, against geometry and HU computed from the tags with pydicom."""
    folder = shared_data / "dicom_ct_3slice" / "series"
    img = read_image(folder)
    affine, hu = tag_geometry(sorted(folder.glob("*.dcm")))
    assert img.shape == (512, 512, 3)
    np.testing.assert_allclose(img.affine, affine, atol=1e-4)
    np.testing.assert_allclose(img.affine[:3, 3], [235.199997, 226.800003, -128.690002], atol=1e-4)  # 03.dcm, LPS -> RAS
    np.testing.assert_allclose(spacing_of(img.affine), [0.810547, 0.810547, 1.0], atol=1e-5)
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    np.testing.assert_array_equal(np.asarray(img.dataobj), hu)
    data = np.asarray(img.dataobj)
    assert np.all(np.abs(data[256, 20, :] + 1000) < 20)  # air in front of the patient is -1000 HU (stored ~24: intercept -1024)
    assert data[0, 0, 0] == -3024  # outside the reconstruction circle, as the scanner marks it
    meta = img.extra["dicom"]
    assert meta["series_uid"] == pydicom.dcmread(folder / "01.dcm").SeriesInstanceUID
    assert (meta["modality"], meta["slices"], meta["note"]) == ("CT", 3, None)


def minimal_rtstruct(path: Path, study_uid: str) -> str:
    """An RT Structure Set with no contours: a non-image object as a planning system leaves it."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, RTStructureSetStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = RTStructureSetStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = RTStructureSetStorage, meta.MediaStorageSOPInstanceUID, "RTSTRUCT"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber = study_uid, generate_uid(), 99
    ds.StructureSetLabel, ds.StructureSetROISequence, ds.ROIContourSequence = "organs", [], []
    ds.save_as(path, enforce_file_format=True)
    return ds.SeriesInstanceUID


def test_folder_with_seg_and_rtstruct_reads_the_ct_and_says_so(shared_data, tmp_path):
    src = shared_data / "dicom_ct_3slice"
    folder = tmp_path / "mixed"
    folder.mkdir()
    for f in sorted((src / "series").glob("*.dcm")):
        shutil.copy(f, folder / f"ct_{f.name}")
    shutil.copy(src / "liver_seg.dcm", folder / "00_liver_seg.dcm")  # sorts first
    ct_uid = pydicom.dcmread(src / "series" / "01.dcm").SeriesInstanceUID
    rt_uid = minimal_rtstruct(folder / "01_rtstruct.dcm", pydicom.dcmread(src / "series" / "01.dcm").StudyInstanceUID)
    (folder / "README.txt").write_text("exported by PACS")

    img = read_image(folder)
    assert img.shape == (512, 512, 3)
    meta = img.extra["dicom"]
    assert meta["series_uid"] == ct_uid and meta["slices"] == 3
    note = meta["note"]
    assert ct_uid in note and "SEG" in note and "RTSTRUCT" in note and "non-DICOM" in note and "\n" not in note
    np.testing.assert_array_equal(np.asarray(img.dataobj), np.asarray(read_image(src / "series").dataobj))

    seg_uid = pydicom.dcmread(src / "liver_seg.dcm").SeriesInstanceUID
    with pytest.raises(DataError, match=f"{seg_uid} is SEG, not a CT image series; CT series here: {ct_uid} \\(3 slices\\)"):
        read_image(folder, series_uid=seg_uid)
    with pytest.raises(DataError, match=f"{rt_uid} is RTSTRUCT"):
        read_image(folder, series_uid=rt_uid)
    with pytest.raises(DataError, match=f"no series with SeriesInstanceUID 1.2.3; CT series here: {ct_uid} \\(3 slices\\)"):
        read_image(folder, series_uid="1.2.3")
    for f in folder.glob("ct_*"):
        f.unlink()
    with pytest.raises(DataError, match="no CT image series in this folder \\(found only 1 RTSTRUCT file, 1 SEG file, 1 non-DICOM file\\)"):
        read_image(folder)


def test_folder_with_a_scout_reads_the_larger_series_and_says_so(tmp_path):
    folder = tmp_path / "study"
    volume = small_volume(0)
    write_dicom_series(volume, folder, series_uid="1.2.826.0.1.3680043.8.498.1", description="abdomen 3mm")
    scout_affine = np.array([[0.0, 0, 1.5, -20], [1.5, 0, 0, -30], [0, 2.0, 0, 40], [0, 0, 0, 1]])  # coronal, 2 slices
    scout = small_volume(1, (16, 20, 2), scout_affine)
    write_dicom_series(scout, folder, series_uid="1.2.826.0.1.3680043.8.498.2", description="topogram", prefix="scout")

    img = read_image(folder)
    meta = img.extra["dicom"]
    assert (meta["series_uid"], meta["description"], meta["slices"]) == ("1.2.826.0.1.3680043.8.498.1", "abdomen 3mm", 8)
    assert "the one with the most slices" in meta["note"] and "1.2.826.0.1.3680043.8.498.2 ('topogram', 2 slices)" in meta["note"]
    assert same_image(img, volume)

    picked = read_image(folder, series_uid="1.2.826.0.1.3680043.8.498.2")
    assert picked.extra["dicom"]["slices"] == 2 and "as asked" in picked.extra["dicom"]["note"]
    assert "1.2.826.0.1.3680043.8.498.1 ('abdomen 3mm', 8 slices)" in picked.extra["dicom"]["note"]
    assert same_image(picked, scout)
    with pytest.raises(DataError, match="selects a series in a DICOM folder"):
        read_image(write_nifti(volume, tmp_path / "ct.nii.gz"), series_uid="1.2.826.0.1.3680043.8.498.1")


def test_missing_slice_fails_naming_the_gap(tmp_path):
    folder = write_dicom_series(small_volume(2, (8, 8, 10)), tmp_path / "series")
    (folder / "slice005.dcm").unlink()
    with pytest.raises(DataError, match=r"not evenly spaced .*: slice004.dcm at 12.00 mm and slice006.dcm at 18.00 mm .* are 6.00 mm apart, "
                                        r"expected 3.00 mm"):
        read_image(folder)


def test_duplicate_and_sheared_slices_are_refused(tmp_path):
    folder = write_dicom_series(small_volume(3, (8, 8, 6)), tmp_path / "dup")
    shutil.copy(folder / "slice002.dcm", folder / "slice002_copy.dcm")
    with pytest.raises(DataError, match="0.00 mm apart, expected 3.00 mm"):
        read_image(folder)
    tilted = np.diag([0.8, 0.8, 3.0, 1.0])
    tilted[1, 2] = 3.0 * np.tan(np.radians(15))  # gantry tilt: each slice shifted along y
    with pytest.raises(DataError, match="is sheared: slices shift 4.02 mm sideways"):
        read_image(write_dicom_series(small_volume(3, (8, 8, 6), tilted), tmp_path / "tilted"))


@pytest.mark.parametrize("damage", ["pixels", "header", "garbage"])
def test_damaged_slice_fails_naming_the_file(tmp_path, damage):
    folder = write_dicom_series(small_volume(4, (8, 8, 10)), tmp_path / "series")
    victim = folder / "slice004.dcm"
    raw = victim.read_bytes()
    victim.write_bytes({"pixels": raw[:-40], "header": raw[:300], "garbage": b"\0" * 64}[damage])
    with pytest.raises(DataError, match=f"{victim}: .*(corrupt or truncated)"):
        read_image(folder)


def test_enormous_header_with_tiny_data_is_refused(tmp_path):
    header = nib.Nifti1Header()
    header.set_data_shape((30000, 30000, 30000))
    header.set_data_dtype(np.int16)
    header["vox_offset"] = 352
    raw = header.binaryblock + b"\0" * 4 + b"\1" * 1000
    for name, blob in (("huge.nii", raw), ("huge.nii.gz", gzip.compress(raw))):
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(DataError, match=f"{name}: corrupt or truncated: the header's shape \\(30000, 30000, 30000\\) needs 49.1 TiB"):
            load_array(read_image(tmp_path / name), tmp_path / name)


def test_image_larger_than_available_memory_is_refused(tmp_path, monkeypatch):
    import psutil

    path = write_nifti(small_volume(5), tmp_path / "ct.nii.gz")
    img = read_image(path)
    assert load_array(img, path).shape == (12, 10, 8)
    real = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: real._replace(available=4096))
    with pytest.raises(DataError, match=r"ct.nii.gz: loading shape \(12, 10, 8\) needs at least 5.6 KiB, more than the 4.0 KiB"):
        load_array(img, path)


rotations = st.lists(st.floats(-1, 1), min_size=4, max_size=4).filter(lambda q: np.linalg.norm(q) > 0.2)


def oriented_affine(quaternion, spacing, origin, flip: bool) -> np.ndarray:
    """Any rotation, any spacing, either handedness."""
    from scipy.spatial.transform import Rotation

    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_quat(quaternion).as_matrix() * np.asarray(spacing)[None, :]
    affine[:3, 2] *= -1 if flip else 1
    affine[:3, 3] = origin
    return affine


@settings(max_examples=25, deadline=None)
@given(quaternion=rotations, spacing=st.tuples(*[st.floats(0.3, 5.0)] * 3), origin=st.tuples(*[st.floats(-300, 300)] * 3),
       flip=st.booleans(), shape=st.tuples(*[st.integers(2, 6)] * 3), gz=st.booleans(), seed=st.integers(0, 1000))
def test_nifti_round_trip_under_any_geometry(quaternion, spacing, origin, flip, shape, gz, seed):
    img = small_volume(seed, shape, oriented_affine(quaternion, spacing, origin, flip))
    with tempfile.TemporaryDirectory() as tmp:
        path = write_nifti(img, Path(tmp) / ("ct.nii.gz" if gz else "ct.nii"))
        back = read_image(path)
        assert back.shape == shape
        np.testing.assert_allclose(back.affine, img.affine, atol=1e-4 * max(1.0, np.abs(origin).max()))
        np.testing.assert_array_equal(load_array(back, path, dtype=np.int16), np.asarray(img.dataobj))


@settings(max_examples=25, deadline=None)
@given(quaternion=rotations, spacing=st.tuples(st.floats(0.3, 2.0), st.floats(0.3, 2.0), st.floats(0.5, 6.0)),
       origin=st.tuples(*[st.floats(-300, 300)] * 3), flip=st.booleans(), shape=st.tuples(st.integers(2, 6), st.integers(2, 6), st.integers(2, 5)),
       seed=st.integers(0, 1000))
def test_dicom_under_any_orientation_reads_back_with_the_tags_geometry(quaternion, spacing, origin, flip, shape, seed):
    img = small_volume(seed, shape, oriented_affine(quaternion, spacing, origin, flip))
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_dicom_series(img, Path(tmp) / "series")
        back = read_image(folder)
        affine, hu = tag_geometry(sorted(folder.glob("*.dcm")))
        np.testing.assert_allclose(back.affine, affine, atol=1e-4)
        np.testing.assert_array_equal(np.asarray(back.dataobj), hu)
        assert same_image(back, img)  # and it is the volume that was written


def test_empty_dicom_folder(tmp_path):
    with pytest.raises(DataError, match="no DICOM series"):
        read_image(tmp_path)


def test_bad_files_give_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_image(tmp_path / "missing.nii.gz")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(DataError, match="not a NIfTI file"):
        read_image(text)
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(b"this is not a nifti header" * 20))
    with pytest.raises(DataError, match="cannot read NIfTI header"):
        read_image(garbage)
    good = write_nifti(make_case(0, 0).image, tmp_path / "good.nii.gz")
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    img = read_image(truncated)
    with pytest.raises(DataError, match="corrupt or truncated"):
        load_array(img, truncated)


def test_shape_and_nan_checks(tmp_path):
    flat = nib.Nifti1Image(np.zeros((10, 10), np.float32), np.eye(4))
    with pytest.raises(DataError, match="expected a 3D volume"):
        check_3d(flat, "x")
    four_d = nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.float32), np.eye(4))
    with pytest.raises(DataError, match="expected a 3D volume"):
        check_3d(four_d, "x")
    assert check_3d(nib.Nifti1Image(np.zeros((4, 4, 4, 1), np.float32), np.eye(4)), "x") == (4, 4, 4)
    data = np.zeros((4, 4, 4), np.float32)
    data[1, 2, 3] = np.nan
    with pytest.raises(DataError, match="1 voxels are NaN"):
        load_array(nib.Nifti1Image(data, np.eye(4)), "x")
