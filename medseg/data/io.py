"""Read and write CT volumes with their geometry: NIfTI via nibabel, DICOM series via pydicom + SimpleITK.

Every reader returns a ``nibabel.Nifti1Image`` whose affine maps voxel indices to RAS+ millimetres,
so the rest of medseg handles one kind of image. Failures a user can cause raise
:class:`~medseg.errors.DataError` with one line naming the file. Nothing is guessed silently: a DICOM
folder's choice of series is reported, and a grid that is not what the files claim is refused.
"""

from __future__ import annotations

import errno
import math
import os
import tempfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
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


def read_image(path: str | Path, series_uid: str | None = None) -> nib.Nifti1Image:
    """A NIfTI file or a DICOM series folder as a 3D image (data not yet loaded for NIfTI).
    ``series_uid`` picks one series of a DICOM folder (see :func:`read_dicom_series`)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"no such file or folder: {p}")
    if p.is_dir():
        return read_dicom_series(p, series_uid)
    if series_uid is not None:
        raise DataError(f"{p}: a series UID ({series_uid}) selects a series in a DICOM folder, and this is a file")
    if not is_nifti(p):
        if p.suffix.lower() == ".dcm" or _has_dicom_preamble(p):
            raise DataError(f"{p}: a single DICOM file; give the folder of its series ({p.parent})")
        raise DataError(f"{p}: not a NIfTI file (.nii or .nii.gz) or a DICOM folder")
    try:
        img = nib.load(str(p))
    except Exception as e:  # nibabel raises several types for a bad header
        raise DataError(f"{p}: cannot read NIfTI header ({type(e).__name__}: {e})") from None
    check_data_size(img, p)
    return nib.Nifti1Image.from_image(img) if not isinstance(img, nib.Nifti1Image) else img


# Deflate cannot expand data more than ~1032 times (a 258-byte match per 2-bit code), whatever the
# number of gzip members, so a .nii.gz of N bytes holds at most this many bytes of header + voxels.
# (The gzip ISIZE trailer is not used: it is the size modulo 4 GiB of the last member only.)
MAX_DEFLATE_RATIO = 1040


def _has_dicom_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _short_list(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def check_data_size(img: nib.spatialimages.SpatialImage, path: Path) -> None:
    """Refuse a header whose shape needs more voxel bytes than the file can hold, before anything
    allocates them (a corrupt 30000^3 header would otherwise end in MemoryError)."""
    header = img.header
    shape = tuple(int(n) for n in header.get_data_shape())
    need = int(header.get_data_offset()) + math.prod(shape) * header.get_data_dtype().itemsize
    size = path.stat().st_size
    gz = str(path).lower().endswith(".gz")
    room = size * MAX_DEFLATE_RATIO if gz else size
    if need > room:
        holds = f"a {human_bytes(size)} gzip file holds at most {human_bytes(room)}" if gz else f"the file has {human_bytes(size)}"
        raise DataError(f"{path}: corrupt or truncated: the header's shape {shape} needs {human_bytes(need)}, but {holds}")


def human_bytes(n: float) -> str:
    units = ("bytes", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.0f} bytes" if i == 0 else f"{n:.1f} {units[i]}"


def load_array(img: nib.Nifti1Image, path: str | Path, dtype: type = np.float32) -> np.ndarray:
    """The voxel data, with a clear error for a truncated or corrupt file, for an image too big for
    the memory available (checked first: an allocation past it may end in the OOM killer, not an
    exception) and for NaN/inf voxels."""
    check_memory(img, path, dtype)
    try:
        data = np.asarray(img.dataobj, dtype=dtype)
    except (EOFError, OSError, zlib.error, ValueError) as e:
        raise DataError(f"{path}: corrupt or truncated image data ({type(e).__name__}: {e})") from None
    except MemoryError:
        raise DataError(f"{path}: not enough memory to load an image of shape {tuple(img.shape)}") from None
    if np.issubdtype(data.dtype, np.floating):
        bad = ~np.isfinite(data)
        if bad.any():
            raise DataError(f"{path}: {int(bad.sum())} voxels are NaN or infinite")
    return data


def check_memory(img: nib.Nifti1Image, path: str | Path, dtype: type) -> None:
    """Loading holds the stored voxels and their ``dtype`` copy at once: refuse when even that
    lower bound exceeds the memory the system says is available."""
    import psutil

    need = math.prod(int(n) for n in img.shape) * (img.get_data_dtype().itemsize + np.dtype(dtype).itemsize)
    available = psutil.virtual_memory().available
    if need > available:
        raise DataError(f"{path}: loading shape {tuple(img.shape)} needs at least {human_bytes(need)}, "
                        f"more than the {human_bytes(available)} of memory available")


VOXEL_MM = (0.01, 100.0)  # any CT voxel edge lies in here; outside it, the header's units or affine are wrong
MAX_RESAMPLED_VOXELS = 2**31  # 8 GiB as float32: far beyond any body at any sane spacing


def check_grid(img: nib.Nifti1Image, path: str | Path, target_spacing=None) -> None:
    """Refuse voxel sizes no CT has (a header in metres or microns) and a resampling to
    ``target_spacing`` that would make an impossibly large volume, before anything is allocated."""
    zooms = spacing_of(img.affine)
    if not all(VOXEL_MM[0] <= z <= VOXEL_MM[1] for z in zooms):
        sizes = " x ".join(f"{z:g}" for z in zooms)
        raise DataError(f"{path}: voxel size {sizes} mm is not that of a CT ({VOXEL_MM[0]:g} to {VOXEL_MM[1]:g} mm); "
                        "check the header's units and affine")
    if target_spacing is not None:
        shape = [int(n) for n in img.shape[:3]]
        voxels = math.prod(n * z / t for n, z, t in zip(shape, zooms, target_spacing))
        if voxels > MAX_RESAMPLED_VOXELS:
            raise DataError(f"{path}: resampled to {list(target_spacing)} mm it would have {voxels:,.0f} voxels "
                            f"(at most {MAX_RESAMPLED_VOXELS:,}); check its voxel size and data.spacing")


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


CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"  # single-frame CT slices; everything else is reported and skipped
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR
DICOM_TAGS = ["SOPClassUID", "Modality", "SeriesInstanceUID", "SeriesDescription", "ImagePositionPatient",
              "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns"]
SPACING_TOLERANCE = 0.01  # of the median slice spacing: a missing slice is off by 100 %


@dataclass
class DicomSeries:
    """The CT slice files of one SeriesInstanceUID in a folder, with their headers."""

    uid: str
    description: str
    modality: str
    files: list[Path] = field(default_factory=list)
    headers: list = field(default_factory=list)

    def describe(self) -> str:
        desc = f"'{self.description}', " if self.description else ""
        return f"{self.uid} ({desc}{len(self.files)} slice{'s' if len(self.files) != 1 else ''})"


@dataclass
class DicomFolder:
    series: dict[str, DicomSeries]  # CT image series by UID
    ignored: dict[str, str]  # UID of every other DICOM object -> what it is ("SEG", "RTSTRUCT", ...)
    ignored_files: Counter  # what each ignored file is -> count

    def summary(self) -> str:
        return ", ".join(f"{n} {kind} file{'s' if n != 1 else ''}" for kind, n in sorted(self.ignored_files.items()))


def read_dicom_series(folder: str | Path, series_uid: str | None = None) -> nib.Nifti1Image:
    """One CT series of ``folder`` as a RAS+ NIfTI image in HU (rescale slope/intercept applied).

    Only single-frame CT image slices are candidates (SEG, RTSTRUCT, SR, dose screenshots ... are
    skipped); of several, ``series_uid`` picks one, else the one with the most slices. The slices
    must lie on a uniform grid and every file must be readable. ``img.extra["dicom"]`` tells what
    was read: series_uid, description, modality, slices, and ``note`` (one line for the user naming
    the other series and objects present; None when the folder held nothing else).
    """
    folder = Path(folder)
    found = scan_dicom_folder(folder)
    chosen, note = choose_series(folder, found, series_uid)
    image = read_slices(folder, sorted_slices(folder, chosen))
    img = sitk_to_nifti(image)
    img.extra["dicom"] = {"series_uid": chosen.uid, "description": chosen.description, "modality": chosen.modality,
                          "slices": len(chosen.files), "note": note}
    return img


def scan_dicom_folder(folder: Path) -> DicomFolder:
    """Read the header of every file in ``folder`` (not its subfolders). A file that starts like
    DICOM (or is named .dcm) but cannot be parsed is an error, not something to skip: it may be a
    slice of the series, and reading around it would build a wrong grid."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.uid import UID

    found = DicomFolder({}, {}, Counter())
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=DICOM_TAGS)
        except InvalidDicomError:
            if path.suffix.lower() == ".dcm":
                raise DataError(f"{path}: not a readable DICOM file (corrupt or truncated)") from None
            found.ignored_files["non-DICOM"] += 1
            continue
        except Exception as e:  # pydicom raises many types for a damaged file
            raise DataError(f"{path}: cannot read DICOM header ({type(e).__name__}: {e})") from None
        sop = str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", ""))
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if sop == MEDIA_STORAGE_DIRECTORY:
            found.ignored_files["DICOMDIR"] += 1
            continue
        if not sop or not uid:
            raise DataError(f"{path}: DICOM file without SOPClassUID or SeriesInstanceUID (corrupt or truncated)")
        modality = str(ds.get("Modality", "") or "no-modality")
        if sop != CT_IMAGE_STORAGE:
            kind = modality if modality != "CT" else f"CT {UID(sop).name}"
            found.ignored[uid] = kind
            found.ignored_files[kind] += 1
            continue
        series = found.series.setdefault(uid, DicomSeries(uid, str(ds.get("SeriesDescription", "") or "").strip(), modality))
        series.files.append(path)
        series.headers.append(ds)
    return found


