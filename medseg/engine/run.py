"""``Run``: the one owner of a run directory (nnU-Net's self-describing model folder).

    runs/<Model-Optimizer-Loss-YYYYMMDD-HHMM-runNN>/
      run.json          status, pid/host/heartbeat while training, versions, split sizes, best epoch,
                        the tracking store and run id
      bundle.json       the resolved bundle (every default filled in, paths absolute)
      labels.json       {"0": "background", "1": "liver", ...}
      splits.json       the training and validation cases
      checkpoint.pt     the whole training state, for --resume (model, optimizer, scaler, learning-rate
                        schedule, epoch/iteration/step, RNG states, metric history); written atomically
                        every ``train.checkpoint_every``, at the end, and when training is stopped
      model_best.pt     the model's state_dict at the best validation Dice (rewritten on improvement only)
      metrics.csv       one row per epoch, rewritten from the checkpoint's history
      model_summary.txt the module tree and parameter counts
      .lock             held (flock) by the process that writes the run

Everything that writes goes through this class, and only while the lock is held: a second writer
gets one clear line naming the holder. A run whose ``run.json`` says ``running`` but whose lock is
free was killed (SIGKILL, power loss, OOM killer); :attr:`Run.status` reports it as ``killed``, and
``medseg train --resume`` continues it from its last checkpoint (or from the start if it has none).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import socket
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from medseg import READABLE_RUN_FORMATS, RUN_FORMAT_VERSION, __version__
from medseg.config import Bundle, bundle_from_dict, flatten
from medseg.errors import BundleError, MedsegError

RUN_FILE = "run.json"
CHECKPOINT = "checkpoint.pt"
BEST = "model_best.pt"
HEARTBEAT_SECONDS = 30.0

# What a resume may change. Everything else (model, labels, ROI, spacing, normalisation, data,
# sampling, loss, optimizer, seed) would no longer describe the weights in the checkpoint.
RESUMABLE_KEYS = (
    "description",
    "train.epochs", "train.iterations", "train.iterations_per_epoch", "train.scheduler", "train.lr", "train.val_interval",
    "train.checkpoint_every", "train.max_minutes",
    "data.num_workers", "data.cache",
    "sliding_window.sw_batch_size", "sliding_window.overlap", "sliding_window.mode", "postprocess",
    "tracking.backend",
)


def now() -> str:
    return datetime.now().isoformat(timespec="seconds")


def write_json(path: Path, obj: Any) -> None:
    from medseg.data.io import write_text_atomic

    write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def labels_json(labels: list[str]) -> dict[str, str]:
    return {"0": "background", **{str(i): n for i, n in enumerate(labels, start=1)}}


def build_model(bundle: Bundle):
    """The bundle's network, as training builds it (the one place a model is made from a bundle)."""
    from medseg.models import create_model

    return create_model(bundle.model.name, out_channels=len(bundle.data.labels) + 1, roi=bundle.train.roi,
                        grad_checkpointing=bundle.train.grad_checkpointing, **bundle.model.args)


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MedsegError(f"{path.parent}: incomplete run directory (no {path.name})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MedsegError(f"{path}: corrupt {what} ({type(e).__name__})") from None


class Run:
    """A run directory. ``Run.open(path)`` reads one; ``Run.create(...)`` makes one (under its lock)."""

    def __init__(self, path: Path, info: dict[str, Any]) -> None:
        self.path = Path(path)
        self.info = info
        self._lock_fd: int | None = None
        self._last_beat = 0.0
        self._made = False  # this process created the folder (create); discard() may remove it

    # -- reading --------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path) -> Run:
        path = Path(path)
        if not path.is_dir():
            raise MedsegError(f"{path}: not a medseg run directory ({'a file' if path.exists() else 'no such folder'})")
        if not (path / RUN_FILE).is_file():
            raise MedsegError(f"{path}: not a medseg run directory (no {RUN_FILE})")
        info = _read_json(path / RUN_FILE, "run file")
        if not isinstance(info, dict):
            raise MedsegError(f"{path / RUN_FILE}: corrupt run file (not a JSON object)")
        if info.get("format_version") not in READABLE_RUN_FORMATS:
            raise MedsegError(f"{path}: run format {info.get('format_version')} is not supported by this medseg "
                              f"(reads {', '.join(map(str, READABLE_RUN_FORMATS))})")
        return cls(path, info)

    @property
    def name(self) -> str:
        return self.info.get("name", self.path.name)

    @property
    def status(self) -> str:
        """``running`` only while a process holds the lock; a ``running`` run nobody holds was killed."""
        status = self.info.get("status", "unknown")
        if status == "running" and self._lock_fd is None and not self.locked_by_other():
            return "killed"
        return status

    @property
    def bundle(self) -> Bundle:
        raw = _read_json(self.path / "bundle.json", "bundle")
        try:
            bundle = bundle_from_dict(raw)
        except BundleError as e:
            raise MedsegError(f"{self.path / 'bundle.json'}: {e}") from None
        if bundle.planned_fields():  # training writes planned values; "auto" here means an edited file
            raise MedsegError(f"{self.path / 'bundle.json'}: {', '.join(bundle.planned_fields())} still \"auto\" "
                              "(a trained run holds the planned values): the run directory was edited")
        return bundle

    @property
    def labels(self) -> dict[int, str]:
        raw = _read_json(self.path / "labels.json", "label names")
        try:
            labels = {int(k): str(v) for k, v in raw.items()}
        except (AttributeError, ValueError):
            raise MedsegError(f"{self.path / 'labels.json'}: corrupt label names") from None
        expected = {int(k): v for k, v in labels_json(self.bundle.data.labels).items()}
        if labels != expected:  # the network has one output per bundle class: names must say which
            raise MedsegError(f"{self.path / 'labels.json'} does not match the run's bundle.json (classes "
                              f"{', '.join(self.bundle.data.labels)}): the run directory was edited")
        return labels

    def weights_path(self, which: str = "best") -> Path:
        if which not in ("best", "last"):
            raise MedsegError(f"checkpoint must be best or last, got {which!r}")
        if which == "last" and self.info.get("format_version") == 1:
            return self.path / "model_last.pt"
        return self.path / (BEST if which == "best" else CHECKPOINT)

    def load_state_dict(self, which: str = "best") -> dict:
        """The model weights: ``best`` (model_best.pt) or ``last`` (the model in checkpoint.pt)."""
        import torch

        path = self.weights_path(which)
        if not path.is_file():
            raise MedsegError(f"{self.path}: missing weights {path.name}" + (" (no validation finished yet)" if which == "best" else ""))
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated file, not a torch file
            raise MedsegError(f"{path}: cannot load weights ({type(e).__name__}: {_cause(e)})") from None
        return state["model"] if which == "last" and isinstance(state, dict) and "optimizer" in state else state

    def build_model(self, which: str = "best", device: str | Any = "cpu"):
        """The run's network with its ``which`` weights, in eval mode on ``device``."""
        bundle = self.bundle
        try:
            model = build_model(bundle)
        except BundleError as e:
            raise MedsegError(f"{self.path / 'bundle.json'}: {e}") from None
        state = self.load_state_dict(which)
        try:
            model.load_state_dict(state)
        except Exception as e:  # the weights do not belong to this bundle's network
            raise MedsegError(f"{self.weights_path(which)}: weights do not fit the run's {bundle.model.name} "
                              f"({type(e).__name__}: {_cause(e)})") from None
        return model.to(device).eval()

    def checkpoint(self) -> dict | None:
        """The full training state, or None when the run never reached its first checkpoint."""
        import torch

        path = self.path / CHECKPOINT
        if not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise MedsegError(f"{path}: cannot load checkpoint ({type(e).__name__}: {_cause(e)})") from None

    def read_metrics(self) -> list[dict[str, str]]:
        path = self.path / "metrics.csv"
        if not path.is_file():
            return []
        with path.open(newline="") as f:
            return list(csv.DictReader(f))

    # -- locking --------------------------------------------------------------------------------
    def locked_by_other(self) -> bool:
        import fcntl

        try:
            fd = os.open(self.path / ".lock", os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except OSError:
            return True
        finally:
            os.close(fd)

    def acquire(self) -> None:
        """Take the run's lock or fail with one line naming who holds it."""
        import fcntl

        try:
            fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise MedsegError(f"cannot write to {self.path}: {e.strerror or e}") from None
        for _attempt in range(20):  # a reader's status probe holds a shared lock for microseconds
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                time.sleep(0.05)
        else:
            os.close(fd)
            holder = self.info.get("pid"), self.info.get("host")
            who = f" (pid {holder[0]} on {holder[1]})" if holder[0] else ""
            raise MedsegError(f"{self.path} is being written by another medseg process{who}; wait for it or choose another --run-dir") from None
        self._lock_fd = fd
        for stale in self.path.iterdir():  # medseg's own temporary files left by a process killed mid-write
            if _own_temporary(stale.name):
                stale.unlink(missing_ok=True)

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- writing (lock held) --------------------------------------------------------------------
    def _must_hold(self) -> None:
        if self._lock_fd is None:
            raise RuntimeError("Run: write without the lock")  # a medseg bug, not user input

    def save_info(self, **changes: Any) -> None:
        self._must_hold()
        self.info.update(changes)
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in self.info.items()}
        write_json(self.path / RUN_FILE, clean)  # -Infinity and NaN are not JSON

    def mark_running(self) -> None:
        self._last_beat = time.time()
        self.save_info(status="running", pid=os.getpid(), host=socket.gethostname(), heartbeat=now(), error=None)

    def heartbeat(self, force: bool = False) -> None:
        if force or time.time() - self._last_beat >= HEARTBEAT_SECONDS:
            self._last_beat = time.time()
            self.save_info(heartbeat=now())

    def write_description(self, bundle: Bundle, splits: dict[str, list], summary: str, plan: dict | None = None) -> None:
        """bundle.json (every "auto" already planned), labels, splits, the model summary and, for a
        planned bundle, plan.json (what the planner saw and chose)."""
        self._must_hold()
        write_json(self.path / "bundle.json", bundle.to_dict())
        if plan is not None:
            write_json(self.path / "plan.json", plan)
        write_json(self.path / "labels.json", labels_json(bundle.data.labels))
        write_json(self.path / "splits.json", splits)
        from medseg.data.io import write_text_atomic

        write_text_atomic(self.path / "model_summary.txt", summary)

    def save_checkpoint(self, state: dict) -> None:
        self._must_hold()
        save_atomic(state, self.path / CHECKPOINT, hook="checkpoint_write")

    def save_best(self, model_state: dict) -> None:
        self._must_hold()
        save_atomic(model_state, self.path / BEST)

    def write_metrics(self, history: list[dict[str, Any]]) -> None:
        """metrics.csv from the full history (the header is the union of keys: validation columns
        appear from the first validated epoch on)."""
        self._must_hold()
        from medseg.data.io import write_text_atomic

        if not history:  # nothing finished yet: no file rather than an empty one
            return
        fields: list[str] = []
        for row in history:
            fields += [k for k in row if k not in fields]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in history)
        write_text_atomic(self.path / "metrics.csv", buf.getvalue())

    @contextlib.contextmanager
    def locked(self):
        self.acquire()
        try:
            yield self
        finally:
            self.release()

    # -- creating -------------------------------------------------------------------------------
    @classmethod
    def create(cls, prefix: str, *, run_dir: str | Path | None, runs_root: str | Path, model: str,
               tracked_names: list[str] | None = None, extra: dict[str, Any] | None = None) -> Run:
        """A new run directory, locked, its ``run.json`` not yet written (:meth:`mark_running` writes
        it once the run is described, so a ``run.json`` always comes with its bundle). With
        ``run_dir`` None the name is ``<prefix>-<YYYYMMDD-HHMM>-runNN``, NN one above the highest
        such run in ``runs_root`` or the tracking store; two processes starting at once get
        different names. A ``run_dir`` must be new, empty, or left by a run that never started."""
        stamp = datetime.now().strftime("%Y%m%d-%H%M")
        if run_dir is not None:
            path = Path(run_dir)
            made = not path.exists()
            _make_dir(path, exist_ok=True)
            name = path.name
        else:
            root = Path(runs_root)
            _make_dir(root, exist_ok=True)
            made = True
            for _ in range(1000):
                name = next_run_name(prefix, root, stamp, tracked_names)
                path = root / name
                try:
                    path.mkdir()
                    break
                except FileExistsError:
                    tracked_names = [*(tracked_names or []), name]
                except OSError as e:
                    raise MedsegError(f"cannot create {path}: {e.strerror or e}") from None
        foreign = sorted(p.name for p in path.iterdir() if p.name not in OWN_FILES and not _own_temporary(p.name))
        if foreign and not (path / RUN_FILE).exists():
            raise MedsegError(f"{path} is not empty and holds no run ({foreign[0]}, ...): choose a new or empty --run-dir")
        run = cls(path, {})
        run.acquire()
        if (path / RUN_FILE).exists():
            run.release()
            raise MedsegError(f"{path} already holds a run; choose another --run-dir, or continue it with --resume")
        run._made = made
        run.info = {"format_version": RUN_FORMAT_VERSION, "medseg_version": __version__, "name": name, "model": model,
                    "created": now(), **(extra or {})}
        return run

    def discard(self) -> None:
        """Remove a run that never started (no run.json): its description files and, if this
        process made it, the folder. Lock held."""
        self._must_hold()
        if (self.path / RUN_FILE).exists():
            return
        for p in self.path.iterdir():
            if p.name in OWN_FILES and p.name != ".lock" or _own_temporary(p.name):
                p.unlink(missing_ok=True)
        if self._made:
            (self.path / ".lock").unlink(missing_ok=True)
            self.release()
            try:
                self.path.rmdir()
            except OSError:
                pass

    # -- resuming -------------------------------------------------------------------------------
    def check_resume(self, bundle: Bundle) -> list[str]:
        """Refuse (before anything is written) a resume whose bundle changes what the weights were
        trained for; return the allowed changes, for the log."""
        if self.info.get("format_version") != RUN_FORMAT_VERSION:
            raise MedsegError(f"{self.path} was written by an older medseg (run format {self.info.get('format_version')}); "
                              "its checkpoint cannot be resumed: start a new run (inference still reads it)")
        old = flatten(self.bundle.to_dict())
        new = flatten(bundle.to_dict())
        changed = sorted(k for k in set(old) | set(new) if old.get(k, UNSET) != new.get(k, UNSET)
                         and not (old.get(k, UNSET) in ({}, UNSET) and new.get(k, UNSET) in ({}, UNSET)))  # {} -> filled in
        refused = [k for k in changed if not any(k == a or k.startswith(a + ".") for a in RESUMABLE_KEYS)]
        if refused:
            k = refused[0]
            more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
            raise MedsegError(f"cannot resume {self.path.name} with {k} changed ({old.get(k, UNSET)!r} -> {new.get(k, UNSET)!r}){more}: "
                              f"the checkpoint was trained with the old value. A resume may change only "
                              f"{', '.join(RESUMABLE_KEYS[1:])}; start a new run for anything else")
        return [f"{k}: {old.get(k, UNSET)!r} -> {new.get(k, UNSET)!r}" for k in changed]


