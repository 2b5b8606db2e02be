"""DICOM-SEG output: medseg's label map written as a DICOM Segmentation referencing its CT series
(highdicom), and read back. Every check of a written SEG goes through pydicom and highdicom's own
frame-to-source-instance mapping, against what the test itself knows of each source file (the
conftest writer puts slice k of its volume, pixel [row, column] = volume[column, row, k], into
file slice{k:03d}.dcm), never through medseg's geometry code."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import write_dicom_series

from medseg import __version__
from medseg.data import dicomseg
from medseg.data.dicomseg import read_dicom_seg, write_dicom_seg
from medseg.data.io import read_image
from medseg.errors import DataError, MedsegError

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
NAMES = {0: "background", 1: "liver", 2: "kidney_left", 3: "spleen", 4: "bright blob", 5: "kidney_right"}
ABSENT = 3  # spleen: a class of the run with no voxel, so no segment
EXPECTED_CODES = {"liver": ("SCT", "10200004", None), "kidney_left": ("SCT", "64033007", "7771000"),
                  "kidney_right": ("SCT", "64033007", "24028007"), "bright blob": ("SCT", "85756007", None)}


def rotation(*angles_deg) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_euler("xyz", angles_deg, degrees=True).as_matrix()


def affine_of(matrix, spacing, origin) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = np.asarray(matrix, dtype=float) * np.asarray(spacing, dtype=float)[None, :]
    a[:3, 3] = origin
    return a


GEOMETRIES = {  # the volume the conftest writer turns into slices: shapes and spacings differ per axis, to catch transposes
    "ras": affine_of(np.eye(3), (1.5, 2.0, 3.0), (-20.0, 10.0, 5.0)),
    "lps-flipped": affine_of(np.diag([-1.0, -1.0, -1.0]), (0.8, 1.1, 2.5), (30.0, -12.0, 70.0)),  # slices written top-down
    "oblique": affine_of(rotation(20, -15, 35), (1.2, 0.9, 2.0), (5.0, -40.0, 12.0)),
}
SHAPE = (9, 7, 5)


def ct_volume(affine, shape=SHAPE, seed=0) -> nib.Nifti1Image:
    rng = np.random.default_rng(seed)
    return nib.Nifti1Image(rng.integers(-200, 300, shape).astype(np.int16), affine)


def random_labels(shape, seed=1) -> np.ndarray:
    """Every present class in every slice, no symmetry: a flipped row or a swapped slice shows."""
    rng = np.random.default_rng(seed)
    labels = rng.choice([0, 1, 2, 4, 5], size=shape, p=[0.4, 0.2, 0.15, 0.15, 0.1]).astype(np.uint8)
    assert not (labels == ABSENT).any()
    return labels


def on_grid(labels: np.ndarray, affine: np.ndarray, target: nib.Nifti1Image) -> np.ndarray:
    """``labels`` (on ``affine``) at the voxel centres of ``target``, by world coordinates, exact voxels only."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in target.shape[:3]], indexing="ij"), axis=-1).reshape(-1, 3)
    world = ijk @ target.affine[:3, :3].T + target.affine[:3, 3]
    inv = np.linalg.inv(affine)
    src = world @ inv[:3, :3].T + inv[:3, 3]
    idx = np.round(src).astype(int)
    assert np.abs(src - idx).max() < 1e-3, "the grids do not share voxel centres"
    assert (idx >= 0).all() and (idx < labels.shape).all()
    return labels[tuple(idx.T)].reshape(target.shape[:3])


def segment_values(ds, names: dict[int, str]) -> np.ndarray:
    """Segment number -> the class value named like its SegmentLabel."""
    by_name = {v: k for k, v in names.items()}
    lut = np.zeros(len(ds.SegmentSequence) + 1, dtype=np.int64)
    for item in ds.SegmentSequence:
        lut[int(item.SegmentNumber)] = by_name[str(item.SegmentLabel)]
    return lut


def per_source_mismatches(seg_path: Path, files: list[Path], expected: list[np.ndarray], names) -> tuple[int, int]:
    """(voxels compared, voxels that differ): highdicom's pixels for each source instance against the
    expected (Rows, Columns) class values of that file."""
    import highdicom as hd

    seg = hd.seg.segread(seg_path)
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    pixels = seg.get_pixels_by_source_instance(uids, combine_segments=True, assert_missing_frames_are_empty=True)
    got = segment_values(seg, names)[pixels]
    want = np.stack(expected)
    assert got.shape == want.shape
    return int(want.size), int((got != want).sum())


