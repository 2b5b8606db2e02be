"""A cohort of scans, segmented by several workers, resumable: ``medseg infer FOLDER -o OUT --nproc N``.

Cases are shared out by position: worker ``i`` of ``n`` (``--part i/n``; under torchrun its rank)
takes cases ``i, i+n, i+2n...`` of the sorted list, so workers on several machines (a SLURM array
over a shared file system) need no coordination beyond the output folder. A case whose outputs
exist and are complete for this run and these settings (the JSON sidecar names them, the label
map reads back with the scan's grid) is skipped, so a re-run after a kill or a failure does only
what is left. One bad case is reported and the cohort goes on.

``OUT/summary.json`` and ``OUT/summary.csv`` list every case of the cohort (status done, failed
or pending; seconds; organ volumes; the error), updated after each case by whichever worker did it,
under a lock on the folder, and replaced atomically: they are readable at any moment.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medseg.errors import MedsegError

SUMMARY = ("summary.json", "summary.csv")


@dataclass
class CaseStatus:
    name: str
    input: str
    output: str
    status: str = "pending"  # done, failed or pending
    seconds: float | None = None
    volume_ml: dict[str, float] = field(default_factory=dict)
    error: str = ""
    worker: str = ""
    finished: str = ""


def parse_part(text: str) -> tuple[int, int]:
    """``"i/n"`` -> (i, n), 0 <= i < n: worker i of n (SLURM: ``--part $SLURM_ARRAY_TASK_ID/N`` with ``--array=0-<N-1>``)."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise MedsegError(f"--part {text!r}: expected i/n, e.g. 0/4 for the first of 4 workers") from None
    if n < 1 or not 0 <= i < n:
        raise MedsegError(f"--part {text}: i counts from 0 to n-1 (0/{max(n, 1)} is the first of {max(n, 1)} workers)")
    return i, n


def torchrun_part() -> tuple[int, int] | None:
    """Under torchrun: (RANK, WORLD_SIZE)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else None


def my_cases(cases: list[tuple[Path, Path | None]], part: tuple[int, int] | None) -> list[tuple[Path, Path | None]]:
    if part is None:
        return list(cases)
    i, n = part
    return list(cases[i::n])


# ---------------------------------------------------------------------------------------------
# is a case done?


def settings_of(predictor, classes: list[str] | None, output_type: str) -> dict[str, Any]:
    """What, besides the run, decides a case's output: a re-run with other settings does not skip it."""
    return {"runs": [str(r.path.resolve()) for r in predictor.runs], "checkpoint": predictor.checkpoint, "tta": predictor.tta,
            "overlap": predictor.overlap, "resample": predictor.resample, "classes": sorted(classes or []),
            "largest_component": list(predictor.largest_component), "output_type": output_type}


def complete_output(scan: Path, paths: dict[str, Path], wanted: list[str], settings: dict[str, Any]) -> dict[str, Any] | None:
    """The sidecar of a finished case when every wanted output exists, the sidecar says this scan,
    these runs and these settings, and the label map reads back whole on the scan's grid; else None."""
    import nibabel as nib
    import numpy as np

    from medseg.data.io import is_nifti

    if not all(paths[k].is_file() for k in wanted):
        return None
    try:
        sidecar = json.loads(paths["json"].read_text())
        if sidecar.get("input") != str(scan.resolve()) or sidecar.get("settings") != settings:
            return None
        if "labels" in wanted:
            labels = nib.load(paths["labels"])
            np.asanyarray(labels.dataobj)  # reads (and checks) every byte: a truncated file fails here
            if is_nifti(scan):
                src = nib.load(scan)
                if labels.shape != src.shape[:3] or not np.allclose(labels.affine, src.affine, atol=1e-4):
                    return None
        if "dicom_seg" in wanted:
            import pydicom

            pydicom.dcmread(paths["dicom_seg"], stop_before_pixels=True)
    except Exception:  # unreadable in any way: not complete
        return None
    return sidecar


def outputs_present(paths: dict[str, Path], wanted: list[str]) -> list[Path]:
    return [paths[k] for k in wanted if paths[k].exists()]


