"""Fingerprint and plan on synthetic datasets whose spacing and intensities are known by construction."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.config import CTStats, bundle_from_dict, load_bundle
from medseg.data.datasets import prepare
from medseg.errors import BundleError
from medseg.plan import apply_plan, fingerprint, make_plan, target_spacing
from tests.conftest import write_case


def two_value_case(shape=(40, 32, 20)):
    """Background -1000 HU; a box of foreground (label 1) whose voxels alternate 0 and 200 HU, so its
    mean is 100, its std 100 and its 0.5 / 99.5 percentiles 0 and 200."""
    image = np.full(shape, -1000, dtype=np.int16)
    label = np.zeros(shape, dtype=np.uint8)
    box = (slice(10, 30), slice(8, 24), slice(5, 15))
    label[box] = 1
    values = np.zeros(label[box].shape, dtype=np.int16)
    values.flat[1::2] = 200
    image[box] = values
    return image, label


def write_dataset(folder, spacings, shape=(40, 32, 20)):
    for i, sp in enumerate(spacings):
        image, label = two_value_case(shape)
        write_case(folder, f"case_{i:02d}", image, label, affine=np.diag([*sp, 1.0]))
    return folder


def planned_bundle(folder, **extra):
    raw = {"model": {"name": "vnet"},
           "data": {"source": str(folder), "labels": ["organ"], "spacing": "auto", "normalization": "ct", "val_fraction": 0.0},
           "train": {"roi": "auto", "batch_size": 1, "samples_per_volume": 1}, "plan": {"budget": "64GB"}}
    for key, value in extra.items():
        section, name = key.split("__")
        raw[section][name] = value
    return bundle_from_dict(raw)


def _cases(bundle):
    found, lut, train_cases, _, _ = prepare(bundle.data, bundle.data.labels)
    return train_cases, lut, bundle.data.labels, found.root


def fp_and_plan(bundle):
    found, lut, train_cases, _, _ = prepare(bundle.data, bundle.data.labels)
    fp = fingerprint(train_cases, lut, bundle.data.labels, root=found.root)
    return fp, make_plan(fp, bundle, "cpu")


def test_plan_spacing_statistics_and_roi_by_hand(tmp_path):
    folder = write_dataset(tmp_path / "d", [(1.0, 1.0, 2.0), (1.0, 1.0, 2.0), (2.0, 2.0, 2.0)])
    # a narrow data.hu_window leaves the percentiles as they are
    fp, plan = fp_and_plan(planned_bundle(folder, data__hu_window=[50, 150]))
    assert plan.spacing == [1.0, 1.0, 2.0]  # the median per axis
    assert plan.ct_stats == {"low": 0.0, "high": 200.0, "mean": 100.0, "std": 100.0}
    # the default window (-175..250 HU) raises the clip's top to 250 HU (contrast only brightens: the
    # low end stays); mean and std stay the foreground's
    assert make_plan(fp, planned_bundle(folder), "cpu").ct_stats == {"low": 0.0, "high": 250.0, "mean": 100.0, "std": 100.0}
    # median shape at 1x1x2 mm: (40, 32, 20) for two cases and (80, 64, 20) for the third -> 40 x 32 x 20;
    # V-Net: multiples of 16, at least 32 -> 48 x 32 x 32
    assert plan.median_shape == [40, 32, 20]
    assert plan.roi == [48, 32, 32]
    c = fp["cases"][0]
    assert c["spacing"] == [1.0, 1.0, 2.0] and c["shape"] == [40, 32, 20]
    assert c["classes"]["organ"]["voxels"] == 20 * 16 * 10
    assert c["classes"]["organ"]["ml"] == pytest.approx(20 * 16 * 10 * 2.0 / 1000, abs=0.01)

    planned = apply_plan(planned_bundle(folder, data__hu_window=[50, 150]), plan)
    assert planned.data.spacing == [1.0, 1.0, 2.0] and planned.train.roi == [48, 32, 32]
    assert planned.data.ct_stats == CTStats(low=0.0, high=200.0, mean=100.0, std=100.0)
    assert planned.planned_fields() == []


def test_anisotropic_data_take_the_tenth_percentile_of_the_slice_spacing():
    # seven thick-slice cases (5 mm) and three thin (1.5 mm): the median says 5 mm, nnU-Net's rule says
    # the 10th percentile of the z spacings, which lies among the thin ones: 1.5 mm
    spacings = np.array([[0.8, 0.8, 5.0]] * 7 + [[0.8, 0.8, 1.5]] * 3)
    shapes = np.array([[512, 512, 60]] * 10)
    target, note = target_spacing(spacings, shapes)
    assert target[:2] == [0.8, 0.8]
    assert target[2] == pytest.approx(np.percentile(spacings[:, 2], 10), abs=1e-3)
    assert target[2] == pytest.approx(1.5, abs=1e-3)
    assert note and "anisotropic" in note
    # the same spacings but many slices: not anisotropic in voxels, so the median stays
    target, note = target_spacing(spacings, np.array([[128, 128, 200]] * 10))
    assert target == [0.8, 0.8, 5.0] and note is None


def test_anisotropic_dataset_end_to_end(tmp_path):
    folder = write_dataset(tmp_path / "d", [(1.0, 1.0, 6.0)] * 4 + [(1.0, 1.0, 2.0)], shape=(64, 64, 8))
    _, plan = fp_and_plan(planned_bundle(folder))
    assert plan.spacing[:2] == [1.0, 1.0]
    assert plan.spacing[2] == pytest.approx(np.percentile([6, 6, 6, 6, 2], 10), abs=1e-3)


def test_the_roi_shrinks_to_fit_the_budget_by_the_memory_estimator(tmp_path):
    from medseg.cost.memory import training_memory

    folder = write_dataset(tmp_path / "d", [(0.5, 0.5, 0.5)] * 3, shape=(200, 160, 120))
    bundle = planned_bundle(folder, plan__budget="1.5GB", data__spacing=[0.5, 0.5, 0.5], data__normalization="window")
    _, plan = fp_and_plan(bundle)
    assert plan.median_shape == [200, 160, 120]
    big = [208, 160, 128]  # the median shape in multiples of 16
    assert math.prod(plan.roi) < math.prod(big)
    assert all(r % 16 == 0 and r >= 32 for r in plan.roi)
    # an independent call to the estimator agrees the plan fits
    used = training_memory("vnet", plan.roi, 1, 2, {}, False, False, bundle.train).device_total
    assert used <= 1.5e9 and used == plan.estimate_bytes
    assert training_memory("vnet", big, 1, 2, {}, False, False, bundle.train).device_total > 1.5e9


def test_auto_batch_takes_no_more_volumes_than_there_are_cases(tmp_path):
    """Large cases and a small given ROI: the 5 % rule and the budget would allow 4 volumes per step;
    with one training case the plan takes 1, with three it takes 2 (4 would exceed them)."""
    shape = (200, 160, 120)
    for n, expected in ((1, 1), (3, 2)):
        folder = write_dataset(tmp_path / f"d{n}", [(1.0, 1.0, 1.0)] * n, shape=shape)
        _, plan = fp_and_plan(planned_bundle(folder, train__roi=[32, 32, 32], train__batch_size="auto", data__spacing=[1.0, 1.0, 1.0]))
        assert plan.batch_size == expected, n
        assert 4 * 32**3 <= 0.05 * n * math.prod(shape)  # so neither the 5 % rule nor the budget is what stopped it


def test_fingerprint_is_cached_by_content(tmp_path):
    folder = write_dataset(tmp_path / "d", [(1.0, 1.0, 2.0)] * 2)
    bundle = planned_bundle(folder)
    fp, _ = fp_and_plan(bundle)
    cached = fp["cached"]
    assert cached and (folder / ".medseg").is_dir()
    import medseg.data.io as io

    real_read = io.read_image
    io.read_image = lambda *a, **k: (_ for _ in ()).throw(AssertionError("the cache was not used"))
    try:
        again = fingerprint(*_cases(bundle))
    finally:
        io.read_image = real_read
    assert again["cached"] == cached and again["hash"] == fp["hash"]
    # change one image's voxels: a new fingerprint, with the new statistics
    image, label = two_value_case()
    image[label == 1] = 50
    write_case(folder, "case_00", image, label, affine=np.diag([1.0, 1.0, 2.0, 1.0]))
    changed, plan = fp_and_plan(bundle)
    assert changed["hash"] != fp["hash"]
    assert plan.ct_stats["mean"] < 100


def test_explicit_fields_are_kept_and_auto_is_validated(tmp_path):
    folder = write_dataset(tmp_path / "d", [(1.0, 1.0, 2.0)] * 2)
    bundle = planned_bundle(folder, data__spacing=[2.0, 2.0, 2.0], train__roi=[32, 32, 32])
    _, plan = fp_and_plan(bundle)
    assert plan.filled == ["data.ct_stats"]
    planned = apply_plan(bundle, plan)
    assert planned.data.spacing == [2.0, 2.0, 2.0] and planned.train.roi == [32, 32, 32]
    for bad in ('data.spacing="median"', "train.roi=auto3", 'train.batch_size="big"'):
        with pytest.raises(BundleError):
            load_bundle(None, [bad])


def test_train_plans_auto_fields_and_infer_uses_the_plan(workdir, cli):
    """A bundle on "auto" trains; its run holds concrete values and plan.json, and inference reads them."""
    from medseg.engine.train import train

    bundle = load_bundle(None, ["model.name=fcn2d", 'model.args={"features": [8, 16, 16, 16, 16]}', "data.phantom.cases=3",
                                "data.val_fraction=0.34", 'data.labels=["liver"]', "data.spacing=[4,4,4]", "data.normalization=ct",
                                "train.roi=auto", "train.batch_size=auto", "plan.max_roi_voxels=4096", "train.epochs=1",
                                "train.iterations_per_epoch=1", "train.samples_per_volume=1", "sliding_window.roi=[64,64,4]",
                                "tracking.backend=none"])
    result = train(bundle, show_progress=False)
    saved = json.loads((result.run_dir / "bundle.json").read_text())
    plan = json.loads((result.run_dir / "plan.json").read_text())
    assert saved["train"]["roi"] == plan["roi"] and saved["train"]["roi"][2] == 1
    assert math.prod(plan["roi"]) <= 4096
    assert saved["data"]["ct_stats"] == plan["ct_stats"] and saved["data"]["ct_stats"]["std"] > 0
    assert set(plan["filled"]) == {"train.roi", "train.batch_size", "data.ct_stats"}

    from medseg.data.phantom import make_case

    case = make_case(5, 0)
    scan = workdir / "scan.nii.gz"
    nib.save(case.image, scan)
    res = cli("infer", scan, "--run", result.run_dir, "-o", workdir / "seg.nii.gz")
    assert res.exit_code == 0, res.output
    assert nib.load(workdir / "seg.nii.gz").shape == case.image.shape


def test_partial_ct_stats_and_edited_runs_are_refused(tmp_path):
    with pytest.raises(BundleError, match="missing high, mean, std"):
        load_bundle(None, ["data.normalization=ct", 'data.ct_stats={"low": -100}'])
    with pytest.raises(BundleError, match="did you mean 'auto'"):
        load_bundle(None, ["data.spacing=Auto"])


def test_plan_command_writes_a_bundle_that_trains_as_planned(tmp_path, cli):
    """`medseg plan DATA -o FILE`: the file records the plan, and `load_bundle(FILE)` (what `medseg
    train FILE` reads) is the planned bundle with concrete values; a bad -o is refused before work."""
    folder = write_dataset(tmp_path / "d", [(1.0, 1.0, 2.0), (1.0, 1.0, 2.0), (2.0, 2.0, 2.0)])
    bundle_file = tmp_path / "b.json"
    bundle_file.write_text(json.dumps(planned_bundle(folder, data__hu_window=[50, 150]).to_dict()))
    out = tmp_path / "planned.json"
    res = cli("plan", "--bundle", bundle_file, "-o", out)
    assert res.exit_code == 0, res.output
    assert "48 x 32 x 32" in res.output and "0..200 HU" in res.output  # the hand-checked plan above
    record = json.loads(out.read_text())
    assert record["plan"]["roi"] == [48, 32, 32]
    planned = load_bundle(out)
    assert planned.train.roi == [48, 32, 32] and planned.data.spacing == [1.0, 1.0, 2.0]
    assert Path(planned.data.source).is_absolute() and Path(planned.data.source) == folder.resolve()
    assert planned.data.ct_stats == CTStats(low=0.0, high=200.0, mean=100.0, std=100.0) and planned.planned_fields() == []
    again = cli("plan", "--bundle", bundle_file, "-o", out)
    assert again.exit_code != 0 and "exists" in again.output
    bad = cli("plan", "--bundle", bundle_file, "-o", tmp_path / "plan.txt")
    assert bad.exit_code != 0 and "ending in .json" in bad.output and not (tmp_path / "plan.txt").exists()


def test_plan_refuses_what_train_would_before_reading_data(tmp_path, cli):
    """A ROI the model cannot take, and sizes without a unit or beyond any machine: one line, before
    any data is read (the data folder here does not even exist)."""
    missing = tmp_path / "no-such-data"
    res = cli("plan", str(missing), "--bundle", "bundles/swin_unetr.json", "--set", "train.roi=[32,32,32]")
    assert res.exit_code != 0 and "does not suit" in res.output and "Traceback" not in res.output
    # model arguments and the head's rate too, for plan and for train with a planned bundle (ct_stats "auto")
    for bundle, change, msg in (("vnet", "model.args.nonsense=1", "has no argument 'nonsense'"),
                                ("unetr", "model.args.hidden_size=null", "must be like its default"),
                                ("fcn2d", "train.head_lr_scale=2", "no registered output head")):
        for command in (["plan", str(missing), "--bundle", f"bundles/{bundle}.json"],
                        ["train", f"bundles/{bundle}.json", "--set", f"data.source={missing}", "--tracking", "none"]):
            res = cli(*command, "--set", change)
            assert res.exit_code != 0 and msg in res.output and "no cases" not in res.output, (command, res.output)
            assert "Traceback" not in res.output
    for budget, msg in (("24", "has no unit"), ("1e300GB", "beyond any machine")):
        with pytest.raises(BundleError, match=msg):
            load_bundle(None, [f"plan.budget={budget}"])
