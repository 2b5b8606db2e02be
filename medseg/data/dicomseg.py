"""DICOM Segmentation objects (DICOM-SEG) with highdicom: write medseg's label map as a SEG that
references the CT series it was computed from, and read a SEG (medseg's or another tool's, such as
dcmqi's) back into a label map.

Writing (:func:`write_dicom_seg`): the label map must lie in the scan's own geometry, the affine
:func:`medseg.data.io.read_image` gave for that DICOM series. Every source slice is mapped to the
label array through the geometry alone (ImagePositionPatient, ImageOrientationPatient and
PixelSpacing in LPS against the NIfTI affine in RAS): each of its pixels must fall on a voxel
centre (within :data:`GRID_TOLERANCE` of a voxel), its rows and columns must run along axes of the
label array, and the slices must cover the label map's slices one to one. Anything else is refused
with one line, never resampled. Choices, made for what PACS viewers read best:

- BINARY segmentation type (the most widely supported), uncompressed explicit VR little endian,
  empty frames omitted;
- one segment per foreground class present in the label map, numbered 1, 2, ... in class-value
  order (DICOM numbers segments consecutively; the numbers are not the class values); an empty
  label map is refused, since a SEG needs at least one segment;
- SegmentLabel is the class name; SegmentedPropertyCategory/Type are SNOMED CT codes for the organs
  medseg knows (``kidney_left`` is Kidney with the modifier Left, ``vertebrae_L1`` is L1 vertebra),
  else the generic Tissue / Tissue; algorithm type AUTOMATIC with medseg, its version and the model
  as the algorithm; the preview's colours as display colours; Manufacturer ``medseg``; new UIDs.

Reading (:func:`read_dicom_seg`): highdicom builds the SEG's volume from its plane positions; with
a ``reference`` (a series folder or an image on the series' grid) the volume is placed onto that
grid, again only where its voxels coincide with the reference's; without one, the label map has the
SEG's own geometry (the span of the slices it holds). Values are segment numbers, with names.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medseg import __version__
from medseg.errors import DataError, MedsegError

__all__ = ["DicomSeg", "property_codes", "read_dicom_seg", "make_dicom_seg", "write_dicom_seg"]

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
LABELMAP_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"
GRID_TOLERANCE = 0.1  # of a voxel: how far a source pixel (or a SEG voxel) may lie from a voxel centre
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS, its own inverse

# class name (lower case, words joined by "_", side and numbers dropped) -> pydicom.sr.codedict codes.SCT name
ORGANS = {
    "liver": "Liver", "spleen": "Spleen", "kidney": "Kidney", "pancreas": "Pancreas", "stomach": "Stomach",
    "gallbladder": "Gallbladder", "gall_bladder": "Gallbladder", "aorta": "Aorta", "esophagus": "Esophagus",
    "oesophagus": "Esophagus", "trachea": "Trachea", "heart": "Heart", "prostate": "Prostate", "duodenum": "Duodenum",
    "colon": "Colon", "small_bowel": "SmallIntestine", "small_intestine": "SmallIntestine", "large_intestine": "LargeIntestine",
    "lung": "Lung", "lung_upper_lobe": "LobeOfLung", "lung_middle_lobe": "LobeOfLung", "lung_lower_lobe": "LobeOfLung",
    "adrenal_gland": "AdrenalGland", "adrenal": "AdrenalGland", "sacrum": "Sacrum", "inferior_vena_cava": "InferiorVenaCava",
    "superior_vena_cava": "SuperiorVenaCava", "portal_vein": "PortalVein", "spinal_cord": "SpinalCord", "brain": "Brain",
    "skull": "Skull", "sternum": "Sternum", "rib": "Rib", "femur": "Femur", "humerus": "Humerus", "scapula": "Scapula",
    "clavicula": "Clavicle", "clavicle": "Clavicle", "vertebra": "Vertebra", "vertebrae": "Vertebra",
    "pulmonary_vein": "PulmonaryVein", "brachiocephalic_trunk": "BrachiocephalicTrunk",
    "common_carotid_artery": "CommonCarotidArtery", "subclavian_artery": "SubclavianArtery", "iliac_artery": "IliacArtery",
    "iliac_vena": "IliacVein", "iliac_vein": "IliacVein", "brachiocephalic_vein": "BrachiocephalicVein",
    "urinary_bladder": "Bladder", "bladder": "Bladder", "thyroid": "Thyroid", "thyroid_gland": "Thyroid",
    "costal_cartilages": "CostalCartilage", "costal_cartilage": "CostalCartilage", "bone": "Bone", "muscle": "Muscle",
}
SIDES = {"left": "Left", "right": "Right"}


@dataclass
class DicomSeg:
    """A DICOM-SEG read back: ``labels`` holds segment numbers (0 where no segment is)."""

    labels: nib.Nifti1Image
    names: dict[int, str]  # segment number -> SegmentLabel, 0 -> "background"
    codes: dict[int, dict[str, Any]]  # segment number -> {"category", "type", "modifier"}: (scheme, value, meaning)
    referenced_series_uid: str | None
    sop_class_uid: str
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# codes


def property_codes(name: str):
    """(category, type, modifier or None, known) for a class name: SNOMED CT codes for organs medseg
    knows, else the generic Tissue / Tissue (known False)."""
    from pydicom.sr.codedict import codes

    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w]
    side = next((SIDES[w] for w in words if w in SIDES), None)
    level = next((w.upper() for w in words if re.fullmatch(r"[ctl]\d{1,2}", w)), None)
    base = "_".join(w for w in words if w not in SIDES and not w.isdigit() and not re.fullmatch(r"[ctls]\d{1,2}", w))
    concept = ORGANS.get(base)
    if concept == "Vertebra" and level and hasattr(codes.SCT, f"{level}Vertebra"):
        concept = f"{level}Vertebra"
    if concept is None:
        return codes.SCT.Tissue, codes.SCT.Tissue, None, False
    modifier = getattr(codes.SCT, side) if side else None
    return codes.SCT.AnatomicalStructure, getattr(codes.SCT, concept), modifier, True


# ---------------------------------------------------------------------------------------------
# the source series and the geometry


def _floats(values) -> np.ndarray:
    return np.asarray([float(v) for v in values], dtype=float)


def source_datasets(series: str | Path | Sequence, series_uid: str | None = None) -> list:
    """The headers (no pixel data) of the series' slices: from a folder (the series ``read_image``
    reads, or ``series_uid``), a list of files, or a list of pydicom datasets."""
    import pydicom

    from medseg.data.io import choose_series, scan_dicom_folder, sorted_slices

    if isinstance(series, (str, Path)):
        folder = Path(series)
        if not folder.is_dir():
            raise DataError(f"{folder}: a DICOM SEG needs the folder of its source series")
        chosen, _ = choose_series(folder, scan_dicom_folder(folder), series_uid)
        files: list = sorted_slices(folder, chosen)
    else:
        files = list(series)
    out = []
    for f in files:
        if isinstance(f, pydicom.Dataset):
            out.append(f)
            continue
        try:
            out.append(pydicom.dcmread(f, stop_before_pixels=True))
        except Exception as e:  # pydicom raises many types for a damaged file
            raise DataError(f"{f}: cannot read DICOM header ({type(e).__name__}: {e})") from None
    if not out:
        raise DataError("no source DICOM slices given for the SEG")
    uids = {str(ds.get("SeriesInstanceUID", "")) for ds in out}
    if len(uids) != 1:
        raise DataError(f"the source slices of a SEG must be one series, got {len(uids)} ({', '.join(sorted(uids))})")
    return out


def _where(ds) -> str:
    name = getattr(ds, "filename", None)
    return Path(name).name if isinstance(name, str) and name else f"instance {ds.get('SOPInstanceUID', '?')}"


def _axis(v: np.ndarray, n: int, what: str, where: str) -> tuple[int, int]:
    """(axis, sign) of a step that must be one voxel along one axis of the label array, accurate
    enough that ``n`` steps stay within GRID_TOLERANCE."""
    r = np.round(v)
    if np.abs(r).sum() != 1 or np.abs(v - r).max() * max(n - 1, 1) > GRID_TOLERANCE:
        raise DataError(f"label map does not match the DICOM series: {where}: one {what} step is {np.round(v, 3).tolist()} "
                        "voxels of the label map, not one voxel along one of its axes (a different grid?)")
    axis = int(np.flatnonzero(r)[0])
    return axis, int(r[axis])


def slice_planes(labels: np.ndarray, affine: np.ndarray, datasets: list) -> np.ndarray:
    """The label map's pixels of every source slice, (slices, Rows, Columns) in the order of
    ``datasets``: pixel (row i, column j) of a slice lies at IPP + j dc R + i dr C (R, C the row and
    column direction cosines of IOP, dr, dc = PixelSpacing) in LPS; ``affine`` maps voxels to RAS.
    Refuses (DataError, one line) anything but an exact one-to-one match of slices and voxels."""
    to_voxel = np.linalg.inv(LPS @ np.asarray(affine, dtype=float))
    shape = labels.shape
    planes = []
    seen: dict[tuple[int, int], str] = {}
    for ds in datasets:
        where = _where(ds)
        missing = [t for t in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns") if t not in ds]
        if missing:
            raise DataError(f"{where}: CT slice without {', '.join(missing)}")
        iop, (dr, dc) = _floats(ds.ImageOrientationPatient), _floats(ds.PixelSpacing)
        rows, cols = int(ds.Rows), int(ds.Columns)
        origin = to_voxel[:3, :3] @ _floats(ds.ImagePositionPatient) + to_voxel[:3, 3]
        col_axis, col_sign = _axis(to_voxel[:3, :3] @ (iop[:3] * dc), cols, "column", where)
        row_axis, row_sign = _axis(to_voxel[:3, :3] @ (iop[3:] * dr), rows, "row", where)
        if col_axis == row_axis:
            raise DataError(f"label map does not match the DICOM series: {where}: rows and columns run along one axis")
        start = np.round(origin)
        if np.abs(origin - start).max() > GRID_TOLERANCE:
            raise DataError(f"label map does not match the DICOM series: {where}: its first pixel lies at voxel "
                            f"{np.round(origin, 2).tolist()} of the label map, not on a voxel centre")
        start = start.astype(int)
        slice_axis = 3 - col_axis - row_axis
        ends = start.copy()
        ends[col_axis] += col_sign * (cols - 1)
        ends[row_axis] += row_sign * (rows - 1)
        if min(start.min(), ends.min()) < 0 or any(max(s, e) >= n for s, e, n in zip(start, ends, shape)):
            raise DataError(f"label map does not match the DICOM series: {where} ({rows} x {cols} pixels) reaches voxels "
                            f"{start.tolist()} to {ends.tolist()}, outside the label map's shape {list(shape)}")
        key = (slice_axis, int(start[slice_axis]))
        if key in seen:
            raise DataError(f"label map does not match the DICOM series: {where} and {seen[key]} fall on the same slice")
        seen[key] = where
        index = [np.full((rows, cols), start[a]) for a in range(3)]
        index[col_axis] = index[col_axis] + col_sign * np.arange(cols)[None, :]
        index[row_axis] = index[row_axis] + row_sign * np.arange(rows)[:, None]
        planes.append(labels[tuple(index)])
    axes = {a for a, _ in seen}
    if len(axes) != 1:
        raise DataError("label map does not match the DICOM series: its slices are not parallel")
    (axis,) = axes
    covered = sorted(k for _, k in seen)
    if covered != list(range(shape[axis])):
        raise DataError(f"label map does not match the DICOM series: its {len(datasets)} slices cover {len(covered)} of the "
                        f"label map's {shape[axis]} slices along its axis {axis}")
    return np.stack(planes)


# ---------------------------------------------------------------------------------------------
# writing


TYPE2_EMPTY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
               "StudyTime", "ReferringPhysicianName")


def make_dicom_seg(labels: nib.Nifti1Image, names: dict[int, str], series: str | Path | Sequence, *,
                   series_uid: str | None = None, model: str | None = None, run: str | None = None,
                   series_description: str | None = None, series_number: int | None = None):
    """The highdicom Segmentation (not yet written) and what it holds: ``{"segments": {number:
    class name}, "class_values": {number: label value}, "series_instance_uid", "sop_instance_uid",
    "referenced_series_uid"}``. See the module docstring for the rules."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from medseg.viz import class_colours

    datasets = [ds.copy() for ds in source_datasets(series, series_uid)]
    data = np.asarray(labels.dataobj)
    data = data[..., 0] if data.ndim == 4 and data.shape[3] == 1 else data
    if data.ndim != 3 or not np.issubdtype(data.dtype, np.integer):
        raise DataError(f"a DICOM SEG needs a 3D integer label map, got shape {tuple(data.shape)} of {data.dtype}")
    present = [int(v) for v in np.unique(data) if v != 0]
    unknown = [v for v in present if v not in names]
    if unknown:
        raise DataError(f"label values {unknown} have no class name")
    if not present:
        raise MedsegError("nothing segmented: no voxel of any class, and a DICOM SEG needs at least one segment; "
                          "no SEG written (use --output-type nifti for an empty label map)")
    for ds in datasets:
        if "FrameOfReferenceUID" not in ds:
            raise DataError(f"{_where(ds)}: no FrameOfReferenceUID, so a SEG cannot be placed in its patient space")
        for keyword in TYPE2_EMPTY:  # type 2 (present, may be empty): anonymised exports often drop them
            if keyword not in ds:
                setattr(ds, keyword, "")
        if "SpecificCharacterSet" in ds and not ds.SpecificCharacterSet:  # empty: the default repertoire
            del ds.SpecificCharacterSet
    planes = slice_planes(data, labels.affine, datasets)
    numbers = np.zeros(max(present) + 1, dtype=np.uint16 if len(present) > 255 else np.uint8)
    numbers[present] = np.arange(1, len(present) + 1)
    frames = numbers[planes]

    model_name = model or "medseg"
    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"medseg {model}" if model else "medseg", family=codes.cid7162.ArtificialIntelligence, version=__version__,
        source="medseg", parameters={"run": run} if run else None)
    descriptions = []
    for number, (value, colour) in enumerate(zip(present, class_colours(len(present))), start=1):
        category, kind, modifier, _ = property_codes(names[value])
        d = hd.seg.SegmentDescription(
            segment_number=number, segment_label=names[value][:64], segmented_property_category=category,
            segmented_property_type=kind, algorithm_type="AUTOMATIC", algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*(float(c) * 255 for c in colour)))
        if modifier is not None:
            d.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                hd.sr.CodedConcept(modifier.value, modifier.scheme_designator, modifier.meaning)]
        descriptions.append(d)
    src = datasets[0]
    if series_number is None:
        source_number = int(src.get("SeriesNumber") or 0)
        series_number = source_number + 1000 if 0 <= source_number < 2**31 - 1001 else 1000
    description = series_description or f"medseg {model_name}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # highdicom's doubts about the source's patient name: copied as it is
            seg = hd.seg.Segmentation(
                source_images=datasets, pixel_array=frames, segmentation_type="BINARY", segment_descriptions=descriptions,
                series_instance_uid=hd.UID(), series_number=series_number, sop_instance_uid=hd.UID(), instance_number=1,
                manufacturer="medseg", manufacturer_model_name=model_name[:64], software_versions=__version__,
                device_serial_number="0", content_label="MEDSEG", content_description=f"medseg {model_name}"[:64],
                series_description=description[:64], omit_empty_frames=True)
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(f"series {src.get('SeriesInstanceUID', '?')}: cannot make a DICOM SEG from it "
                        f"({type(e).__name__}: {first})") from None
    info = {"series_instance_uid": str(seg.SeriesInstanceUID), "sop_instance_uid": str(seg.SOPInstanceUID),
            "referenced_series_uid": str(src.SeriesInstanceUID),
            "segments": {str(n): names[v] for n, v in enumerate(present, start=1)},
            "class_values": {str(n): v for n, v in enumerate(present, start=1)}}
    return seg, info