def helper_slices(labels_on_written_grid: np.ndarray) -> list[np.ndarray]:
    """What file slice{k:03d}.dcm shows of a volume on the conftest writer's grid."""
    return [labels_on_written_grid[:, :, k].T for k in range(labels_on_written_grid.shape[2])]


# ---------------------------------------------------------------------------------------------
# (1) round trip on synthetic series, three geometries


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_round_trip_any_geometry(tmp_path, geometry):
    ct = ct_volume(GEOMETRIES[geometry])
    folder = write_dicom_series(ct, tmp_path / "series", description="abdomen")
    ref = read_image(folder)
    labels = random_labels(ref.shape)
    out = tmp_path / "seg.dcm"
    info = write_dicom_seg(nib.Nifti1Image(labels, ref.affine), NAMES, folder, out, model="vnet", run="run01")

    ds = pydicom.dcmread(out)
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(folder.glob("*.dcm"))]
    assert ds.SOPClassUID == SEGMENTATION_STORAGE and ds.file_meta.MediaStorageSOPClassUID == SEGMENTATION_STORAGE
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY" and ds.Manufacturer == "medseg"
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID == info["referenced_series_uid"]
    assert {str(i.ReferencedSOPInstanceUID) for i in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == \
        {str(s.SOPInstanceUID) for s in sources}
    assert ds.StudyInstanceUID == sources[0].StudyInstanceUID and ds.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert ds.SeriesInstanceUID not in (sources[0].SeriesInstanceUID, "") and ds.SeriesInstanceUID == info["series_instance_uid"]
    assert ds.PatientID == sources[0].PatientID and "vnet" in ds.SeriesDescription

    present = [v for v in sorted(NAMES) if v and v != ABSENT]
    assert [str(s.SegmentLabel) for s in ds.SegmentSequence] == [NAMES[v] for v in present]  # no segment for the absent class
    assert [int(s.SegmentNumber) for s in ds.SegmentSequence] == list(range(1, len(present) + 1))
    for s in ds.SegmentSequence:
        scheme, value, modifier = EXPECTED_CODES[str(s.SegmentLabel)]
        kind = s.SegmentedPropertyTypeCodeSequence[0]
        assert (kind.CodingSchemeDesignator, kind.CodeValue) == (scheme, value)
        mods = kind.get("SegmentedPropertyTypeModifierCodeSequence")
        assert (mods[0].CodeValue if mods else None) == modifier
        category = s.SegmentedPropertyCategoryCodeSequence[0].CodeValue
        assert category == ("85756007" if value == "85756007" else "91723000")  # Tissue; Anatomical Structure
        assert s.SegmentAlgorithmType == "AUTOMATIC"
        algorithm = s.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "medseg vnet" and algorithm.AlgorithmVersion == __version__

    # voxel for voxel, through highdicom's source-instance mapping and the test's own world coordinates
    written_grid = on_grid(labels, ref.affine, ct)
    compared, wrong = per_source_mismatches(out, sorted(folder.glob("*.dcm")), helper_slices(written_grid), NAMES)
    assert compared == labels.size and wrong == 0

    # medseg's reader on the series' grid, and on the SEG's own
    back = read_dicom_seg(out, folder)
    assert back.referenced_series_uid == sources[0].SeriesInstanceUID and back.sop_class_uid == SEGMENTATION_STORAGE
    assert np.allclose(back.labels.affine, ref.affine) and back.labels.shape == ref.shape
    by_name = {v: k for k, v in NAMES.items()}
    lut = np.array([by_name[back.names[n]] for n in range(len(back.names))])
    np.testing.assert_array_equal(lut[np.asarray(back.labels.dataobj)], labels)
    assert back.codes[2]["modifier"] == ("SCT", "7771000", "Left")
    own = read_dicom_seg(out)
    np.testing.assert_array_equal(lut[on_grid(np.asarray(own.labels.dataobj), own.labels.affine, ref)], labels)


def test_label_map_in_any_voxel_order_gives_the_same_seg(tmp_path):
    """The mapping goes through the geometry, not the array order: the same labels reoriented (axes
    swapped and flipped, affine to match) make the same frames."""
    ct = ct_volume(GEOMETRIES["oblique"])
    folder = write_dicom_series(ct, tmp_path / "series")
    ref = read_image(folder)
    labels = nib.Nifti1Image(random_labels(ref.shape), ref.affine)
    ornt = np.array([[2, -1], [0, 1], [1, -1]])  # new axis 0 = old z flipped, 1 = old x, 2 = old y flipped
    other = labels.as_reoriented(ornt)
    assert other.shape != labels.shape
    write_dicom_seg(labels, NAMES, folder, tmp_path / "a.dcm")
    write_dicom_seg(other, NAMES, folder, tmp_path / "b.dcm")
    a, b = pydicom.dcmread(tmp_path / "a.dcm"), pydicom.dcmread(tmp_path / "b.dcm")
    assert a.PixelData == b.PixelData and a.NumberOfFrames == b.NumberOfFrames


def test_a_broken_writer_is_caught(tmp_path, monkeypatch):
    """The independent check sees a flipped row order and swapped slices."""
    ct = ct_volume(GEOMETRIES["ras"])
    folder = write_dicom_series(ct, tmp_path / "series")
    ref = read_image(folder)
    labels = random_labels(ref.shape)
    expected = helper_slices(on_grid(labels, ref.affine, ct))
    files = sorted(folder.glob("*.dcm"))
    real = dicomseg.slice_planes
    for name, broken in {"flipped rows": lambda *a: real(*a)[:, ::-1, :], "swapped slices": lambda *a: real(*a)[[1, 0, *range(2, SHAPE[2])]]}.items():
        monkeypatch.setattr(dicomseg, "slice_planes", broken)
        write_dicom_seg(nib.Nifti1Image(labels, ref.affine), NAMES, folder, tmp_path / "broken.dcm")
        compared, wrong = per_source_mismatches(tmp_path / "broken.dcm", files, expected, NAMES)
        assert wrong > compared // 10, name
    monkeypatch.setattr(dicomseg, "slice_planes", real)


@pytest.mark.parametrize("change, message", [
    ("half-voxel shift", "not on a voxel centre"),
    ("one slice fewer", "outside the label map's shape"),
    ("one slice more", "cover 5 of the label map's 6 slices"),
    ("other spacing", "not one voxel along one of its axes"),
    ("empty", "nothing segmented"),
    ("float", "integer label map"),
])
def test_geometry_or_content_that_does_not_match_is_refused(tmp_path, change, message):
    ct = ct_volume(GEOMETRIES["lps-flipped"])
    folder = write_dicom_series(ct, tmp_path / "series")
    ref = read_image(folder)
    labels, affine = random_labels(ref.shape), ref.affine.copy()
    if change == "half-voxel shift":
        affine[:3, 3] += 0.5 * affine[:3, 0]
    elif change == "one slice fewer":
        labels = labels[:, :, :-1]
    elif change == "one slice more":
        labels = np.concatenate([labels, labels[:, :, :1]], axis=2)
    elif change == "other spacing":
        affine[:3, 1] *= 1.5
    elif change == "empty":
        labels = np.zeros_like(labels)
    elif change == "float":
        labels = labels.astype(np.float32)
    with pytest.raises(MedsegError, match=message) as e:
        write_dicom_seg(nib.Nifti1Image(labels, affine), NAMES, folder, tmp_path / "seg.dcm")
    assert "\n" not in str(e.value)
    assert not list(tmp_path.glob("*seg.dcm*")), "nothing written"


def test_reader_refuses_a_reference_on_another_grid(tmp_path):
    ct = ct_volume(GEOMETRIES["ras"])
    folder = write_dicom_series(ct, tmp_path / "series")
    ref = read_image(folder)
    write_dicom_seg(nib.Nifti1Image(random_labels(ref.shape), ref.affine), NAMES, folder, tmp_path / "seg.dcm")
    shifted = ref.affine.copy()
    shifted[:3, 3] += 0.5 * shifted[:3, 2]
    with pytest.raises(DataError, match="not on a voxel centre"):
        read_dicom_seg(tmp_path / "seg.dcm", nib.Nifti1Image(np.zeros(ref.shape, np.uint8), shifted))
    with pytest.raises(DataError, match="outside the reference grid"):
        read_dicom_seg(tmp_path / "seg.dcm", nib.Nifti1Image(np.zeros(ref.shape[:2] + (3,), np.uint8), ref.affine))
    with pytest.raises(DataError, match="not a readable DICOM Segmentation"):
        read_dicom_seg(sorted(folder.glob("*.dcm"))[0])


def test_property_codes():
    for name, (value, modifier) in {"Liver": ("10200004", None), "kidney_right": ("64033007", "24028007"),
                                    "adrenal_gland_left": ("23451007", "7771000"), "vertebrae_L1": ("66794005", None),
                                    "vertebrae_S1": ("51282000", None), "rib_left_3": ("113197003", "7771000"),
                                    "gallbladder": ("28231008", None), "pancreas": ("15776009", None), "stomach": ("69695003", None),
                                    "aorta": ("15825003", None), "tumour": ("85756007", None)}.items():
        category, kind, mod, known = dicomseg.property_codes(name)
        assert (kind.value, mod.value if mod else None) == (value, modifier), name
        assert known == (value != "85756007") and kind.scheme_designator == "SCT"


# ---------------------------------------------------------------------------------------------
# (2) end to end: medseg infer --output-type dicom-seg on a DICOM series


@pytest.fixture
def threshold_run(tmp_path):
    from test_infer import make_threshold_run

    from medseg.models import registry

    yield make_threshold_run(tmp_path / "runs")
    registry._REGISTRY.pop("threshold_test", None)


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def test_cli_dicom_seg_equals_the_nifti_output(threshold_run, tmp_path, cli):
    from medseg.data.phantom import make_case

    case = make_case(seed=3, index=0).image
    small = nib.Nifti1Image(np.asarray(case.dataobj)[::2, ::2, :16], case.affine @ np.diag([2, 2, 1, 1]))
    series = write_dicom_series(small, tmp_path / "dicom" / "ct_series")

    result = cli("infer", series, "--run", threshold_run, "--output-type", "dicom-seg")
    assert result.exit_code == 0, result.output
    seg_path = tmp_path / "dicom" / "ct_series_seg.dcm"
    assert sorted(p.name for p in seg_path.parent.iterdir()) == ["ct_series", "ct_series_seg.dcm", "ct_series_seg.json"]
    assert "ct_series_seg.dcm" in " ".join(result.output.split())
    sidecar = json.loads((tmp_path / "dicom" / "ct_series_seg.json").read_text())
    ds = pydicom.dcmread(seg_path)
    assert sidecar["dicom_seg"]["sop_instance_uid"] == ds.SOPInstanceUID and sidecar["dicom_seg"]["segments"] == {"1": "bright"}
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == sidecar["dicom_series_uid"]
    assert ds.SegmentSequence[0].SegmentLabel == "bright"
    assert ds.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "medseg threshold_test"
    again = cli("infer", series, "--run", threshold_run, "--output-type", "dicom-seg")
    assert again.exit_code == 2 and "exists; pass --force" in error_lines(again.output)[0]

    nifti = cli("infer", series, "--run", threshold_run, "-o", tmp_path / "nifti" / "ct_seg.nii.gz")
    assert nifti.exit_code == 0, nifti.output
    expected = nib.load(tmp_path / "nifti" / "ct_seg.nii.gz")
    back = read_dicom_seg(seg_path, series)
    assert np.allclose(back.labels.affine, expected.affine, atol=1e-4) and back.labels.shape == expected.shape
    want = np.asarray(expected.dataobj)
    assert want.any() and (want == 0).any()
    np.testing.assert_array_equal(np.asarray(back.labels.dataobj), want)  # one class: segment 1 is class 1
    files = sorted(series.glob("*.dcm"))
    compared, wrong = per_source_mismatches(seg_path, files, helper_slices(on_grid(want, expected.affine, small)), {0: "background", 1: "bright"})
    assert compared == want.size and wrong == 0

    named = cli("infer", series, "--run", threshold_run, "--output-type", "dicom-seg", "-o", tmp_path / "out" / "mine.dcm")
    assert named.exit_code == 0, named.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["mine.dcm", "mine.json"]


# ---------------------------------------------------------------------------------------------
# (5) bad inputs: one line, exit 2, nothing written


def test_cli_bad_output_type_requests(threshold_run, tmp_path, cli):
    ct = ct_volume(GEOMETRIES["ras"])
    nib.save(ct, tmp_path / "ct.nii.gz")
    series = write_dicom_series(ct, tmp_path / "series")
    before = sorted(p.name for p in tmp_path.iterdir())
    for args, needle in [
        ((tmp_path / "ct.nii.gz", "--output-type", "dicom-seg"), "needs a DICOM series folder as input"),
        ((series, "--output-type", "dicom-seg", "-o", tmp_path / "x_seg.nii.gz"), "a DICOM SEG output must end in .dcm"),
        ((series, "-o", tmp_path / "x.dcm"), "pass --output-type dicom-seg"),
        ((series, "--output-type", "rtstruct"), "--output-type rtstruct: expected one of nifti, dicom-seg"),
    ]:
        result = cli("infer", *args, "--run", threshold_run)
        assert result.exit_code == 2, result.output
        lines = error_lines(result.output)
        assert len(lines) == 1 and needle in " ".join(result.output.split()), result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# ---------------------------------------------------------------------------------------------
# (3), (4) real data: a GE CT series and dcmqi's SEG of its liver


@pytest.fixture(scope="module")
def ct_3slice(shared_data) -> Path:
    folder = shared_data / "dicom_ct_3slice"
    if not (folder / "liver_seg.dcm").is_file():
        pytest.skip("../shared/data/dicom_ct_3slice is absent")
    return folder


def nrrd_as_nifti(path: Path) -> nib.Nifti1Image:
    """The NRRD by SimpleITK (LPS, array z, y, x) as RAS x, y, z, with the test's own conversion."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())[None, :]
    lps[:3, 3] = image.GetOrigin()
    return nib.Nifti1Image(sitk.GetArrayFromImage(image).transpose(2, 1, 0), np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps)


@pytest.mark.realdata
def test_dcmqi_seg_reads_as_its_nrrd(ct_3slice):
    series = ct_3slice / "series"
    nrrd = nrrd_as_nifti(ct_3slice / "liver_seg.nrrd")
    ref = read_image(series)
    assert nrrd.shape == ref.shape == (512, 512, 3) and np.allclose(nrrd.affine, ref.affine, atol=1e-4)
    want = np.asarray(nrrd.dataobj)
    assert int(want.sum()) == 107098

    back = read_dicom_seg(ct_3slice / "liver_seg.dcm", series)
    assert back.names == {0: "background", 1: "Liver"} and back.codes[1]["type"] == ("SRT", "T-62000", "Liver")
    assert back.referenced_series_uid == ref.extra["dicom"]["series_uid"]
    got = np.asarray(back.labels.dataobj)
    assert got.shape == want.shape and int((got != want).sum()) == 0  # 786,432 voxels compared
    own = read_dicom_seg(ct_3slice / "liver_seg.dcm")
    np.testing.assert_array_equal(on_grid(np.asarray(own.labels.dataobj), own.labels.affine, nrrd), want)
    on_ref = read_dicom_seg(ct_3slice / "liver_seg.dcm", ref)  # an image on the grid does as well as the folder
    np.testing.assert_array_equal(np.asarray(on_ref.labels.dataobj), want)


@pytest.mark.realdata
def test_seg_written_for_the_real_series(ct_3slice, tmp_path):
    series = ct_3slice / "series"
    ref = read_image(series)
    nrrd = nrrd_as_nifti(ct_3slice / "liver_seg.nrrd")
    labels = np.asarray(nrrd.dataobj).astype(np.uint8)
    out = tmp_path / "liver.dcm"
    write_dicom_seg(nib.Nifti1Image(labels, ref.affine), {0: "background", 1: "liver"}, series, out, model="swin_unetr")

    ds = pydicom.dcmread(out)
    files = sorted(series.glob("*.dcm"))
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert ds.SOPClassUID == SEGMENTATION_STORAGE and ds.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert (ds.PatientID, ds.StudyInstanceUID) == (sources[0].PatientID, sources[0].StudyInstanceUID)
    kind = ds.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0]
    assert (kind.CodingSchemeDesignator, kind.CodeValue, kind.CodeMeaning) == ("SCT", "10200004", "Liver")
    # each source file's pixels: the NRRD's slice at that file's position (the test's own arithmetic)
    lps_to_index = np.linalg.inv(np.diag([-1.0, -1.0, 1.0, 1.0]) @ nrrd.affine)
    expected = []
    for s in sources:
        k = lps_to_index[:3, :3] @ np.asarray(s.ImagePositionPatient, dtype=float) + lps_to_index[:3, 3]
        assert np.allclose(k, np.round(k), atol=1e-3) and np.allclose(k[:2], 0, atol=1e-3)
        expected.append(labels[:, :, int(round(k[2]))].T)
    compared, wrong = per_source_mismatches(out, files, expected, {0: "background", 1: "liver"})
    assert compared == labels.size and wrong == 0
    back = read_dicom_seg(out, series)
    np.testing.assert_array_equal(np.asarray(back.labels.dataobj), labels)