class _Unset:
    def __repr__(self) -> str:
        return "unset"


UNSET = _Unset()

OWN_FILES = {RUN_FILE, "bundle.json", "plan.json", "labels.json", "splits.json", CHECKPOINT, BEST, "metrics.csv", "model_summary.txt", ".lock"}


def _own_temporary(name: str) -> bool:
    """``.<one of OWN_FILES>.tmp`` (text) or ``.<file>.<pid>.tmp`` (weights): medseg's temporary names."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return False
    base = name[1:-4]
    return base in OWN_FILES or base.rsplit(".", 1)[0] in OWN_FILES


def _make_dir(path: Path, exist_ok: bool) -> None:
    if path.exists() and not path.is_dir():
        raise MedsegError(f"{path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=exist_ok)
    except OSError as e:
        raise MedsegError(f"cannot create {path}: {e.strerror or e}") from None
    if not os.access(path, os.W_OK):
        raise MedsegError(f"cannot write to {path}: permission denied or read-only file system")


def _cause(e: BaseException) -> str:
    """The first line of an exception's message that says something (torch puts the cause last)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if not lines:
        return "no detail"
    useful = [line for line in lines if not line.startswith(("Weights only load failed", "Please file an issue", "Check the documentation"))]
    text = (useful or lines)[0]
    return text if len(text) <= 300 else text[:297] + "..."


