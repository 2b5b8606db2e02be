"""Training end to end on the phantom: it learns, it tracks, it writes a self-describing run."""

import csv
import json
import re
from pathlib import Path

import pytest
import torch

from medseg.config import load_bundle
from medseg.engine.train import build_model, train

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
SMALL_VIT = '{"feature_size": 8, "hidden_size": 96, "mlp_dim": 192, "num_heads": 4}'
# A coarse phantom (4 mm voxels) so a 3D model learns in well under a minute on 2 CPU cores.
COARSE = ["data.phantom.cases=6", "data.val_fraction=0.34", "data.spacing=[4,4,4]", 'data.labels=["liver","spleen"]',
          "sliding_window.sw_batch_size=2", "tracking.backend=none", "train.iterations=null"]


def untrained_dice(bundle, run_dir: Path) -> float:
    """Mean foreground validation Dice of a freshly initialised model on the run's validation cases."""
    from monai.data import DataLoader, Dataset

    from medseg.config import bundle_from_dict
    from medseg.data.datasets import prepare
    from medseg.data.transforms import val_transforms
    from medseg.engine.validate import validate

    bundle = bundle_from_dict(json.loads((run_dir / "bundle.json").read_text()))  # as planned for the run

    _, lut, _, _, _ = prepare(bundle.data, bundle.data.labels)
    val = json.loads((run_dir / "splits.json").read_text())["val"]
    torch.manual_seed(bundle.train.seed)
    model = build_model(bundle)
    loader = DataLoader(Dataset(val, val_transforms(bundle, lut)), batch_size=1)
    return validate(model, loader, bundle, torch.device("cpu"))["mean_dice"]


@pytest.mark.slow
def test_unetr_learns_the_phantom(workdir):
    bundle = load_bundle(BUNDLES / "unetr.json", COARSE + [
        f"model.args={SMALL_VIT}", "train.roi=[32,32,32]", "train.samples_per_volume=2",
        "train.epochs=6", "train.iterations_per_epoch=40", "train.lr=1e-3"])
    result = train(bundle, show_progress=False)
    before = untrained_dice(bundle, result.run_dir)
    print(f"UNETR phantom: untrained mean Dice {before:.3f}, trained best {result.best_dice:.3f}")
    assert before < 0.25
    assert result.best_dice > 0.55
    assert result.best_dice > before + 0.3


# Held-out phantom Dice of the shipped 2D FCN, shortened to 100 steps (docs/benchmarks.md: 0.9 at its
# shipped 300). The bar is well above what the shipped bundles scored while inference padded windows
# with soft tissue instead of air (0.03): a broken train/inference pipeline cannot pass it.
HELDOUT_BAR = 0.75


@pytest.mark.slow
def test_shipped_fcn2d_segments_held_out_phantom_patients(workdir):
    """The shipped fcn2d bundle, as shipped but for its length (100 steps instead of 300), trained on
    the phantom, then run through inference (the Predictor) on two cases of another phantom stream,
    patients it never saw. Dice and volumes are counted here with numpy on the phantom's own label
    maps, not by medseg's validation or evaluation code."""
    import numpy as np

    from medseg.data.phantom import LABELS, make_case
    from medseg.engine.infer import Predictor

    bundle = load_bundle(BUNDLES / "fcn2d.json", ["tracking.backend=none", "train.iterations=100", "train.iterations_per_epoch=100"])
    result = train(bundle, show_progress=False)
    predictor = Predictor(result.run_dir, device="cpu")
    for index in (0, 1):  # one case stored RAS, one LPS
        case = make_case(seed=1, index=index)
        seg = predictor(case.image)
        pred, truth = np.asarray(seg.labels.dataobj), np.asarray(case.label.dataobj)
        ml = float(np.prod(case.label.header.get_zooms()[:3])) / 1000
        dice = {}
        for value, name in LABELS.items():
            if name not in bundle.data.labels:
                continue
            ours = pred == {v: k for k, v in seg.names.items()}[name]
            true = truth == value
            dice[name] = 2 * (ours & true).sum() / (ours.sum() + true.sum())
            print(f"held-out case {index} {name}: Dice {dice[name]:.3f}, {ours.sum() * ml:.0f} ml predicted, {true.sum() * ml:.0f} ml true")
            assert 0.6 < ours.sum() / true.sum() < 1.5, f"{name}: a {ours.sum() * ml:.0f} ml prediction for a {true.sum() * ml:.0f} ml organ"
        assert np.mean(list(dice.values())) > HELDOUT_BAR
        assert min(dice.values()) > 0.5


