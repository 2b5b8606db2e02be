"""Distributed training: torchrun + DDP with gloo on the CPU, two ranks on the phantom.

What is checked comes from outside the code under test: the cases each rank's loader actually gave
(the batches' own names), the validation Dice recomputed by one process over every validation case
from the saved weights, and a stopped-and-resumed two-rank training against an uninterrupted one.
"""

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

from medseg.engine.distributed import Dist, shard

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "bundles" / "smoke.json"
# 7 phantom cases: 4 train (2 per rank), 3 validation (2 on rank 0, 1 on rank 1)
DATA = ["--set", "data.phantom.cases=7", "--set", "data.val_fraction=0.4"]
SETS = [*DATA, "--tracking", "none", "--progress", "plain"]

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _medseg(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medseg", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})}, cwd=kw.get("cwd"))


def test_shard_is_disjoint_and_covers():
    items = list(range(11))
    parts = [shard(items, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == items
    assert all(not set(a) & set(b) for i, a in enumerate(parts) for b in parts[i + 1:])
    assert {len(p) for p in parts} == {3, 4}


def test_one_process_collectives_are_identities():
    d = Dist()
    assert d.any(True, False) == [True, False] and d.mean(2.5) == 2.5 and d.gather("x") == ["x"] and d.broadcast(3) == 3


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    """Two gloo ranks, tracked in an SQLite MLflow store (rank 0 alone may write to it)."""
    root = tmp_path_factory.mktemp("ddp")
    run_dir = root / "run"
    r = _medseg("train", str(SMOKE), "--nproc", "2", "--run-dir", str(run_dir), *DATA, "--progress", "plain", "--set", "tracking.backend=mlflow",
                env={"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"})
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir


def test_only_rank_zero_tracks(ddp_run):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{ddp_run.parent / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert len(client.get_metric_history(runs[0].info.run_id, "val_mean_dice")) == 2  # one per epoch, not one per rank


def test_two_ranks_train_disjoint_shards(ddp_run):
    info = json.loads((ddp_run / "run.json").read_text())
    assert info["status"] == "complete"
    d = info["distributed"]
    assert d["world_size"] == 2 and d["backend"] == "gloo"
    seen = [set(names) for names in d["seen_train"]]  # what each rank's DataLoader gave, read off its batches
    assert all(seen) and not seen[0] & seen[1]
    splits = json.loads((ddp_run / "splits.json").read_text())
    assert seen[0] | seen[1] == {c["name"] for c in splits["train"]}
    assert len(splits["val"]) == 3 and [len(v) for v in d["val_shards"]] == [2, 1]


def test_validation_dice_is_reduced_over_ranks(ddp_run):
    """The logged Dice of the last epoch equals one process's validation of all three validation
    cases with the saved last weights; it is neither one rank's share alone nor the mean of the two
    ranks' means (rank 0 holds two cases, rank 1 one)."""
    from monai.data import Dataset

    from medseg.data.datasets import prepare
    from medseg.data.transforms import val_transforms
    from medseg.engine.run import Run
    from medseg.engine.validate import validate

    run = Run.open(ddp_run)
    bundle = run.bundle
    model = run.build_model("last")  # the saved checkpoint loads
    _, lut, _, val_cases, _ = prepare(bundle.data, bundle.data.labels)
    logged = float(run.read_metrics()[-1]["val_mean_dice"])

    def dice(cases) -> float:
        ds = Dataset([c.as_dict() for c in cases], val_transforms(bundle, lut))
        return validate(model, ds, bundle, torch.device("cpu"))["mean_dice"]

    assert dice(val_cases) == pytest.approx(logged, abs=1e-6)
    shards = [shard(val_cases, r, 2) for r in range(2)]
    per_rank = [dice(s) for s in shards]
    for wrong in (*per_rank, sum(per_rank) / 2):
        assert abs(wrong - logged) > 1e-4


def test_checkpoint_serves_inference(ddp_run, tmp_path):
    from medseg.data.phantom import write_phantom
    from medseg.engine.infer import Predictor

    write_phantom(tmp_path / "ds", 1, seed=5)
    image = next((tmp_path / "ds" / "imagesTr").glob("*.nii.gz"))
    import nibabel as nib
    import numpy as np

    seg = Predictor(ddp_run, device="cpu")(image)
    src = nib.load(image)
    assert seg.labels.shape == src.shape and np.allclose(seg.labels.affine, src.affine) and set(seg.volume_ml) == {"liver", "spleen"}


def test_sigterm_then_resume_equals_uninterrupted(tmp_path):
    """SIGTERM to `medseg train --nproc 2` mid-epoch: every rank stops at the same step, rank 0
    checkpoints (each rank's RNG state in it), exit 143; `--resume --nproc 2` then ends with the
    weights of an uninterrupted two-rank training, bit for bit (CPU, gloo)."""
    more = ["--set", "train.epochs=3"]
    straight = tmp_path / "straight"
    r = _medseg("train", str(SMOKE), "--nproc", "2", "--run-dir", str(straight), *SETS, *more)
    assert r.returncode == 0, r.stderr[-3000:]

    stopped = tmp_path / "stopped"
    log = tmp_path / "log.txt"
    env = {**os.environ, "MEDSEG_TEST_HOOK": "step:3", "MEDSEG_TEST_HOOK_SECONDS": "5"}
    with open(log, "w") as fh:
        p = subprocess.Popen([sys.executable, "-m", "medseg", "train", str(SMOKE), "--nproc", "2", "--run-dir", str(stopped), *SETS, *more],
                             stdout=fh, stderr=subprocess.STDOUT, env=env, text=True)
        deadline = time.time() + 300
        while "medseg-test-hook: step:3" not in log.read_text() and time.time() < deadline and p.poll() is None:
            time.sleep(0.2)
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=120) == 143, log.read_text()[-3000:]
    text = log.read_text()
    assert text.count("checkpoint written") == 1  # rank 0 speaks for both
    ckpt = torch.load(stopped / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 3 and ckpt["world_size"] == 2 and len(ckpt["rng_ranks"]) == 2
    assert json.loads((stopped / "run.json").read_text())["status"] == "interrupted"

    r = _medseg("train", "--resume", "--run-dir", str(stopped), "--nproc", "2", "--progress", "plain")
    assert r.returncode == 0, r.stderr[-3000:]
    a = torch.load(straight / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(stopped / "checkpoint.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nproc_refuses_bad_input(cli, tmp_path):
    r = cli("train", SMOKE, "--nproc", "0")
    assert r.exit_code == 2
    r = cli("train", tmp_path / "missing.json", "--nproc", "2")  # the bundle is checked before torchrun starts
    assert r.exit_code == 2 and "missing.json" in r.output and "torch" not in r.output.lower()


def test_ranks_stop_when_the_launcher_is_killed(tmp_path):
    """SIGKILL of `medseg train --nproc 2` (an OOM killer, a lost login) must not leave two orphan
    ranks training on, holding the run: the kernel sends them SIGTERM, they checkpoint and stop."""
    run_dir = tmp_path / "run"
    log = tmp_path / "log.txt"
    env = {**os.environ, "MEDSEG_TEST_HOOK": "step:3", "MEDSEG_TEST_HOOK_SECONDS": "3"}
    with open(log, "w") as fh:
        p = subprocess.Popen([sys.executable, "-m", "medseg", "train", str(SMOKE), "--nproc", "2", "--run-dir", str(run_dir), *SETS,
                              "--set", "train.epochs=30"], stdout=fh, stderr=subprocess.STDOUT, env=env, text=True)
        deadline = time.time() + 300
        while "medseg-test-hook: step:3" not in log.read_text() and time.time() < deadline and p.poll() is None:
            time.sleep(0.2)
        p.kill()
        p.wait()
    deadline = time.time() + 120
    while time.time() < deadline and json.loads((run_dir / "run.json").read_text())["status"] == "running":
        time.sleep(0.5)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "interrupted", log.read_text()[-2000:]
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["step"] == 3