def write_dicom_seg(labels: nib.Nifti1Image, names: dict[int, str], series: str | Path | Sequence, path: str | Path,
                    **kwargs) -> dict[str, Any]:
    """Write ``labels`` (on the series' grid, values named by ``names``) as a DICOM SEG at ``path``,
    atomically (a temporary file beside it, renamed when complete); keywords go to
    :func:`make_dicom_seg`. Returns what :func:`make_dicom_seg` says the SEG holds."""
    from medseg.data.io import temporary_beside

    seg, info = make_dicom_seg(labels, names, series, **kwargs)
    path = Path(path)
    tmp = temporary_beside(path, ".dcm")
    try:
        seg.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return info


# ---------------------------------------------------------------------------------------------
# reading


def _code(item) -> tuple[str, str, str]:
    return (str(item.CodingSchemeDesignator), str(item.CodeValue), str(item.CodeMeaning))


def _reference_grid(reference, referenced_uid: str | None, frame_of_reference: str | None) -> nib.Nifti1Image:
    if isinstance(reference, nib.spatialimages.SpatialImage):
        return reference
    import pydicom

    from medseg.data.io import read_image, scan_dicom_folder

    folder = Path(reference)
    if not folder.is_dir():
        raise DataError(f"{folder}: the reference of a DICOM SEG is its series' folder (or an image on its grid)")
    found = scan_dicom_folder(folder)
    uid = referenced_uid if referenced_uid in found.series else None
    img = read_image(folder, series_uid=uid) if uid else read_image(folder)
    chosen = found.series[img.extra["dicom"]["series_uid"]]
    ref_for = pydicom.dcmread(chosen.files[0], stop_before_pixels=True, specific_tags=["FrameOfReferenceUID"]).get("FrameOfReferenceUID")
    if frame_of_reference and ref_for and str(ref_for) != frame_of_reference:
        raise DataError(f"{folder}: series {chosen.uid} is in another frame of reference ({ref_for}) than the SEG "
                        f"({frame_of_reference}); it cannot be its reference")
    return img


