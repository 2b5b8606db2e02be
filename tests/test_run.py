"""The run directory under stress: exact resume, refused resumes that touch nothing, SIGKILL at three
moments, a second writer, MLflow continuity from another directory, checkpoint cost, AMP choice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import medseg.engine.train as T
from medseg.config import load_bundle
from medseg.engine.run import Run, latest_complete_run
from medseg.errors import MedsegError

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
# The smoke bundle (small ViT UNETR, 4 mm phantom) made shorter: 3 iterations per epoch.
SHORT = ["train.iterations_per_epoch=3", "train.samples_per_volume=1", "tracking.backend=none"]
# The head at 5x: a resume must restore both parameter groups and their rates.
EXACT = ["train.epochs=3", "train.scheduler=cosine", "model.args.dropout_rate=0.2", "train.head_lr_scale=5"]


def smoke(*overrides: str):
    return load_bundle(BUNDLES / "smoke.json", SHORT + list(overrides))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != ".lock"}


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def stop_at(step: int, monkeypatch) -> T.StopFlag:
    """A stop request as the CLI's SIGTERM handler makes it, raised right after optimiser step ``step``."""
    flag = T.StopFlag()
    monkeypatch.setattr(T, "test_hook", lambda name: flag.request(signal.SIGTERM) if name == f"step:{step}" else None)
    return flag


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """3 epochs x 3 iterations, cosine schedule, uninterrupted: the reference every resume must equal.
    The ViT's dropout draws from the global torch RNG, so a resume must restore it too."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    T.train(smoke(*EXACT), run_dir=run_dir, progress="off")
    return Run.open(run_dir)


def test_the_head_trained_at_its_multiple_of_the_rate(straight):
    """train.head_lr_scale reaches the optimiser: the last step's rates, as saved, are 5x apart."""
    groups = torch.load(straight.path / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"]
    assert len(groups) == 2 and groups[0]["lr"] > 0
    assert groups[1]["lr"] == pytest.approx(5 * groups[0]["lr"], rel=1e-9)
    assert len(groups[1]["params"]) == 2  # UNETR's head: the 1x1 convolution's weight and bias


def test_resume_mid_epoch_is_bitwise_identical(straight, tmp_path, monkeypatch):
    bundle = smoke(*EXACT)
    with pytest.raises(T.Stopped) as stopped:
        T.train(bundle, run_dir=tmp_path / "run", progress="off", stop=stop_at(4, monkeypatch))  # epoch 2, iteration 1
    assert (stopped.value.epoch, stopped.value.iteration) == (2, 1)
    run = Run.open(tmp_path / "run")
    assert run.status == "interrupted" and run.checkpoint()["step"] == 4
    assert not same_weights(run.load_state_dict("last"), straight.load_state_dict("last"))
    monkeypatch.setattr(T, "test_hook", lambda name: None)
    T.train(T.load_bundle_for_resume(run.path, []), run_dir=run.path, resume=True, progress="off")
    run = Run.open(run.path)
    assert run.status == "complete"
    assert same_weights(run.load_state_dict("last"), straight.load_state_dict("last"))
    assert same_weights(run.load_state_dict("best"), straight.load_state_dict("best"))
    mine, ref = run.read_metrics(), straight.read_metrics()
    assert [r["epoch"] for r in mine] == ["1", "2", "3"]
    for a, b in zip(mine, ref):  # one continuous history, equal to the uninterrupted one
        assert (a["train_loss"], a["lr"], a["val_mean_dice"]) == (b["train_loss"], b["lr"], b["val_mean_dice"])


def test_raising_epochs_continues_the_schedule_downwards(tmp_path):
    """The old resume restored CosineAnnealingLR's T_max, so after raising train.epochs the rate
    climbed back towards its start; now it continues down from where it was."""
    run_dir = tmp_path / "run"
    with pytest.raises(T.Stopped):
        flag = T.StopFlag()
        flag.request(signal.SIGTERM)  # stop after the very first step
        T.train(smoke("train.epochs=2", "train.scheduler=cosine", "train.lr=1e-3", "train.val_interval=10"), run_dir=run_dir,
                progress="off", stop=flag)
    T.train(T.load_bundle_for_resume(run_dir, ["train.epochs=5"]), run_dir=run_dir, resume=True, progress="off")
    lrs = [float(r["lr"]) for r in Run.open(run_dir).read_metrics()]
    assert len(lrs) == 5 and lrs[0] < 1e-3
    assert all(b < a for a, b in zip(lrs, lrs[1:])), lrs  # monotone: no climb, no jump


def test_incompatible_resume_is_refused_before_anything_is_written(tmp_path):
    run_dir = tmp_path / "run"
    T.train(smoke("train.epochs=1"), run_dir=run_dir, progress="off")
    before = snapshot(run_dir)
    for change, key in [("model.args.hidden_size=48", "model.args.hidden_size"), ('data.labels=["liver"]', "data.labels"),
                        ("train.roi=[48,48,48]", "train.roi"), ("data.spacing=[3,3,3]", "data.spacing"),
                        ("data.hu_window=[-100,200]", "data.hu_window"), ("train.head_lr_scale=5", "train.head_lr_scale")]:
        bundle = T.load_bundle_for_resume(run_dir, ["train.epochs=2", change])
        with pytest.raises(MedsegError, match=f"with {key} changed"):
            T.train(bundle, run_dir=run_dir, resume=True, progress="off")
        assert snapshot(run_dir) == before, change  # bundle, labels, weights, status: untouched
    assert Run.open(run_dir).status == "complete"
    run = Run.open(run_dir)
    # a key filled into an empty mapping is one change, named by its own path ("unset", not "{} -> None")
    with pytest.raises(MedsegError, match=r"with train\.augment_p\.noise changed \(unset -> 0\.2\): ") as e:
        run.check_resume(T.load_bundle_for_resume(run_dir, ['train.augment_p={"noise": 0.2}']))
    assert "more)" not in str(e.value)
    assert run.check_resume(T.load_bundle_for_resume(run_dir, ['postprocess.largest_component=["liver"]'])) == [
        "postprocess.largest_component: [] -> ['liver']"]
    with pytest.raises(MedsegError, match="already trained 1 epochs"):
        T.train(T.load_bundle_for_resume(run_dir, []), run_dir=run_dir, resume=True, progress="off")
    assert snapshot(run_dir) == before


def test_checkpoints_are_written_when_due_not_every_epoch(tmp_path, monkeypatch):
    writes: list[int] = []
    best: list[int] = []
    monkeypatch.setattr(Run, "save_checkpoint", lambda self, state: writes.append(state["step"]))
    monkeypatch.setattr(Run, "save_best", lambda self, state: best.append(len(writes)))
    result = T.train(smoke("train.epochs=2"), run_dir=tmp_path / "a", progress="off")  # default every 10 min
    assert writes == [6]  # the end of training only
    dice = [float(r["val_mean_dice"]) for r in result.history]
    assert len(best) == 1 + sum(b > max(dice[:i + 1]) for i, b in enumerate(dice[1:]))  # model_best.pt on improvement only
    writes.clear()
    T.train(smoke("train.epochs=2", "train.checkpoint_every=4it", "train.val_interval=2"), run_dir=tmp_path / "b", progress="off")
    assert writes == [4, 6]  # mid-epoch when due, and at the end
    writes.clear()
    T.train(smoke("train.epochs=2", "train.checkpoint_every=epoch", "train.val_interval=2"), run_dir=tmp_path / "c", progress="off")
    assert writes == [3, 6]
    assert not (tmp_path / "c" / "model_last.pt").exists()


def test_mlflow_resume_continues_the_same_run_from_another_directory(tmp_path, monkeypatch):
    import mlflow

    first, other = tmp_path / "first", tmp_path / "other"
    first.mkdir()
    other.mkdir()
    monkeypatch.chdir(first)  # the default store: first/mlflow.db
    bundle = load_bundle(BUNDLES / "smoke.json", [*SHORT[:2], "train.epochs=3", "tracking.backend=mlflow", "tracking.experiment=resume"])
    with pytest.raises(T.Stopped):
        T.train(bundle, run_dir=first / "run", progress="off", stop=stop_at(4, monkeypatch))
    monkeypatch.setattr(T, "test_hook", lambda name: None)
    monkeypatch.chdir(other)  # resumed from elsewhere: the run's own store, not ./mlflow.db
    result = T.train(T.load_bundle_for_resume(first / "run", []), run_dir=first / "run", resume=True, progress="off")
    assert not (other / "mlflow.db").exists()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{first / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == result.tracking_run_id and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(result.tracking_run_id, "train_loss")] == [1, 2, 3]


def test_amp_mode_follows_native_bf16(monkeypatch):
    """V100/T4 (compute capability 7.x) get fp16 with a gradient scaler; torch's is_bf16_supported()
    counted emulation and sent them down the bf16 path."""
    from medseg.engine import device as D

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 0))
    assert D.amp_mode(True, cuda) == "fp16" and D.grad_scaler("fp16") is not None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    assert D.amp_mode(True, cuda) == "bf16" and D.grad_scaler("bf16") is None
    assert D.amp_mode(True, torch.device("cpu")) == "off" and D.amp_mode(False, cuda) == "off"


