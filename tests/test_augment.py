"""Augmentation presets, warm-up schedules and iteration-based training length."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medseg.config import load_bundle
from medseg.data.augment import NAMES, crop_size, probabilities, spatial_and_intensity
from medseg.engine.state import lr_at, new_schedule
from medseg.errors import BundleError

HU_MAP = (-175.0, 250.0, -3.5, 5.0)  # "ct": clip -175..250 HU, z-score with mean 0 HU, std 50 HU


def patch(shape, seed=0):
    rng = np.random.default_rng(seed)
    image = torch.from_numpy(rng.normal(0, 1, (1, *shape)).astype(np.float32))
    label = torch.zeros((1, *shape))
    label[0, shape[0] // 4: 3 * shape[0] // 4, shape[1] // 4: 3 * shape[1] // 4] = 1
    label[0, : shape[0] // 4] = 2
    return {"image": image, "label": label}


@pytest.mark.parametrize("roi", [[32, 32, 16], [48, 40, 1]])
def test_strong_preset_returns_roi_sized_patches_with_valid_labels(roi):
    from monai.transforms import Compose

    p = probabilities("strong", {n: 1.0 for n in NAMES if n not in ("flip", "rot90", "shift")})  # every transform fires
    crop = crop_size(roi, p)
    assert all(c >= r for c, r in zip(crop, roi)) and crop[2] == (1 if roi[2] == 1 else crop[2])
    chain = Compose(spatial_and_intensity(roi, p, ["liver", "spleen"], "ct", HU_MAP))
    chain.set_random_state(seed=1)
    for seed in range(3):
        out = chain(patch(crop, seed))
        assert list(out["image"].shape[1:]) == roi and list(out["label"].shape[1:]) == roi
        assert set(torch.unique(out["label"]).tolist()) <= {0.0, 1.0, 2.0}  # nearest: no blended label values
        assert torch.isfinite(out["image"]).all()


@pytest.mark.parametrize("roi", [[32, 32, 16], [48, 40, 1]])
def test_image_and_label_move_together(roi):
    """Spatial transforms only, on an image that is its own label map: after rotation, scaling and
    mirroring the image, rounded, must still equal the label almost everywhere (they differ only
    where bilinear and nearest interpolation disagree, at boundaries)."""
    from monai.transforms import Compose

    p = {"rotate_scale": 1.0, "mirror": 1.0}
    crop = crop_size(roi, p)
    chain = Compose(spatial_and_intensity(roi, p, ["liver", "spleen"], "ct", HU_MAP))
    chain.set_random_state(seed=3)
    moved = 0
    for seed in range(4):
        d = patch(crop, seed)
        d["image"] = d["label"].clone()
        centre = d["label"][(slice(None), *[slice((c - r) // 2, (c - r) // 2 + r) for c, r in zip(crop, roi)])].clone()
        out = chain(d)
        agree = (out["image"].round() == out["label"]).float().mean()
        assert agree > 0.9
        moved += int(not torch.equal(out["label"], centre))
    assert moved >= 3  # the label was really transformed, not just centre-cropped


def test_enhance_shifts_soft_tissue_and_each_class_by_its_own_offset():
    """A hand-made patch in HU: air, fat, muscle (unlabelled), two organs, bone, and voxels on the
    two fades (-65 HU and 200 HU: half weight) and near the top of the clip (240 HU). Enhancement
    must leave air, fat and bone alone, move the muscle by one tissue offset, each organ by that plus
    its own offset (within the documented ranges), the fade voxels by half of theirs, clip at the
    top, and sometimes swap which organ is brighter; at probability 0 it changes nothing."""
    from medseg.data.enhance import RandContrastPhased

    lo, hi, a, b = HU_MAP
    to_input = lambda hu: a + (hu - lo) * (b - a) / (hi - lo)  # noqa: E731
    to_hu = lambda v: lo + (v - a) * (hi - lo) / (b - a)  # noqa: E731
    #                 air     fat    muscle organ1 organ2 bone  fade-  fade+  top (organ 2)
    hu = torch.tensor([-1000.0, -120.0, 45.0, 35.0, 46.0, 700.0, -65.0, 200.0, 240.0]).reshape(1, 9, 1, 1)
    label = torch.tensor([0.0, 0.0, 0.0, 1.0, 2.0, 0.0, 0.0, 0.0, 2.0]).reshape(1, 9, 1, 1)
    image = torch.clamp(to_input(hu), a, b)
    t = RandContrastPhased(1.0, 2, HU_MAP)
    t.set_random_state(seed=0)
    swapped = 0
    for _ in range(20):
        out = to_hu(t({"image": image.clone(), "label": label})["image"]).flatten().tolist()
        assert [out[0], out[1], out[5]] == pytest.approx([lo, -120.0, hi], abs=1e-3)  # air, fat, bone
        tissue = out[2] - 45.0
        organ1, organ2 = out[3] - 35.0 - tissue, out[4] - 46.0 - tissue
        assert 0 <= tissue <= 50 and 0 <= organ1 <= 150 and 0 <= organ2 <= 150
        assert out[6] - (-65.0) == pytest.approx(tissue / 2, abs=1e-3)  # halfway up the fat fade
        assert out[7] - 200.0 == pytest.approx(tissue / 2, abs=1e-3)  # halfway down the bone fade
        top = 240.0 + 0.1 * (tissue + organ2)  # 240 HU: weight 0.1
        assert out[8] == pytest.approx(min(hi, top), abs=1e-3)
        swapped += int(out[3] > out[4])
    assert 0 < swapped < 20  # organ 1 (darker at first) ends up brighter in some draws, not all
    clipped = RandContrastPhased(1.0, 2, HU_MAP)
    clipped.offsets = np.array([50.0, 150.0, 150.0])
    clipped.randomize = lambda data=None: setattr(clipped, "_do_transform", True)  # keep the offsets set above
    big = torch.clamp(to_input(torch.tensor([230.0]).reshape(1, 1, 1, 1)), a, b)
    assert to_hu(clipped({"image": big, "label": torch.full_like(big, 2.0)})["image"]).item() == pytest.approx(hi, abs=1e-3)
    # a clip that starts above fat (-26 HU, a foreground of organs only): what sits at the floor is air
    # or fat whose value is unknown, and stays where it is
    floor_map = (-26.0, 250.0, -4.2, 12.7)
    at_floor = torch.full((1, 2, 1, 1), floor_map[2])
    moved = RandContrastPhased(1.0, 1, floor_map)({"image": at_floor.clone(), "label": torch.zeros_like(at_floor)})["image"]
    assert torch.equal(moved, at_floor)
    off = RandContrastPhased(0.0, 2, HU_MAP)
    assert torch.equal(off({"image": image.clone(), "label": label})["image"], image)
    with pytest.raises(ValueError, match="intensity map"):
        spatial_and_intensity([32, 32, 32], {"enhance": 1.0}, ["liver"], "ct")


def test_left_right_mirroring_is_left_out_for_sided_classes():
    from monai.transforms import RandFlipd, RandRotate90d

    p = probabilities("strong") | probabilities("light")
    sided = spatial_and_intensity([32, 32, 32], p, ["kidney_left", "kidney_right"], "window", HU_MAP)
    plain = spatial_and_intensity([32, 32, 32], p, ["liver", "spleen"], "window", HU_MAP)
    flips = lambda steps: sorted(t.flipper.spatial_axis for t in steps if isinstance(t, RandFlipd))  # noqa: E731
    assert [0] not in flips(sided) and [0] in flips(plain)
    assert not any(isinstance(t, RandRotate90d) for t in sided) and any(isinstance(t, RandRotate90d) for t in plain)


def test_augment_bundle_keys():
    assert load_bundle(None, ["train.augment=strong"]).train.augment == "strong"
    assert load_bundle(None, ["train.augment=true"]).train.augment == "light"  # run format 1 bundles
    assert load_bundle(None, ["train.augment=false"]).train.augment == "none"
    assert probabilities("strong", {"elastic": 0.2, "noise": 0})["elastic"] == 0.2
    assert "noise" not in probabilities("strong", {"noise": 0})
    for bad, msg in (('train.augment_p={"elastc": 0.2}', "unknown transform 'elastc'"),
                     ('train.augment_p={"noise": 2}', "must be a number in"), ("train.augment=heavy", "must be one of")):
        with pytest.raises(BundleError, match=msg):
            load_bundle(None, [bad])


def test_warmup_then_decay_by_hand():
    seg = new_schedule("poly", 0.01, 110, warmup=10)
    assert [round(lr_at(seg, s), 6) for s in range(3)] == [0.001, 0.002, 0.003]
    assert lr_at(seg, 9) == pytest.approx(0.01)
    assert lr_at(seg, 10) == pytest.approx(0.01)  # decay starts at the peak
    assert lr_at(seg, 60) == pytest.approx(0.01 * (1 - 50 / 100) ** 0.9)
    cos = new_schedule("cosine", 1e-3, 20, warmup=0)
    assert lr_at(cos, 10) == pytest.approx(0.5e-3)


def test_iterations_set_the_length():
    t = load_bundle(None, ["train.iterations=120", "train.iterations_per_epoch=50"]).train
    assert t.iterations_per_epoch_for(7) == 50  # the epoch count is checked end to end below (7 steps in 3 epochs)
    t = load_bundle(None, ["train.iterations=30"]).train
    assert t.iterations_per_epoch_for(7) == 30
    t = load_bundle(None, ["train.epochs=4"]).train
    assert t.iterations is None and t.iterations_per_epoch_for(7) == 7


def test_grad_clip_and_sgd_train(workdir):
    """SGD with Nesterov momentum, warm-up, poly decay and clipping run end to end; the run trains the
    number of steps `train.iterations` asks for."""
    import json

    from medseg.engine.train import train

    bundle = load_bundle(None, ["model.name=fcn2d", 'model.args={"features": [8, 16, 16, 16, 16]}', "data.phantom.cases=2",
                                "data.val_fraction=0.5", 'data.labels=["liver"]', "data.spacing=[5,5,5]", "train.roi=[32,32,1]",
                                "sliding_window.roi=[32,32,4]", "train.samples_per_volume=2", "train.optimizer=sgd", "train.lr=1e-2",
                                "train.scheduler=poly", "train.warmup=2", "train.grad_clip=1.0", "train.iterations=7",
                                "train.iterations_per_epoch=3", "train.augment=strong", "tracking.backend=none"])
    result = train(bundle, show_progress=False)
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["status"] == "complete" and info["steps"] == 7 and info["epochs"] == 3
    assert [row["step"] for row in result.history] == [3, 6, 7]


def test_resume_during_warmup_finishes_it():
    """Stopped at step 10 of a 20-step warm-up and resumed with a longer run: the rate keeps
    climbing from where it was to the peak, then decays; it never restarts from 0 nor stalls."""
    from medseg.engine.state import continue_schedule

    seg = new_schedule("cosine", 1e-2, 100, warmup=20)
    at10 = lr_at(seg, 9)
    longer, note = continue_schedule(seg, 10, "cosine", 1e-2, 200)
    assert note and "warm-up" in note
    assert lr_at(longer, 9) == at10  # the past is unchanged
    rates = [lr_at(longer, s) for s in range(10, 21)]
    assert rates[0] > at10 and all(b > a for a, b in zip(rates, rates[1:-1]))
    assert lr_at(longer, 19) == pytest.approx(1e-2)
    assert lr_at(longer, 100) < 1e-2


@pytest.mark.parametrize("roi", [[64, 64, 32], [64, 64, 64], [96, 64, 32]])
def test_crop_holds_the_roi_turned_about_any_axis(roi):
    """The crop taken before rotate_scale contains the ROI's corners turned by the largest angle
    about each axis, so a turned flat patch is filled from the image, not from its edge values.
    (A fixed 1.5x per axis gave a 64x64x32 patch 48 slices, where a 30-degree turn needs 60.)"""
    import itertools
    import math

    from medseg.data.augment import ROTATE_3D

    crop = crop_size(roi, {"rotate_scale": 0.2})
    corners = np.array(list(itertools.product(*[(-r / 2, r / 2) for r in roi])))
    c, s = math.cos(ROTATE_3D), math.sin(ROTATE_3D)
    turns = [np.array([[1, 0, 0], [0, c, -s], [0, s, c]]), np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
             np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])]
    for turn in turns:
        extent = np.ptp(corners @ turn.T, axis=0)
        assert (extent <= np.array(crop) + 1e-6).all(), (turn, extent, crop)