def choose_series(folder: Path, found: DicomFolder, series_uid: str | None) -> tuple[DicomSeries, str | None]:
    """The series to read and the note that says so (None when the folder held nothing else)."""
    ranked = sorted(found.series.values(), key=lambda s: (-len(s.files), s.uid))
    available = "; CT series here: " + ", ".join(s.describe() for s in ranked) if ranked else ""
    if not ranked:
        subfolders = sorted(d.name + "/" for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
        hint = f"; its subfolders ({_short_list(subfolders)}) are not searched: give the series' own folder" if subfolders else ""
        if not found.ignored_files:
            raise DataError(f"{folder}: no DICOM series found in this folder{hint}")
        raise DataError(f"{folder}: no CT image series in this folder (found only {found.summary()}){hint}")
    if series_uid is None:
        chosen, how = ranked[0], ", the one with the most slices" if len(ranked) > 1 else ""
    elif series_uid in found.series:
        chosen, how = found.series[series_uid], " as asked"
    elif series_uid in found.ignored:
        raise DataError(f"{folder}: series {series_uid} is {found.ignored[series_uid]}, not a CT image series{available}")
    else:
        raise DataError(f"{folder}: no series with SeriesInstanceUID {series_uid}{available}")
    others = [s for s in ranked if s is not chosen]
    if not others and not found.ignored_files:
        return chosen, None
    note = f"{folder}: read DICOM series {chosen.describe()}{how}"
    if others:
        note += "; not read: " + ", ".join(s.describe() for s in others) + " (select one by its SeriesInstanceUID)"
    if found.ignored_files:
        note += f"; ignored {found.summary()} (not CT image slices)"
    return chosen, note


def sorted_slices(folder: Path, series: DicomSeries) -> list[Path]:
    """The series' files in order along the slice normal, after checking that they form one uniform
    grid: same orientation and matrix, evenly spaced (a gap is a missing slice), not sheared."""
    if len(series.files) < 2:
        raise DataError(f"{folder}: expected a 3D series, but series {series.describe()} has a single slice")
    first, ref = series.files[0], series.headers[0]
    for path, ds in zip(series.files, series.headers):
        missing = [t for t in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns") if t not in ds]
        if missing:
            raise DataError(f"{path}: CT slice without {', '.join(missing)} (corrupt or truncated?)")
        same = (ds.Rows, ds.Columns) == (ref.Rows, ref.Columns) and np.allclose(_floats(ds.PixelSpacing), _floats(ref.PixelSpacing), rtol=1e-4)
        if not same or not np.allclose(_floats(ds.ImageOrientationPatient), _floats(ref.ImageOrientationPatient), atol=1e-4):
            raise DataError(f"{path}: orientation, matrix or pixel spacing differs from {first.name} in series {series.uid}")
    row, col = _floats(ref.ImageOrientationPatient)[:3], _floats(ref.ImageOrientationPatient)[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        raise DataError(f"{first}: ImageOrientationPatient {list(row) + list(col)} is not two perpendicular unit vectors")
    normal = np.cross(row, col)
    positions = np.array([_floats(ds.ImagePositionPatient) for ds in series.headers])
    order = np.argsort(positions @ normal, kind="stable")
    files, positions = [series.files[i] for i in order], positions[order]
    along = positions @ normal
    steps = np.diff(along)
    expected = float(np.median(steps))
    if expected <= 1e-3:
        raise DataError(f"{folder}: series {series.uid} has several slices at one position ({files[0].name}, {files[1].name}, ...)")
    bad = np.flatnonzero(np.abs(steps - expected) > SPACING_TOLERANCE * expected)
    if bad.size:
        i = int(bad[0])
        raise DataError(f"{folder}: slices are not evenly spaced in series {series.uid}: {files[i].name} at {along[i]:.2f} mm and "
                        f"{files[i + 1].name} at {along[i + 1]:.2f} mm (along the slice normal) are {steps[i]:.2f} mm apart, "
                        f"expected {expected:.2f} mm (a missing or extra slice?)")
    shift = positions - positions[0] - np.outer(along - along[0], normal)
    drift = float(np.linalg.norm(shift, axis=1).max())
    if drift > 0.1 * min(_floats(ref.PixelSpacing)):
        raise DataError(f"{folder}: series {series.uid} is sheared: slices shift {drift:.2f} mm sideways across the series "
                        f"(gantry tilt?), and only orthogonal grids are read")
    return files


def read_slices(folder: Path, files: list[Path]):
    """The pixel data (HU) and geometry of ordered slice files, read by SimpleITK/GDCM (which also
    decodes compressed transfer syntaxes). When the series fails, each file is tried alone to name
    the damaged one."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    try:
        return reader.Execute()
    except RuntimeError as e:
        for path in files:
            try:
                sitk.ReadImage(str(path))
            except RuntimeError:
                raise DataError(f"{path}: cannot read this DICOM slice (corrupt or truncated pixel data)") from None
        last = str(e).strip().splitlines()[-1] if str(e).strip() else "unreadable"
        raise DataError(f"{folder}: cannot read DICOM series ({last})") from None


def _floats(values) -> np.ndarray:
    return np.asarray([float(v) for v in values], dtype=float)


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


def publish(tmp: str | Path, dest: str | Path, force: bool) -> None:
    """Rename the complete file ``tmp`` to ``dest``. Without ``force`` never replace a file that
    exists by now: a hard link fails if ``dest`` exists, so the check and the rename are one step
    (FileExistsError); on a file system without hard links, check, then rename."""
    dest = Path(dest)
    if force:
        os.replace(tmp, dest)
        return
    try:
        os.link(tmp, dest)
    except OSError as e:
        if isinstance(e, FileExistsError) or e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV):
            raise
        if dest.exists():
            raise FileExistsError(errno.EEXIST, "file exists", str(dest)) from None
        os.rename(tmp, dest)
        return
    os.unlink(tmp)


def write_text_atomic(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
