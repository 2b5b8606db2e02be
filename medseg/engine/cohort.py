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
from typing import Any, Protocol

from medseg.errors import MedsegError
from medseg.locks import held

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
    try:
        world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    except ValueError:
        raise MedsegError("WORLD_SIZE and RANK must be whole numbers (set by torchrun)") from None
    if world > 1 and not 0 <= rank < world:
        raise MedsegError(f"RANK {rank} is not one of WORLD_SIZE {world}'s ranks (0..{world - 1})")
    return (rank, world) if world > 1 else None


def my_cases(cases: list[tuple[Path, Path | None]], part: tuple[int, int] | None) -> list[tuple[Path, Path | None]]:
    if part is None:
        return list(cases)
    i, n = part
    return list(cases[i::n])


# ---------------------------------------------------------------------------------------------
# is a case done?


def settings_of(predictor, classes: list[str] | None, output_type: str) -> dict[str, Any]:
    """What decides a case's output besides the scan: the runs and their weights files (a run trained
    further has other weights), and the options. A re-run with other settings does not skip a case."""
    return {"runs": [str(r.path.resolve()) for r in predictor.runs], "checkpoint": predictor.checkpoint,
            "weights": [_stat(r.weights_path(predictor.checkpoint)) for r in predictor.runs], "tta": predictor.tta,
            "overlap": predictor.overlap, "resample": predictor.resample, "window": predictor.window.method,
            "classes": sorted(classes or []), "largest_component": list(predictor.largest_component), "output_type": output_type}


def input_stat(path: Path) -> list[int] | None:
    """(size, mtime) of a scan file: a scan replaced under the same name is segmented again. None for a DICOM folder."""
    return _stat(path) if path.is_file() else None


