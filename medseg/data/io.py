"""Read and write CT volumes with their geometry: NIfTI via nibabel, DICOM series via SimpleITK.

Every reader returns a ``nibabel.Nifti1Image`` whose affine maps voxel indices to RAS+ millimetres,
so the rest of medseg handles one kind of image. Failures a user can cause raise
:class:`~medseg.errors.DataError` with one line naming the file.
"""

from __future__ import annotations

import os
import tempfile
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.errors import DataError

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def case_name(path: str | Path) -> str:
    """File name without .nii/.nii.gz (``ct_0001.nii.gz`` -> ``ct_0001``)."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_image(path: str | Path) -> nib.Nifti1Image:
    """A NIfTI file or a DICOM series folder as a 3D image (data not yet loaded for NIfTI)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"no such file or folder: {p}")
    if p.is_dir():
        return read_dicom_series(p)
    if not is_nifti(p):
        raise DataError(f"{p}: not a NIfTI file (.nii or .nii.gz) or a DICOM folder")
    try:
        img = nib.load(str(p))
    except Exception as e:  # nibabel raises several types for a bad header
        raise DataError(f"{p}: cannot read NIfTI header ({type(e).__name__}: {e})") from None
    return nib.Nifti1Image.from_image(img) if not isinstance(img, nib.Nifti1Image) else img


def load_array(img: nib.Nifti1Image, path: str | Path, dtype: type = np.float32) -> np.ndarray:
    """The voxel data, with a clear error for a truncated or corrupt file and for NaN/inf voxels."""
    try:
        data = np.asarray(img.dataobj, dtype=dtype)
    except (EOFError, OSError, zlib.error, ValueError) as e:
        raise DataError(f"{path}: corrupt or truncated image data ({type(e).__name__}: {e})") from None
    if np.issubdtype(data.dtype, np.floating):
        bad = ~np.isfinite(data)
        if bad.any():
            raise DataError(f"{path}: {int(bad.sum())} voxels are NaN or infinite")
    return data


def check_3d(img: nib.Nifti1Image, path: str | Path) -> tuple[int, int, int]:
    """The spatial shape; a trailing singleton 4th axis is allowed, anything else is refused."""
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise DataError(f"{path}: expected a 3D volume, got shape {shape}")
    if min(shape) < 2:
        raise DataError(f"{path}: expected a 3D volume, got shape {shape} (a single slice)")
    return shape  # type: ignore[return-value]


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(s) for s in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]


def same_geometry(a: nib.Nifti1Image, b: nib.Nifti1Image, atol: float = 1e-3) -> bool:
    return a.shape[:3] == b.shape[:3] and np.allclose(a.affine, b.affine, atol=atol)


def read_dicom_series(folder: str | Path) -> nib.Nifti1Image:
    """One DICOM series (the first found in ``folder``) as a RAS+ NIfTI image in HU."""
    import SimpleITK as sitk

    folder = Path(folder)
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise DataError(f"{folder}: no DICOM series found in this folder")
    files = reader.GetGDCMSeriesFileNames(str(folder), series[0])
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else "unreadable"
        raise DataError(f"{folder}: cannot read DICOM series ({first})") from None
    if image.GetDimension() != 3 or image.GetSize()[2] < 2:
        raise DataError(f"{folder}: expected a 3D series, got size {image.GetSize()}")
    return sitk_to_nifti(image)


def sitk_to_nifti(image) -> nib.Nifti1Image:
    """SimpleITK (LPS, array z,y,x) -> nibabel (RAS, array x,y,z) without moving a voxel."""
    import SimpleITK as sitk

    data = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=float)[None, :]
    affine[:3, 3] = image.GetOrigin()
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    return nib.Nifti1Image(data, lps_to_ras @ affine)


def nifti_to_sitk(img: nib.Nifti1Image):
    """nibabel (RAS) -> SimpleITK (LPS); the inverse of :func:`sitk_to_nifti`."""
    import SimpleITK as sitk

    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.affine
    spacing = spacing_of(affine)
    image = sitk.GetImageFromArray(np.asarray(img.dataobj).transpose(2, 1, 0))
    image.SetSpacing(spacing)
    image.SetOrigin(tuple(float(v) for v in affine[:3, 3]))
    image.SetDirection(tuple(float(v) for v in (affine[:3, :3] / np.asarray(spacing)[None, :]).ravel()))
    return image


def temporary_beside(path: Path, suffix: str) -> str:
    """A new empty file next to ``path`` with the permissions a plain ``open()`` would give
    (mkstemp's are 0600, which would make outputs unreadable to the user's group)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return tmp


def write_nifti(img: nib.Nifti1Image, path: str | Path) -> Path:
    """Write atomically: a temporary file beside the target, renamed when complete."""
    path = Path(path)
    tmp = temporary_beside(path, ".nii.gz" if str(path).lower().endswith(".gz") else ".nii")
    try:
        nib.save(img, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
