import gzip
import os

import nibabel as nib
import numpy as np
import pytest
from conftest import write_dicom_series

from medseg.data.io import check_3d, load_array, read_dicom_series, read_image, write_nifti
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


def test_dicom_series_reads_as_the_same_volume(tmp_path):
    case = make_case(seed=1, index=0)
    img = nib.Nifti1Image(np.asarray(case.image.dataobj)[::2, ::2, :12], case.image.affine @ np.diag([2, 2, 1, 1]))
    back = read_dicom_series(write_dicom_series(img, tmp_path / "series"))
    np.testing.assert_array_equal(np.asarray(back.dataobj), np.asarray(img.dataobj))
    np.testing.assert_allclose(back.affine, img.affine, atol=1e-3)


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