def place_on_grid(array: np.ndarray, index_to_lps: np.ndarray, affine: np.ndarray, shape: Sequence[int],
                  what: str) -> np.ndarray:
    """``array`` (its voxel (a, b, c) at ``index_to_lps`` @ (a, b, c, 1) in LPS) copied onto the grid
    of ``affine`` (RAS) and ``shape``, voxel for voxel; refused unless every voxel lands on a voxel
    centre of that grid, inside it."""
    t = np.linalg.inv(LPS @ np.asarray(affine, dtype=float)) @ np.asarray(index_to_lps, dtype=float)
    m, offset = t[:3, :3], t[:3, 3]
    r = np.round(m)
    extent = max(max(array.shape) - 1, 1)
    if not (np.abs(r).sum(axis=0) == 1).all() or not (np.abs(r).sum(axis=1) == 1).all() or np.abs(m - r).max() * extent > GRID_TOLERANCE:
        raise DataError(f"{what}: its voxels are not the reference grid's voxels (a step of the SEG is "
                        f"{np.round(m, 3).tolist()} reference voxels): different spacing or orientation")
    if np.abs(offset - np.round(offset)).max() > GRID_TOLERANCE:
        raise DataError(f"{what}: its first voxel lies at voxel {np.round(offset, 2).tolist()} of the reference, "
                        "not on a voxel centre")
    offset = np.round(offset).astype(int)
    out = np.zeros(tuple(int(n) for n in shape), dtype=array.dtype)
    axes = [int(np.flatnonzero(r[:, a])[0]) for a in range(3)]  # the output axis of each input axis
    signs = [int(r[axes[a], a]) for a in range(3)]
    moved = array
    for a in range(3):
        if signs[a] < 0:
            moved = np.flip(moved, axis=a)
    moved = np.transpose(moved, np.argsort(axes))  # output axis k <- input axis axes.index(k)
    starts = [0, 0, 0]
    for a in range(3):
        k, n = axes[a], array.shape[a]
        starts[k] = offset[k] if signs[a] > 0 else offset[k] - (n - 1)
    stops = [s + n for s, n in zip(starts, moved.shape)]
    if min(starts) < 0 or any(e > n for e, n in zip(stops, out.shape)):
        raise DataError(f"{what}: its frames reach voxels {starts} to {[e - 1 for e in stops]}, outside the reference grid "
                        f"of shape {list(out.shape)}")
    out[tuple(slice(s, e) for s, e in zip(starts, stops))] = moved
    return out