# ---------------------------------------------------------------------------------------------
# the summary


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """flock on the folder itself: every worker (and machine, on a file system with locks) in turn."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read_summary(out_dir: Path) -> dict[str, dict[str, Any]]:
    try:
        rows = json.loads((out_dir / SUMMARY[0]).read_text())["cases"]
        return {r["name"]: r for r in rows}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def update_summary(out_dir: Path, cohort: list[tuple[Path, Path | None]], changes: list[CaseStatus], name_of: Callable[[Path], str]) -> None:
    """Merge ``changes`` into OUT/summary.json and .csv (every case of ``cohort`` listed; pending
    where no worker has reported it yet), under the folder lock, each file replaced atomically."""
    from medseg.data.io import temporary_beside

    out_dir.mkdir(parents=True, exist_ok=True)
    with _folder_lock(out_dir):
        rows = read_summary(out_dir)
        for scan, target in cohort:
            name = name_of(scan)
            if name not in rows:
                rows[name] = asdict(CaseStatus(name, str(scan), str(target) if target else ""))
        for c in changes:
            rows[c.name] = asdict(c)
        order = [name_of(scan) for scan, _ in cohort]
        ordered = [rows[n] for n in order] + [r for n, r in rows.items() if n not in set(order)]
        counts = {s: sum(r["status"] == s for r in ordered) for s in ("done", "failed", "pending")}
        texts = {SUMMARY[0]: json.dumps({"counts": counts, "cases": ordered}, indent=2) + "\n", SUMMARY[1]: _csv(ordered)}
        for name, text in texts.items():
            tmp = temporary_beside(out_dir / name, ".tmp")
            try:
                Path(tmp).write_text(text)
                os.replace(tmp, out_dir / name)
            finally:
                Path(tmp).unlink(missing_ok=True)


def _csv(rows: list[dict[str, Any]]) -> str:
    organs = sorted({k for r in rows for k in r.get("volume_ml", {})})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["name", "status", "seconds", *[f"{o}_ml" for o in organs], "output", "input", "worker", "finished", "error"])
    for r in rows:
        vol = r.get("volume_ml", {})
        w.writerow([r["name"], r["status"], "" if r.get("seconds") is None else r["seconds"], *[vol.get(o, "") for o in organs],
                    r["output"], r["input"], r.get("worker", ""), r.get("finished", ""), r.get("error", "")])
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# workers on this machine


def launch_workers(nproc: int, args: list[str], device: str) -> int:
    """``nproc`` processes of ``medseg infer ARGS --part i/nproc``; their lines relayed with a
    ``[i]`` prefix; SIGTERM / Ctrl-C passed on. With GPUs, worker i sees GPU ``i % count`` only.
    Returns 0, or the first non-zero exit status of a worker."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise MedsegError("--nproc starts its own workers; under torchrun each rank is already one: leave out --nproc")
    gpus = torch.cuda.device_count() if device in ("auto", "cuda") else 0
    threads = str(max(1, (os.cpu_count() or 1) // nproc))
    children: list[subprocess.Popen] = []
    relays: list[threading.Thread] = []
    for i in range(nproc):
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads)}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
        p = subprocess.Popen([sys.executable, "-m", "medseg", "infer", *args, "--part", f"{i}/{nproc}"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        children.append(p)
        relays.append(threading.Thread(target=_relay, args=(p, f"[{i}] "), daemon=True))
        relays[-1].start()

    def stop(signum, frame):
        for c in children:
            if c.poll() is None:
                c.send_signal(signal.SIGTERM)

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with contextlib.suppress(ValueError):  # not the main thread: no forwarding
        for s in previous:
            signal.signal(s, stop)
    try:
        codes = [c.wait() for c in children]
    finally:
        with contextlib.suppress(ValueError):
            for s, h in previous.items():
                signal.signal(s, h)
        for c in children:
            if c.poll() is None:
                c.kill()
        for t in relays:
            t.join(timeout=5)
    return next((c if c > 0 else 128 - c for c in codes if c != 0), 0)


def _relay(p: subprocess.Popen, prefix: str) -> None:
    assert p.stdout is not None
    for line in p.stdout:
        sys.stderr.write(prefix + line)
        sys.stderr.flush()


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")
