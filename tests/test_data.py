import json

import nibabel as nib
import numpy as np
import pytest
from conftest import tiny_case, write_case

from medseg.config import DataConfig, bundle_from_dict
from medseg.data.datasets import Case, prepare, resolve_source, split
from medseg.data.labels import apply_lut, build_lut, read_source_labels
from medseg.errors import BundleError, DataError


def test_decathlon_folder_and_nnunet_naming(tmp_path):
    img, lab = tiny_case()
    write_case(tmp_path / "dec", "liver_3", img, lab)
    write_case(tmp_path / "dec", "liver_10", img, lab)
    found = resolve_source(DataConfig(source=str(tmp_path / "dec")))
    assert [c.name for c in found.cases] == ["liver_10", "liver_3"]

    nn = tmp_path / "nnunet"
    write_case(nn, "case_001", img, lab)
    (nn / "imagesTr" / "case_001.nii.gz").rename(nn / "imagesTr" / "case_001_0000.nii.gz")
    (nn / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "tumour": 1}, "channel_names": {"0": "CT"}}))
    found = resolve_source(DataConfig(source=str(nn)))
    assert [c.name for c in found.cases] == ["case_001"]
    assert found.source_labels == {1: "tumour"}


def test_dataset_json_and_single_case_folder(tmp_path, shared_data):
    img, lab = tiny_case()
    write_case(tmp_path, "a", img, lab)
    (tmp_path / "dataset.json").write_text(json.dumps({
        "labels": {"0": "background", "1": "blob"},
        "training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}],
    }))
    found = resolve_source(DataConfig(source=str(tmp_path / "dataset.json")))
    assert [c.name for c in found.cases] == ["a"] and found.source_labels == {1: "blob"}

    single = resolve_source(DataConfig(source=str(shared_data / "ct_abdomen_3mm")))
    assert [c.name for c in single.cases] == ["ct_abdomen_3mm"]


def test_source_labels_map_totalsegmentator_values(shared_data):
    source = read_source_labels(str(shared_data / "totalseg_v2_labels.json"))
    assert source[1] == "spleen" and source[5] == "liver" and len(source) == 117
    lut = build_lut(["liver", "spleen", "stomach"], source)
    label = np.array([0, 1, 5, 6, 2, 117])
    np.testing.assert_array_equal(apply_lut(label, lut), [0, 2, 1, 3, 0, 0])  # unlisted -> background
    with pytest.raises(BundleError, match="did you mean 'liver'"):
        build_lut(["livr"], source)


def test_identity_labels_reject_unknown_values(tmp_path):
    img, lab = tiny_case()
    lab[0, 0, 0] = 7
    write_case(tmp_path, "a", img, lab)
    with pytest.raises(DataError, match="label value 7 is not in the source's labels"):
        prepare(DataConfig(source=str(tmp_path)), ["blob"])


@pytest.mark.parametrize("problem, message", [
    ("shape", "image shape (40, 36, 20) != label shape (40, 36, 19)"),
    ("affine", "different affines"),
    ("nan", "voxels are NaN"),
    ("2d", "expected a 3D volume"),
    ("negative", "negative values"),
])
def test_bad_cases_fail_before_training(tmp_path, problem, message):
    img, lab = tiny_case()
    img = img.astype(np.float32)
    affine, label_affine = None, None
    if problem == "shape":
        lab = lab[:, :, :-1]
    elif problem == "affine":
        label_affine = np.diag([2.0, 2.0, 3.0, 1.0])
        label_affine[0, 3] = 25.0
    elif problem == "nan":
        img[3, 3, 3] = np.nan
    elif problem == "2d":
        img, lab = img[:, :, 0], lab[:, :, 0]
    elif problem == "negative":
        lab = lab.astype(np.int16)
        lab[0, 0, 0] = -1
    write_case(tmp_path, "a", img, lab, affine, label_affine)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        prepare(DataConfig(source=str(tmp_path)), ["blob"])


def test_empty_and_missing_sources(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no cases found"):
        resolve_source(DataConfig(source=str(tmp_path / "empty")))
    with pytest.raises(DataError, match="no such file or folder"):
        resolve_source(DataConfig(source=str(tmp_path / "nowhere")))
    img, lab = tiny_case()
    write_case(tmp_path / "nolabel", "a", img, lab)
    (tmp_path / "nolabel" / "labelsTr" / "a.nii.gz").unlink()
    with pytest.raises(DataError, match="no label map named a.nii.gz"):
        resolve_source(DataConfig(source=str(tmp_path / "nolabel")))


def test_split_is_deterministic_and_disjoint():
    cases = [Case(f"c{i}", f"i{i}", f"l{i}") for i in range(10)]
    train, val, note = split(cases, 0.2, seed=0)
    assert note is None and len(val) == 2 and len(train) == 8
    assert not {c.name for c in train} & {c.name for c in val}
    assert split(list(reversed(cases)), 0.2, seed=0)[1] == val  # independent of listing order
    assert split(cases, 0.2, seed=1)[1] != val
    one_train, one_val, note = split(cases[:1], 0.2, seed=0)
    assert one_train == one_val and "only one case" in note


def test_transforms_resample_to_ras_and_window(tmp_path):
    """The LPS phantom case comes out RAS at the bundle spacing, with HU windowed to [0, 1]."""
    from medseg.data.transforms import val_transforms

    bundle = bundle_from_dict({}, ["data.spacing=[3,3,4]", "data.phantom.cases=2"])
    found, lut, train, val, _ = prepare(bundle.data, bundle.data.labels)
    lps = next(c for c in found.cases if c.name.endswith("001"))
    src = nib.load(lps.label)
    assert nib.aff2axcodes(src.affine) == ("L", "P", "S")
    from monai.transforms import Compose

    t = Compose(val_transforms(bundle, lut).transforms[:-1])  # without the final EnsureTyped, the affine is kept
    out = t(lps.as_dict())
    affine = np.asarray(out["image"].affine)
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    np.testing.assert_allclose(np.sqrt((affine[:3, :3] ** 2).sum(0)), [3, 3, 4], rtol=1e-4)
    image = out["image"].numpy()
    assert image.min() >= 0 and image.max() <= 1
    # the liver (class 1) is on the patient's right: the high-x half in RAS
    label = out["label"].numpy()[0]
    xs = np.nonzero(label == 1)[0]
    assert xs.mean() > label.shape[0] / 2
    # labels went through the lookup table: only output classes remain
    assert set(np.unique(label)) <= set(range(len(bundle.data.labels) + 1))