def read_dicom_seg(path: str | Path, reference=None) -> DicomSeg:
    """A DICOM SEG as a label map of segment numbers, with names and codes. ``reference``: the
    source series' folder or an image on its grid (e.g. from ``read_image``): the label map then has
    exactly that geometry; None: the SEG's own (the span of its frames, from their plane positions)."""
    import highdicom as hd

    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such file: {path}")
    try:
        seg = hd.seg.segread(path)
    except Exception as e:  # pydicom / highdicom raise many types for a file that is not a SEG
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(f"{path}: not a readable DICOM Segmentation ({type(e).__name__}: {first})") from None
    if seg.segmentation_type.value == "FRACTIONAL":
        raise DataError(f"{path}: a FRACTIONAL segmentation (probabilities or occupancy), not a label map")
    notes: list[str] = []
    try:
        try:
            volume = seg.get_volume(combine_segments=True)
        except (ValueError, RuntimeError) as e:
            if "overlap" not in str(e).lower():
                raise
            volume = seg.get_volume(combine_segments=True, skip_overlap_checks=True)
            notes.append(f"{path}: segments overlap; where they do, the label map holds the highest segment number")
    except (ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(f"{path}: its frames do not form a volume ({type(e).__name__}: {first})") from None
    array = np.asarray(volume.array)
    dtype = np.uint8 if array.size == 0 or array.max() <= 255 else np.uint16
    array = array.astype(dtype, copy=False)
    referenced = None
    if "ReferencedSeriesSequence" in seg and len(seg.ReferencedSeriesSequence):
        referenced = str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)
    if reference is None:
        # highdicom's index order is (slice, row, column); nibabel's (x = column, y = row, z = slice)
        swap = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)
        labels = nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), LPS @ volume.affine @ swap)
    else:
        grid = _reference_grid(reference, referenced, str(seg.get("FrameOfReferenceUID", "") or "") or None)
        data = place_on_grid(array, volume.affine, grid.affine, grid.shape[:3], str(path))
        labels = nib.Nifti1Image(data, grid.affine)
    labels.set_sform(labels.affine, code=1)
    labels.set_qform(labels.affine, code=1)
    names, codes = {0: "background"}, {}
    for item in seg.SegmentSequence:
        n = int(item.SegmentNumber)
        names[n] = str(item.get("SegmentLabel", "") or f"segment {n}")
        kind = item.SegmentedPropertyTypeCodeSequence[0]
        modifier = kind.get("SegmentedPropertyTypeModifierCodeSequence")
        codes[n] = {"category": _code(item.SegmentedPropertyCategoryCodeSequence[0]), "type": _code(kind),
                    "modifier": _code(modifier[0]) if modifier else None}
    return DicomSeg(labels, names, codes, referenced, str(seg.SOPClassUID), notes)