SMOKE = ["data.phantom.cases=3", "data.val_fraction=0.34", "data.spacing=[5,5,5]", 'data.labels=["liver","spleen"]',
         f"model.args={SMALL_VIT}", "train.roi=[32,32,32]", "train.samples_per_volume=1", "train.iterations_per_epoch=2",
         "sliding_window.sw_batch_size=2", "train.iterations=null"]


def test_run_directory_describes_itself_and_resumes(workdir):
    bundle = load_bundle(BUNDLES / "unetr.json", SMOKE + ["train.epochs=1", "tracking.backend=none"])
    result = train(bundle, show_progress=False)
    run = result.run_dir
    assert re.fullmatch(r"UNETR-AdamW-DiceCE-\d{8}-\d{4}-run01", run.name)
    for name in ("run.json", "bundle.json", "labels.json", "model_best.pt", "checkpoint.pt",
                 "metrics.csv", "model_summary.txt", "splits.json"):
        assert (run / name).is_file(), name
    assert not (run / "model_last.pt").exists()  # the last weights live in checkpoint.pt, not in a second copy
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "complete" and info["best_epoch"] == 1 and info["format_version"] == 3
    assert json.loads((run / "labels.json").read_text()) == {"0": "background", "1": "liver", "2": "spleen"}
    saved = load_bundle(run / "bundle.json")
    assert saved.model.args["hidden_size"] == 96 and saved.train.roi == [32, 32, 32]
    state = torch.load(run / "model_best.pt", weights_only=True)
    model = build_model(saved)
    model.load_state_dict(state)  # inference needs nothing but the run directory
    assert "parameters: " in (run / "model_summary.txt").read_text()

    from medseg.engine.train import load_bundle_for_resume

    more = load_bundle_for_resume(run, ["train.epochs=2"])
    again = train(more, run_dir=run, resume=True, show_progress=False)
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert again.name == result.name
    assert json.loads((run / "run.json").read_text())["status"] == "complete"
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 2

    from medseg.errors import MedsegError

    with pytest.raises(MedsegError, match="already trained 2 epochs"):
        train(more, run_dir=run, resume=True, show_progress=False)
    assert json.loads((run / "run.json").read_text())["status"] == "complete"  # untouched by the refused resume


def test_max_minutes_ends_training_at_the_time_budget(workdir, monkeypatch):
    """A budget of 2 s of optimiser steps on a run of 3 epochs x 3 steps: the clock (patched to advance
    1.5 s per step) says the budget is spent after step 2, in the middle of epoch 1, so the run ends
    there, validated and complete."""
    import medseg.engine.train as engine

    clock = {"t": 1000.0}
    real_step = engine._Session.train_step

    def slow_step(self, batch):
        clock["t"] += 1.5
        return real_step(self, batch)

    monkeypatch.setattr(engine._Session, "train_step", slow_step)
    monkeypatch.setattr(engine.time, "time", lambda: clock["t"])
    bundle = load_bundle(BUNDLES / "unetr.json", SMOKE + ["train.epochs=3", "tracking.backend=none", f"train.max_minutes={2 / 60}",
                                                          "train.iterations_per_epoch=3"])
    result = train(bundle, show_progress=False)
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["status"] == "complete" and info["time_limited"] is True
    assert info["steps"] == 2 and info["epochs"] == 1 and info["train_seconds"] == 3.0
    assert [row["epoch"] for row in result.history] == [1] and "val_mean_dice" in result.history[0]


