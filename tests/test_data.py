import json

import nibabel as nib
import numpy as np
import pytest
from conftest import tiny_case, write_case

from medseg.config import DataConfig, bundle_from_dict
from medseg.data.datasets import Case, fold_split, kfold, prepare, read_split_file, resolve_source, split
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


def test_values_sharing_a_name_all_map_to_that_class():
    """nnU-Net/TotalSegmentator-style sources can give one name to several values: none may be lost."""
    source = read_source_labels({"1": "kidney", "2": "kidney", "3": "liver", "4": "kidney", "5": "spleen"})
    lut = build_lut(["kidney", "liver"], source)
    np.testing.assert_array_equal(apply_lut(np.arange(6), lut), [0, 1, 1, 2, 1, 0])


@pytest.mark.parametrize("spec, message", [
    ({"-1": "liver", "1": "spleen"}, "label value -1 \\('liver'\\) is out of range: values are 0 to 65535"),
    ({"liver": -2}, "label value -2 \\('liver'\\) is out of range"),
    ({"1": "liver", "1000000000000": "spleen"}, "label value 1000000000000 \\('spleen'\\) is out of range"),
    ({"1": "liver", "liver2": 1}, "label value 1 is listed twice \\('liver' and 'liver2'\\)"),
])
def test_source_values_out_of_range_or_repeated_are_refused(spec, message):
    """A negative key indexed the lookup table from its end (-1 took the last entry's class); a huge
    one asked for a table of that size (MemoryError)."""
    with pytest.raises(BundleError, match=f"^data.source_labels: {message}"):
        build_lut(["liver", "spleen"], read_source_labels(spec))


def test_unlisted_label_values_fail_whatever_their_size(tmp_path):
    """Values the source does not list have no stated meaning: 3 here is below the largest listed
    value (5), which the old check let through as background."""
    img, lab = tiny_case()
    lab[0, 0, 0] = 3
    write_case(tmp_path, "a", img, lab)
    cfg = DataConfig(source=str(tmp_path), source_labels={"1": "blob", "5": "other"})
    label_path = tmp_path / "labelsTr" / "a.nii.gz"
    with pytest.raises(DataError, match=f"^{label_path}: label value 3 is not in the source's labels; they list 0 and 2 values up to 5"):
        prepare(cfg, ["blob"])
    lab[0, 0, 0] = 5
    write_case(tmp_path, "a", img, lab)
    assert prepare(cfg, ["blob"])[1][5] == 0  # listed but not wanted: background, as documented
    lab[0, 0, 0], lab[0, 0, 1] = 2, 9  # identity mapping for labels [blob, other]: 0..2 are known
    write_case(tmp_path, "a", img, lab)
    with pytest.raises(DataError, match=r"label value 9 is not in the source's labels; they list 0..2"):
        prepare(DataConfig(source=str(tmp_path)), ["blob", "other"])


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe\x00\x01binary\x80\x81", "not UTF-8 text"),
    (b"[1, 2]", "expected a non-empty mapping of label value to name, got list '\\[1, 2\\]'"),
    (b"5", "expected a non-empty mapping of label value to name, got int '5'"),
    (b"{}", "got an empty mapping"),
    (b'{"1": {"name": "liver"}}', "entry '1': {'name': 'liver'} is not a label value and its name"),
    (b'{"1": 5}', "entry '1': 5 is not a label value and its name"),
    (b'{"liver": [1, 2]}', "entry 'liver': \\[1, 2\\] is not a label value and its name"),
    (b'{"liver": 1.5}', "entry 'liver': 1.5 is not"),
    (b'{"1": "liver", "1": "spleen"}', "the key '1' appears twice"),
    (b'{"0": "background"}', "lists only background"),
    (b'{"1": "liver"', "not valid JSON"),
    (b"[" * 100000, "nested too deeply|not valid JSON"),
])
def test_malformed_source_labels_file_is_one_line_naming_it(tmp_path, content, message):
    path = tmp_path / "labels.json"
    path.write_bytes(content)
    with pytest.raises(BundleError, match=f"^data.source_labels \\({path}\\): .*({message})") as err:
        read_source_labels(str(path))
    assert "\n" not in str(err.value)
    with pytest.raises(BundleError, match="data.source_labels"):  # the same through the bundle key
        resolve_source(DataConfig(source=str(tmp_path), source_labels=str(path)))


def test_malformed_dataset_json_is_one_line(tmp_path):
    for content, message in ((b"\xff\xfe binary", "cannot read dataset.json"), (b"[1]", "must be a JSON object"),
                             (b'{"training": [{"image": 1, "label": 2}]}', "needs 'image' and 'label' paths"),
                             (b'{"labels": {"1": ["x"]}, "training": []}', "labels: entry '1'")):
        (tmp_path / "dataset.json").write_bytes(content)
        with pytest.raises((DataError, BundleError), match=f"^{tmp_path / 'dataset.json'}: .*{message}"):
            resolve_source(DataConfig(source=str(tmp_path / "dataset.json")))


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


def test_kfold_splits_partition_the_cases():
    cases = [Case(f"c{i:02d}", "", "") for i in range(11)]
    splits = kfold(cases, 5, seed=0)
    assert splits == kfold(list(reversed(cases)), 5, seed=0)  # by name, not by the order found
    assert splits != kfold(cases, 5, seed=1)
    vals = [s["val"] for s in splits]
    assert sorted(n for v in vals for n in v) == [c.name for c in cases]  # every case validated exactly once
    assert sorted(len(v) for v in vals) == [2, 2, 2, 2, 3]
    for s in splits:
        assert not set(s["train"]) & set(s["val"]) and len(s["train"]) + len(s["val"]) == 11
    with pytest.raises(DataError, match="needs at least 5"):
        kfold(cases[:4], 5, seed=0)


def test_fold_split_reads_a_split_file(tmp_path):
    cases = [Case(f"c{i}", "", "") for i in range(4)]
    path = tmp_path / "splits_final.json"
    path.write_text(json.dumps([{"train": ["c0", "c1"], "val": ["c2", "c3"]}, {"train": ["c2", "c3"], "val": ["c0", "c1"]}]))
    cfg = DataConfig(fold=1, split_file=str(path))
    train, val, splits = fold_split(cfg, cases)
    assert [c.name for c in train] == ["c2", "c3"] and [c.name for c in val] == ["c0", "c1"] and len(splits) == 2
    with pytest.raises(DataError, match="has 2 split"):
        fold_split(DataConfig(fold=2, split_file=str(path)), cases)
    for content, message in [('[{"train": ["c0"], "val": ["c9"]}]', "do not have \\(first: c9\\)"),
                             ('[{"train": ["c0"], "val": ["c0"]}]', "trains and validates on c0"),
                             ('{"folds": 3}', "expected a list"), ("not json", "cannot read it"),
                             ('[{"train": [], "val": ["c0"]}]', "no training cases")]:
        path.write_text(content)
        with pytest.raises(DataError, match=message):
            read_split_file(path, cases)
    with pytest.raises(BundleError, match="data.split_file needs data.fold"):
        bundle_from_dict({"data": {"split_file": str(path)}})
    with pytest.raises(BundleError, match="data.fold 5 is not one of"):
        bundle_from_dict({"data": {"fold": 5}})


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