def save_atomic(obj: Any, path: Path, hook: str | None = None) -> None:
    """torch.save to a temporary file beside ``path``, fsync, rename, fsync the folder: a reader
    sees the old file or the new one, never half of one, even after a power cut."""
    import torch

    from medseg.engine.hooks import test_hook

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if hook:
            test_hook(hook)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def next_run_name(prefix: str, runs_root: Path, stamp: str, tracked: list[str] | None = None) -> str:
    """``<prefix>-<stamp>-runNN``, NN one more than the highest of that prefix seen in the runs
    folder or in the tracking server."""
    pattern = re.compile(rf"^{re.escape(prefix)}-\d{{8}}-\d{{4}}-run(\d+)$")
    seen = [p.name for p in runs_root.iterdir()] if runs_root.is_dir() else []
    numbers = [int(m.group(1)) for n in seen + list(tracked or []) if (m := pattern.match(n))]
    return f"{prefix}-{stamp}-run{max(numbers, default=0) + 1:02d}"


def latest_complete_run(runs_root: str | Path = "runs") -> Run:
    """The most recently finished complete run under ``runs_root``."""
    root = Path(runs_root)
    candidates = []
    for path in root.glob(f"*/{RUN_FILE}") if root.is_dir() else []:
        try:
            run = Run.open(path.parent)
        except MedsegError:
            continue
        if run.status == "complete":
            candidates.append((run.info.get("finished", ""), path.stat().st_mtime, str(path.parent), run))
    if not candidates:
        raise MedsegError(f"no complete training run under {root}/: train one first (medseg train bundles/unetr.json) or pass --run")
    return max(candidates, key=lambda c: c[:3])[3]
