"""Cohort inference: shared out over worker processes, resumable, with a summary of every case.

Two workers must give the labels one process gives, byte for byte in the arrays; a cohort killed
mid-way (SIGKILL: no chance to tidy up) and re-run must finish the rest without touching the cases
already done (their files keep their inode and mtime).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.engine.cohort import my_cases, parse_part
from medseg.errors import MedsegError

ROOT = Path(__file__).resolve().parents[1]


def _medseg(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "medseg", *map(str, args)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})}, **kw)


def test_parse_part():
    assert parse_part("0/4") == (0, 4) and parse_part("3/4") == (3, 4)
    for bad in ("4/4", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(MedsegError):
            parse_part(bad)
    cases = [(Path(f"c{i}"), None) for i in range(5)]
    parts = [my_cases(cases, (i, 2)) for i in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(cases) and not set(parts[0]) & set(parts[1])


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A run of the smoke bundle (one short epoch) and 4 phantom scans."""
    from medseg.config import load_bundle
    from medseg.data.phantom import write_phantom
    from medseg.engine.train import train

    root = tmp_path_factory.mktemp("cohort")
    bundle = load_bundle(ROOT / "bundles" / "smoke.json", ["train.epochs=1", "tracking.backend=none"])
    result = train(bundle, run_dir=root / "run", device="cpu", show_progress=False)
    write_phantom(root / "ds", 4, seed=11)
    scans = root / "scans"
    scans.mkdir()
    for p in sorted((root / "ds" / "imagesTr").glob("*.nii.gz")):
        os.link(p, scans / p.name)
    return result.run_dir, scans


def _labels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(nib.load(p).dataobj) for p in sorted(folder.glob("*_seg.nii.gz"))}


@pytest.mark.slow
@pytest.mark.distributed
def test_two_workers_equal_one_and_resume_after_kill(cohort, tmp_path):
    run, scans = cohort
    one = _medseg("infer", scans, "-o", tmp_path / "one", "--run", run, "--device", "cpu")
    assert one.returncode == 0, one.stderr[-2000:]
    reference = _labels(tmp_path / "one")
    assert len(reference) == 4 and all(a.any() for a in reference.values())

    two = _medseg("infer", scans, "-o", tmp_path / "two", "--run", run, "--device", "cpu", "--nproc", "2")
    assert two.returncode == 0, two.stderr[-2000:]
    got = _labels(tmp_path / "two")
    assert got.keys() == reference.keys() and all(np.array_equal(got[k], reference[k]) for k in got)
    workers = {c["worker"] for c in json.loads((tmp_path / "two" / "summary.json").read_text())["cases"]}
    assert workers == {"0/2", "1/2"}

    # killed mid-cohort: each worker sleeps before its 2nd case, and the whole process group is SIGKILLed there
    out = tmp_path / "killed"
    log = tmp_path / "log.txt"
    with open(log, "w") as fh:
        p = subprocess.Popen([sys.executable, "-m", "medseg", "infer", str(scans), "-o", str(out), "--run", str(run), "--device", "cpu",
                              "--nproc", "2"], stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                             env={**os.environ, "MEDSEG_TEST_HOOK": "case:2", "MEDSEG_TEST_HOOK_SECONDS": "120"})
        deadline = time.time() + 300
        while log.read_text().count("medseg-test-hook: case:2") < 2 and time.time() < deadline and p.poll() is None:
            time.sleep(0.2)
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    first = {q.name: (q.stat().st_ino, q.stat().st_mtime_ns) for q in out.glob("*_seg.nii.gz")}
    assert len(first) == 2, log.read_text()[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"done": 2, "failed": 0, "pending": 2}

    again = _medseg("infer", scans, "-o", out, "--run", run, "--device", "cpu", "--nproc", "2")
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count(": done earlier (") == 2  # results on stdout, as from one process
    for name, stamp in first.items():  # not redone
        q = out / name
        assert (q.stat().st_ino, q.stat().st_mtime_ns) == stamp
    got = _labels(out)
    assert got.keys() == reference.keys() and all(np.array_equal(got[k], reference[k]) for k in got)
    assert not [q for q in out.iterdir() if q.name.startswith(".")], "no lock or temporary file left"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"done": 4, "failed": 0, "pending": 0}
    rows = {r["name"]: r for r in summary["cases"]}
    assert all(r["seconds"] > 0 and r["volume_ml"]["liver"] > 0 for r in rows.values())


@pytest.mark.slow
def test_a_bad_case_is_reported_and_the_rest_done(cohort, tmp_path, cli):
    run, scans = cohort
    data = tmp_path / "data"
    data.mkdir()
    good = sorted(scans.glob("*.nii.gz"))[:2]
    for g in good:
        os.link(g, data / g.name)
    raw = good[0].read_bytes()
    (data / "broken.nii.gz").write_bytes(raw[: len(raw) // 3])
    r = cli("infer", data, "-o", tmp_path / "out", "--run", run, "--device", "cpu", "--part", "0/1")
    assert r.exit_code == 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["counts"] == {"done": 2, "failed": 1, "pending": 0}
    bad = next(c for c in summary["cases"] if c["name"] == "broken")
    assert bad["status"] == "failed" and "corrupt or truncated" in bad["error"]
    csv_text = (tmp_path / "out" / "summary.csv").read_text()
    assert csv_text.splitlines()[0].startswith("name,status,seconds") and "liver_ml" in csv_text.splitlines()[0]

    # a re-run with other settings does not pass the earlier outputs off as its own (and --force replaces them)
    r = cli("infer", data, "-o", tmp_path / "out", "--run", run, "--device", "cpu", "--tta")
    assert r.exit_code == 1 and "not a complete output of this run" in r.output


@pytest.mark.slow
def test_an_unexpected_error_fails_one_case_only(cohort, tmp_path, cli, monkeypatch):
    """Not only medseg's own errors: a crash inside one case (out of memory, a library bug) is that case's failure."""
    from medseg.engine.infer import Predictor

    run, scans = cohort
    victim = sorted(scans.glob("*.nii.gz"))[1]
    real = Predictor.__call__

    def flaky(self, image, **kw):
        if kw.get("source") == str(victim):
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(self, image, **kw)

    monkeypatch.setattr(Predictor, "__call__", flaky)
    r = cli("infer", scans, "-o", tmp_path / "out", "--run", run, "--device", "cpu")
    assert r.exit_code == 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["counts"] == {"done": 3, "failed": 1, "pending": 0}
    bad = next(c for c in summary["cases"] if c["status"] == "failed")
    assert bad["input"] == str(victim) and "RuntimeError: CUDA out of memory" in bad["error"]


@pytest.mark.slow
def test_part_needs_a_folder_and_an_output(cohort, tmp_path, cli):
    run, scans = cohort
    scan = sorted(scans.glob("*.nii.gz"))[0]
    r = cli("infer", scan, "--run", run, "--part", "0/2")
    assert r.exit_code == 2 and "folder" in r.output
    r = cli("infer", scans, "--run", run, "--part", "2/2", "-o", tmp_path / "x")
    assert r.exit_code == 2 and "--part" in r.output
    r = cli("infer", scans, "--part", "0/2", "-o", tmp_path / "x")  # every worker must name the same run
    assert r.exit_code == 2 and "--run" in r.output
    r = cli("infer", scans, "--run", run, "--nproc", "2", "-o", tmp_path / "x", "--classes", "kidney")  # checked before workers start
    assert r.exit_code == 2 and "kidney" in r.output and not (tmp_path / "x").exists()