def _stat(path: Path) -> list[int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


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
        if sidecar.get("input_stat") != input_stat(scan):
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


# ---------------------------------------------------------------------------------------------
# the summary


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
    with held(out_dir / ".summary.lock", wait=True):  # every worker, on every machine, in turn
        rows = read_summary(out_dir)
        for scan, target in cohort:
            name = name_of(scan)
            if name not in rows:
                rows[name] = asdict(CaseStatus(name, str(scan), str(target) if target else ""))
        for c in changes:
            rows[c.name] = asdict(c)
        # this cohort's cases (rows of another cohort written to the same folder are dropped)
        ordered = [rows[name_of(scan)] for scan, _ in cohort]
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
# one worker's share


class ShareUI(Protocol):
    """What the command line shows of a share being segmented (rich bars, lines)."""

    def started(self, path: Path) -> Callable[[int, int], None]: ...  # returns on_window(i, n)
    def ended(self, path: Path) -> None: ...
    def skipped(self, path: Path, status: CaseStatus) -> None: ...
    def segmented(self, path: Path, result: dict[str, Any]) -> None: ...
    def failed(self, path: Path, message: str) -> None: ...
    def busy(self, path: Path, message: str) -> None: ...


@dataclass
class ShareResult:
    segmented: int = 0
    skipped: int = 0
    busy: int = 0  # being segmented by another process
    failed: list[str] = field(default_factory=list)


def segment_share(predictor, plan, mine: list[tuple[Path, Path | None]], ui: ShareUI, *, worker: str, output: Path | None,
                  output_type: str = "nifti", classes: list[str] | None = None, force: bool = False, save_probabilities: bool = False,
                  preview: bool = False, series: str | None = None) -> ShareResult:
    """Segment the cases ``mine`` of ``plan`` (an :class:`~medseg.engine.infer.InputPlan`). In a
    cohort (``plan.batch``), a case complete for these settings is skipped (``force`` replaces only
    outputs made otherwise), a case that fails is reported and the next one done, and with an
    output folder the summary is updated after each case. One scan (not a batch) raises its error."""
    import torch

    from medseg.engine.hooks import test_hook
    from medseg.engine.infer import OutputBusy, batch_name, output_paths, segment_file, wanted_outputs

    wanted = wanted_outputs(save_probabilities, preview, output_type)
    settings = settings_of(predictor, classes, output_type)
    result = ShareResult()

    def report(status: CaseStatus) -> None:
        if not (plan.batch and output is not None):
            return
        try:
            update_summary(output, plan.cases, [status], batch_name)
        except OSError as e:  # the summary is a report: a problem with it must not stop the cohort
            ui.failed(output / SUMMARY[0], f"cannot update the summary: {e.strerror or e}")

    for path, target in mine:
        paths = output_paths(path, target)
        status = CaseStatus(batch_name(path), str(path), str(paths["dicom_seg" if output_type == "dicom-seg" else "labels"]), worker=worker)
        earlier = complete_output(path, paths, wanted, settings) if plan.batch else None
        if earlier is not None:  # done by an earlier run or another worker: nothing to redo
            result.skipped += 1
            status.status, status.seconds, status.volume_ml = "done", earlier.get("seconds"), earlier.get("volume_ml", {})
            status.finished = earlier.get("finished", "")
            ui.skipped(path, status)
            report(status)
            continue
        test_hook(f"case:{result.segmented + len(result.failed) + 1}")
        on_window = ui.started(path)
        try:
            done = segment_file(predictor, path, target, force=force, save_probabilities=save_probabilities, preview=preview,
                                classes=classes, series=series, output_type=output_type, on_window=on_window)
        except (KeyboardInterrupt, SystemExit):
            raise
        except OutputBusy as e:  # another worker (a duplicate array task) is on it: its case, not a failure
            if not plan.batch:
                raise
            result.busy += 1
            ui.busy(path, str(e))
            continue
        except Exception as e:  # noqa: BLE001  a cohort goes on past a bad case, whatever broke
            if not plan.batch:
                raise
            if isinstance(e, MedsegError):
                message = str(e) if str(path) in str(e) else f"{path}: {e}"
                if "pass --force" in message:
                    message += " (it is not a complete output of this run and these settings)"
            else:
                message = f"{path}: {type(e).__name__}: {e}"
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            result.failed.append(path.name)
            status.status, status.error, status.finished = "failed", message, now()
            ui.failed(path, message)
            report(status)
            continue
        finally:
            ui.ended(path)
        seg = done["segmentation"]
        result.segmented += 1
        status.status, status.seconds, status.volume_ml, status.finished = "done", round(seg.seconds, 2), seg.volume_ml, now()
        ui.segmented(path, done)
        report(status)
    return result


# ---------------------------------------------------------------------------------------------
# workers on this machine


def launch_workers(nproc: int, args: list[str], device: str) -> int:
    """``nproc`` processes of ``medseg infer ARGS --part i/nproc``, their lines relayed with an
    ``[i]`` prefix (stdout to stdout, stderr to stderr); SIGTERM / Ctrl-C passed on as SIGTERM
    (a worker stops where it is; its case is redone by a re-run). With GPUs, worker i sees one GPU
    (of those this process sees). Returns 0, or the first non-zero exit status of a worker."""
    import torch

    from medseg.engine.distributed import die_with_parent, exit_status

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise MedsegError("--nproc starts its own workers; under torchrun each rank is already one: leave out --nproc")
    gpus: list[str] = []
    if device in ("auto", "cuda") and torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = [g.strip() for g in visible.split(",") if g.strip()] if visible else [str(i) for i in range(torch.cuda.device_count())]
    threads = str(max(1, (os.cpu_count() or 1) // nproc))
    children: list[subprocess.Popen] = []
    relays: list[threading.Thread] = []
    for i in range(nproc):
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads)}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
        # own sessions: a Ctrl-C reaches the workers once, through this process
        p = subprocess.Popen([sys.executable, "-m", "medseg", "infer", *args, "--part", f"{i}/{nproc}"], env=env, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1, preexec_fn=die_with_parent)
        children.append(p)
        for stream, sink in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
            relays.append(threading.Thread(target=_relay, args=(stream, sink, f"[{i}] "), daemon=True))
            relays[-1].start()

    def stop(signum, frame):
        for c in children:
            if c.poll() is None:
                c.send_signal(signum)

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
    return next((exit_status(c) for c in codes if c != 0), 0)


def _relay(stream, sink, prefix: str) -> None:
    for line in stream:
        sink.write(prefix + line)
        sink.flush()


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")