def test_folds_share_one_plan_and_record_their_split(workdir):
    """K folds are planned on every case (nnU-Net), so two folds get the same CT statistics and can be
    ensembled; each run saves every fold's split and validates on its own part."""
    saved = []
    for fold in (0, 1):
        bundle = load_bundle(BUNDLES / "unetr.json", SMOKE + ["train.epochs=1", "tracking.backend=none", "data.phantom.cases=4",
                                                              "data.normalization=ct", 'data.ct_stats="auto"', "data.folds=2",
                                                              f"data.fold={fold}", "train.iterations_per_epoch=1"])
        run = train(bundle, show_progress=False).run_dir
        saved.append((json.loads((run / "bundle.json").read_text()), json.loads((run / "splits.json").read_text())))
    (b0, s0), (b1, s1) = saved
    assert b0["data"]["ct_stats"] == b1["data"]["ct_stats"]
    assert s0["folds"] == s1["folds"] and (s0["fold"], s1["fold"]) == (0, 1)
    assert sorted(c["name"] for c in s0["val"] + s1["val"]) == [f"phantom_00{i}" for i in range(4)]


def test_mlflow_run_is_logged_and_named(workdir, monkeypatch):
    import mlflow

    uri = f"sqlite:///{workdir / 'track.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    bundle = load_bundle(BUNDLES / "unetr.json", SMOKE + ["train.epochs=2", "tracking.experiment=medseg-test"])
    first = train(bundle, show_progress=False)
    second = train(bundle, show_progress=False)
    assert first.name.endswith("-run01") and second.name.endswith("-run02")

    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(first.tracking_run_id)
    assert run.info.run_name == first.name and run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == str(bundle.train.lr) and run.data.params["model.name"] == "unetr"
    assert float(run.data.params["data.ct_stats.std"]) > 0  # the planned values are logged, not "auto"
    assert json.loads(run.data.params["data.labels"]) == ["liver", "spleen"]
    assert int(run.data.params["parameters"]) == sum(p.numel() for p in build_model(bundle).parameters())
    for key in ("train_loss", "val_mean_dice", "val_mean_iou", "val_dice_liver", "val_dice_spleen"):
        assert key in run.data.metrics, key
    losses = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in losses] == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"bundle.json", "model_summary.txt", "model_best.pt", "metrics.csv", "labels.json"} <= artifacts


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vnet", "unetr", "swin_unetr", "fcn2d"])
def test_every_shipped_bundle_trains_through_the_cli(name, workdir, cli):
    shrink = ["data.phantom.cases=2", "data.spacing=[5,5,5]", "train.samples_per_volume=1", "train.iterations=1",
              "sliding_window.sw_batch_size=1"]
    if name in ("vnet", "unetr"):
        shrink.append("train.roi=[32,32,32]")
    if name == "fcn2d":
        shrink += ["train.roi=[32,32,1]", "sliding_window.roi=[32,32,8]"]
    args = ["train", BUNDLES / f"{name}.json", "--tracking", "none", "--no-progress"]
    for item in shrink:
        args += ["--set", item]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    runs = list((workdir / "runs").iterdir())
    assert len(runs) == 1 and json.loads((runs[0] / "run.json").read_text())["status"] == "complete"
    # the step ran with the bundle's head rate: the saved optimizer's head group at that multiple of the rest
    scale = load_bundle(BUNDLES / f"{name}.json").train.head_lr_scale
    groups = torch.load(runs[0] / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"]
    assert groups[0]["lr"] > 0
    assert [g["lr"] / groups[0]["lr"] for g in groups] == ([1.0] if scale == 1 else [1.0, pytest.approx(scale)])


@pytest.mark.slow
@pytest.mark.realdata
def test_unetr_learns_liver_on_real_ct(shared_data, workdir, cli):
    """The issue's command on the real abdominal CT, shrunk: 3 mm voxels, 32^3 patches, a short run."""
    args = ["train", BUNDLES / "unetr.json", "--tracking", "none", "--no-progress",
            "--set", f"data.source={shared_data / 'ct_abdomen_3mm'}",
            "--set", 'data.labels=["liver","spleen","stomach"]',
            "--set", f"data.source_labels={shared_data / 'totalseg_v2_labels.json'}",
            "--set", "data.spacing=[3,3,3]", "--set", "train.roi=[32,32,32]", "--set", f"model.args={SMALL_VIT}",
            "--set", "train.lr=1e-3", "--set", "train.epochs=12", "--set", "train.iterations_per_epoch=25",
            # this test's recipe (BTCV at 3 mm) as it was written: a learning check, not the shipped recipe
            "--set", "train.iterations=null", "--set", "train.augment=light", "--set", "data.normalization=window",
            "--set", "train.sampling=pos_neg", "--set", "train.warmup=0", "--set", "train.grad_clip=null", "--set", "train.scheduler=none",
            "--set", "train.samples_per_volume=2", "--set", "sliding_window.sw_batch_size=2"]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    run = next((workdir / "runs").iterdir())
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    liver = [float(r["val_dice_liver"]) for r in rows]
    print("real CT liver Dice by epoch:", [round(v, 3) for v in liver])
    assert max(liver) > 0.5
    assert liver[-1] > liver[0]

    # the inference check: the larger torso CT, segmented with this run, keeps its geometry
    import nibabel as nib

    torso = shared_data / "ct_torso_3mm.nii.gz"
    seg_path = workdir / "torso_seg.nii.gz"
    result = cli("infer", torso, "--run", run, "-o", seg_path, "--preview")
    assert result.exit_code == 0, result.output
    seg, src = nib.load(seg_path), nib.load(torso)
    assert seg.shape == src.shape and (seg.affine == src.affine).all()
    sidecar = json.loads((workdir / "torso_seg.json").read_text())
    assert sidecar["volume_ml"]["liver"] > 100  # a liver-sized object was found
    assert (workdir / "torso_seg.png").stat().st_size > 10_000


def _spleen_on_msd(shared_data, run_dir: Path) -> tuple[float, float]:
    """(Dice, predicted ml) of the spleen a run segments on msd_spleen_8."""
    import nibabel as nib
    import numpy as np

    from medseg.engine.infer import Predictor

    seg = Predictor(run_dir, device="cpu")(shared_data / "msd_spleen_8" / "image.nii.gz", classes=["spleen"])
    pred = np.asarray(seg.labels.dataobj) > 0
    truth = np.asarray(nib.load(shared_data / "msd_spleen_8" / "label.nii.gz").dataobj) == 1
    return float(2 * (pred & truth).sum() / (pred.sum() + truth.sum())), seg.volume_ml["spleen"]


# Spleen Dice on msd_spleen_8 after 150 steps (docs/benchmarks.md): strong 0.662 / 0.433 and light 0.000 / 0.000
# for train.seed 0 / 1, then 0.697 / 0.000 for seed 0 once inference padded like training. The test runs seed 0
# and asks for a bit more than half the smallest gap.
STRONG_MARGIN = 0.25
STRONG_FLOOR = 0.35


@pytest.mark.slow
@pytest.mark.realdata
def test_strong_augmentation_generalises_better_than_light(shared_data, workdir):
    """The issue's generalisation check, shortened: the shipped 2D FCN trained 150 steps on the
    non-contrast ct_abdomen_3mm with the strong preset and with the light (BTCV) one, each scored on
    the spleen of msd_spleen_8 (another patient, scanner and contrast phase, 30 mm slices). Strong
    must win by STRONG_MARGIN, score at least STRONG_FLOOR, and find a spleen-sized object (the
    true one is 756 ml). Both are scored as shipped, each organ kept to its largest component."""
    common = [f"data.source={shared_data / 'ct_abdomen_3mm'}", f"data.source_labels={shared_data / 'totalseg_v2_labels.json'}",
              'data.labels=["spleen","liver","kidney_right","kidney_left","stomach"]',
              'postprocess.largest_component=["spleen","liver","kidney_right","kidney_left","stomach"]',
              "data.val_fraction=0", "tracking.backend=none", "train.iterations=150", "train.iterations_per_epoch=150",
              'train.augment_p={"enhance": 0}']
    dice, ml = {}, {}
    for preset in ("strong", "light"):
        bundle = load_bundle(BUNDLES / "fcn2d.json", [*common, f"train.augment={preset}"])
        result = train(bundle, runs_root=workdir / preset, show_progress=False)
        dice[preset], ml[preset] = _spleen_on_msd(shared_data, result.run_dir)
    print(f"spleen on msd_spleen_8: strong Dice {dice['strong']:.3f} ({ml['strong']:.0f} ml), "
          f"light {dice['light']:.3f} ({ml['light']:.0f} ml)")
    assert dice["strong"] > dice["light"] + STRONG_MARGIN
    assert dice["strong"] > STRONG_FLOOR
    assert 150 < ml["strong"] < 1500