# ---------------------------------------------------------------------------------------------
# SIGKILL, as the OOM killer or a power cut would do it, at three moments; then resume.

CLI = [sys.executable, "-m", "medseg.cli"]


def start(run_dir: Path, hook: str | None, *extra: str, every: str = "2it", epochs: int = 3) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MEDSEG_TEST_HOOK_SECONDS": "120"}
    env.pop("MEDSEG_TEST_HOOK", None)
    if hook:
        env["MEDSEG_TEST_HOOK"] = hook
    args = [*CLI, "train", "--progress", "plain", "--tracking", "none"]
    if extra and extra[0] == "--resume":
        args += ["--resume", "--run-dir", str(run_dir)]
    else:
        args += [str(BUNDLES / "smoke.json"), "--run-dir", str(run_dir)]
        for item in [*SHORT, *EXACT, f"train.epochs={epochs}", f"train.checkpoint_every={every}"]:
            args += ["--set", item]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def kill_at_hook(proc: subprocess.Popen, hook: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    for line in proc.stderr:
        if f"medseg-test-hook: {hook}" in line:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        if time.time() > deadline:
            break
    proc.kill()
    out = proc.communicate()
    raise AssertionError(f"never reached hook {hook}: {out}")


def after_kill(run_dir: Path) -> Run:
    run = Run.open(run_dir)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"  # what the dead process left
    assert run.status == "killed"  # recognised: nobody holds the lock
    with pytest.raises(MedsegError):
        latest_complete_run(run_dir.parent)  # never taken for a finished run
    return run


def test_sigkill_mid_epoch_in_validation_and_in_a_checkpoint_write_then_resume(straight, tmp_path):
    run_dir = tmp_path / "run"
    # 1. killed after step 1, before its first checkpoint (due at step 2): resumable from the start
    kill_at_hook(start(run_dir, "step:1"), "step:1")
    assert after_kill(run_dir).checkpoint() is None
    # 2. mid-epoch: epoch 2, after step 5 (the last checkpoint is step 4)
    kill_at_hook(start(run_dir, "step:5", "--resume"), "step:5")
    assert after_kill(run_dir).checkpoint()["step"] == 4
    # 3. during validation of epoch 2 (its checkpoint, due after validation, and its metrics row never written)
    kill_at_hook(start(run_dir, "validation", "--resume"), "validation")
    run = after_kill(run_dir)
    assert run.checkpoint()["step"] == 4 and [r["epoch"] for r in run.read_metrics()] == ["1"]
    # 4. inside the checkpoint write after epoch 2: the temporary file exists, the previous checkpoint still loads
    kill_at_hook(start(run_dir, "checkpoint_write", "--resume"), "checkpoint_write")
    run = after_kill(run_dir)
    assert list(run_dir.glob(".checkpoint.pt.*.tmp")), "the stalled write left its temporary file"
    assert run.checkpoint()["step"] == 4
    torch.load(run_dir / "model_best.pt", weights_only=True)
    # 5. to the end: no stale temporary file, complete, and the same weights as the uninterrupted run
    proc = start(run_dir, None, "--resume")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert not list(run_dir.glob(".*.tmp"))
    run = Run.open(run_dir)
    assert run.status == "complete" and [r["epoch"] for r in run.read_metrics()] == ["1", "2", "3"]
    assert same_weights(run.load_state_dict("last"), straight.load_state_dict("last"))
    assert "epoch 3/3  done" in err and "ETA" in err  # plain progress lines in a log


def test_kill_between_checkpoint_and_metrics_loses_no_row(tmp_path):
    run_dir = tmp_path / "run"
    kill_at_hook(start(run_dir, "epoch_end", every="epoch"), "epoch_end")  # epoch 1 checkpointed, its row never written
    assert Run.open(run_dir).checkpoint()["step"] == 3 and not (run_dir / "metrics.csv").exists()
    kill_at_hook(start(run_dir, "step:4", "--resume"), "step:4")  # the resume writes the checkpointed row at once
    assert [r["epoch"] for r in Run.open(run_dir).read_metrics()] == ["1"]
    # the last epoch: killed after the final checkpoint, the resume finishes the run instead of refusing it
    last = tmp_path / "last"
    kill_at_hook(start(last, "epoch_end", every="epoch", epochs=1), "epoch_end")
    proc = start(last, None, "--resume")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    run = Run.open(last)
    assert run.status == "complete" and [r["epoch"] for r in run.read_metrics()] == ["1"]


def test_a_second_writer_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    proc = start(run_dir, "step:2")
    try:
        for line in proc.stderr:
            if "medseg-test-hook: step:2" in line:
                break
        assert Run.open(run_dir).status == "running"
        with pytest.raises(MedsegError, match="being written by another medseg process"):
            Run.open(run_dir).acquire()
        with pytest.raises(MedsegError, match="being trained by another process"):
            T.train(T.load_bundle_for_resume(run_dir, []), run_dir=run_dir, resume=True, progress="off")
        with pytest.raises(MedsegError, match="already holds a run"):
            T.train(smoke("train.epochs=1"), run_dir=run_dir, progress="off")
    finally:
        proc.kill()
        proc.wait()
    assert Run.open(run_dir).status == "killed"


def test_a_stop_before_training_starts_exits_at_once_and_writes_nothing(tmp_path):
    """Checking and caching data can take long; a scheduler's SIGTERM there must not wait for the
    first step (it would be followed by SIGKILL)."""
    run_dir = tmp_path / "run"
    proc = start(run_dir, "data_ready")
    for line in proc.stderr:
        if "medseg-test-hook: data_ready" in line:
            t0 = time.time()
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and time.time() - t0 < 20, err
    assert "before training started" in err and not run_dir.exists()


def test_sigterm_stops_at_a_step_checkpoints_and_says_how_to_resume(tmp_path):
    run_dir = tmp_path / "run"
    proc = start(run_dir, None)
    for line in proc.stderr:
        if "epoch 1/3  done" in line:
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert f"medseg train --resume --run-dir {run_dir}" in err
    run = Run.open(run_dir)
    assert run.status == "interrupted" and run.checkpoint()["step"] >= 3


def test_extending_a_complete_run_continues_the_learning_rate(tmp_path):
    run_dir = tmp_path / "run"
    T.train(smoke("train.epochs=2", "train.scheduler=cosine", "train.lr=1e-3", "train.val_interval=10"), run_dir=run_dir, progress="off")
    T.train(T.load_bundle_for_resume(run_dir, ["train.epochs=4"]), run_dir=run_dir, resume=True, progress="off")
    lrs = [float(r["lr"]) for r in Run.open(run_dir).read_metrics()]
    assert len(lrs) == 4 and all(b <= a for a, b in zip(lrs, lrs[1:])), lrs  # no jump back to 1e-3 after the schedule ended


def test_a_failed_resume_leaves_a_complete_run_as_it_was(tmp_path, monkeypatch):
    """The run's MLflow store is gone: the resume fails before a file of the run changes, and no
    empty store is created in its place."""
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    bundle = load_bundle(BUNDLES / "smoke.json", [*SHORT[:2], "train.epochs=1", "tracking.backend=mlflow", "tracking.experiment=gone"])
    T.train(bundle, run_dir=run_dir, progress="off")
    (tmp_path / "mlflow.db").rename(tmp_path / "moved.db")
    before = snapshot(run_dir)
    with pytest.raises(MedsegError, match="MLflow store .* is gone"):
        T.train(T.load_bundle_for_resume(run_dir, ["train.epochs=2"]), run_dir=run_dir, resume=True, progress="off")
    assert snapshot(run_dir) == before and Run.open(run_dir).status == "complete"
    assert not (tmp_path / "mlflow.db").exists()
    # with tracking off the resume works, and the run keeps its MLflow link for a later resume
    T.train(T.load_bundle_for_resume(run_dir, ["train.epochs=2", "tracking.backend=none"]), run_dir=run_dir, resume=True, progress="off")
    info = Run.open(run_dir).info
    assert info["tracking_run_id"] and info["tracking_uri"].endswith("mlflow.db")


def test_resume_refuses_a_changed_dataset(tmp_path):
    from conftest import tiny_case, write_case

    for i in range(3):
        write_case(tmp_path / "data", f"c{i}", *tiny_case(seed=i))
    bundle = smoke("train.epochs=1", f"data.source={tmp_path / 'data'}", 'data.labels=["blob"]', "data.val_fraction=0.34",
                   "data.spacing=[4,4,4]")
    T.train(bundle, run_dir=tmp_path / "run", progress="off")
    write_case(tmp_path / "data", "c3", *tiny_case(seed=3))
    before = snapshot(tmp_path / "run")
    with pytest.raises(MedsegError, match="cases changed since it started"):
        T.train(T.load_bundle_for_resume(tmp_path / "run", ["train.epochs=2"]), run_dir=tmp_path / "run", resume=True, progress="off")
    assert snapshot(tmp_path / "run") == before


def test_mlflow_gets_the_epochs_a_crashed_process_never_logged(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    bundle = load_bundle(BUNDLES / "smoke.json", [*SHORT[:2], "train.epochs=2", "train.checkpoint_every=epoch",
                                                  "tracking.backend=mlflow", "tracking.experiment=gaps"])

    class Crash(Exception):
        pass

    def crash(name):
        if name == "epoch_end":  # after epoch 1's checkpoint, before its metrics are logged
            raise Crash

    monkeypatch.setattr(T, "test_hook", crash)
    with pytest.raises(Crash):
        T.train(bundle, run_dir=tmp_path / "run", progress="off")
    run_id = Run.open(tmp_path / "run").info["tracking_run_id"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_metric_history(run_id, "train_loss") == []
    monkeypatch.setattr(T, "test_hook", lambda name: None)
    T.train(T.load_bundle_for_resume(tmp_path / "run", []), run_dir=tmp_path / "run", resume=True, progress="off")
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [1, 2]


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    from medseg.engine.state import capture_rng, restore_rng

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(capture_rng(), tmp_path / "rng.pt")
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_notes_keep_their_brackets(tmp_path, cli):
    run_dir = tmp_path / "run"
    T.train(smoke("train.epochs=1"), run_dir=run_dir, progress="off")
    result = cli("train", "--resume", "--run-dir", run_dir, "--tracking", "none", "--progress", "off",
                 "--set", "train.epochs=2", "--set", "description=run B [ablation] [/]")
    assert result.exit_code == 0, result.output
    assert "[ablation] [/]" in result.stderr
