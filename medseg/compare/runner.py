"""``medseg compare``: every bundle trained and scored under one protocol (see ``protocol.py``).

    output/
      protocol.json            what was held equal (cases, split, budget, plan), for a re-run to match
      splits.json              the folds (nnU-Net's splits_final.json layout; data.split_file reads it)
      ground_truth/            links to the label maps scored against, and their class names
      runs/<model>/fold<k>/    ordinary medseg runs (medseg infer --run runs/<model> ensembles the folds)
      predictions/<model>/     each case predicted by the fold that did not train on it (or the test set)
      compare.md/.csv/.json    the tables; dice.png, slices.png, curves.png the pictures

A re-run with the same protocol reuses the runs that completed and resumes one that was stopped.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from medseg.compare.protocol import Entry, Protocol, check_protocol, fold_bundle, load_entries, plan_once
from medseg.compare.tracking import Tracker, make_tracker
from medseg.errors import MedsegError


def _say(console: Console, text: str) -> None:
    console.print(escape(text), highlight=False, soft_wrap=True)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def compare(bundles: list[str | Path], *, output: str | Path = "compare", data: str | None = None, folds: int = 5,
            split: str | Path | None = None, iterations: int | None = None, minutes: float | None = None,
            test: str | Path | None = None, test_labels: str | Path | None = None, overrides: list[str] | None = None,
            allow_mixed: bool = False, device: str = "auto", tracking: str = "mlflow", progress: str = "auto",
            console: Console | None = None, stop=None) -> dict[str, Any]:
    """Train and score every bundle under one protocol; write the report into ``output``. Returns
    the report (what compare.json holds). ``stop``: a :class:`medseg.engine.train.StopFlag` that
    Ctrl-C / SIGTERM set; the fold in training then checkpoints and :class:`Stopped` is raised."""
    from medseg.data.datasets import kfold, prepare, read_split_file, resolve_source
    from medseg.engine.device import resolve_device
    from medseg.models import check_before_data

    console = console or Console(stderr=True)
    out = Path(output)
    overrides = list(overrides or []) + (["tracking.backend=none"] if tracking == "none" else [])
    if folds < 2 and test is None:
        raise MedsegError(f"--folds must be at least 2, got {folds} (or score on a separate --test set)")
    if test_labels is not None and test is None:
        raise MedsegError("--test-labels names the classes of a --test set; give --test too")
    if out.exists() and not out.is_dir():
        raise MedsegError(f"-o {out} is a file; the report needs a folder")
    entries = load_entries([Path(b) for b in bundles], overrides, data=data, iterations=iterations, minutes=minutes,
                           test=test is not None)
    mixed = check_protocol(entries, allow_mixed)
    for e in entries:  # a bad model argument fails before any data are read or any model trained
        t = e.bundle.train
        check_before_data(e.bundle.model.name, e.bundle.model.args, t.head_lr_scale, t.roi, e.bundle.infer_roi)
    proto = Protocol(entries, folds, iterations, minutes, Path(test) if test else None, Path(test_labels) if test_labels else None,
                     allow_mixed, mixed)
    dev = resolve_device(device)
    first = entries[0].bundle

    found, lut, _, _, data_notes = prepare(first.data, first.data.labels)
    cases = sorted(found.cases, key=lambda c: c.name)
    if test is None:
        splits = read_split_file(split, cases) if split is not None else kfold(cases, folds, first.data.split_seed)
        _check_partition(splits, cases, split)
        proto.folds = len(splits)
    else:
        splits = [{"train": [c.name for c in cases], "val": [c.name for c in cases]}]
    plans = plan_once(entries, found, lut, cases, str(dev))
    _build_each(entries)
    if test is not None:
        scored = resolve_source(type(first.data)(source=str(test), labels=first.data.labels))
        gt_names = _test_names(scored, test_labels)
    else:
        scored, gt_names = found, found.source_labels or {i: n for i, n in enumerate(first.data.labels, start=1)}

    ctx = _Context(out=out, proto=proto, splits=splits, cases=cases, scored=scored.cases, test=test is not None, dev=dev,
                   progress=progress, console=console, stop=stop, plans=plans, gt_names=gt_names, data_notes=data_notes)
    with _report_lock(out):
        return _compare_locked(ctx)


@dataclass
class _Context:
    """What every fold of every model shares."""

    out: Path
    proto: Protocol
    splits: list[dict[str, list[str]]]
    cases: list  # the data's cases (Case)
    scored: list  # the cases scored: the data's (cross-validation) or the --test set's
    test: bool
    dev: Any
    progress: str
    console: Console
    stop: Any  # medseg.engine.train.StopFlag: Ctrl-C / SIGTERM finish the step and checkpoint
    plans: dict[str, Any] | None
    gt_names: dict[int, str]  # ground-truth value -> class name
    data_notes: list[str]
    # set once the report folder is held
    gt_dir: Path | None = None
    gt_lut: Any = None  # ground-truth value -> output class, None when the classes are mixed
    tracker: Tracker | None = None
    t_start: float = 0.0

    @property
    def n_folds(self) -> int:
        return 1 if self.test else len(self.splits)


def _compare_locked(ctx: _Context) -> dict[str, Any]:
    """The comparison itself, holding the report folder's lock."""
    out, proto, console = ctx.out, ctx.proto, ctx.console
    first = proto.entries[0].bundle
    _prepare_output(out, proto, ctx.splits, ctx.plans)
    ctx.gt_lut = _score_lut(first.data.labels, ctx.gt_names) if not proto.mixed.get("data.labels") else None
    ctx.gt_dir = _link_ground_truth(out, ctx.scored, ctx.gt_names)
    ctx.tracker = tracker = make_tracker(first, proto, out)
    for note in ctx.data_notes:
        _say(console, f"note: {note}")
    jobs = len(proto.entries) * ctx.n_folds
    ctx.t_start = time.time()
    results: list[dict[str, Any]] = []
    open_runs = [tracker.parent]
    try:
        _run_all(ctx, results, open_runs)
    except BaseException as e:
        for run_id in reversed(open_runs):
            tracker.end(run_id, "KILLED" if isinstance(e, KeyboardInterrupt) or type(e).__name__ == "Stopped" else "FAILED")
        raise
    from medseg.compare.report import write_report

    report = {"protocol": proto.as_dict(), "device": str(ctx.dev), "splits": None if ctx.test else ctx.splits,
              "plans": ctx.plans, "ground_truth": str(ctx.gt_dir.resolve()), "models": results,
              "notes": _notes(proto, results), "seconds": round(time.time() - ctx.t_start, 1)}
    paths = write_report(report, out)
    for p in paths:
        tracker.artifact(tracker.parent, p)
    tracker.end(tracker.parent)
    _say(console, f"compare: {len(proto.entries)} model(s), {jobs} training run(s) in {_clock(time.time() - ctx.t_start)}; "
                  f"report: {out / 'compare.md'}")
    return report


def _run_all(ctx: _Context, results: list[dict[str, Any]], open_runs: list[str | None]) -> None:
    """Every model, every fold: train (or reuse, or resume), segment its validation (or test) cases, score."""
    entries, n_folds, tracker, console, out = ctx.proto.entries, ctx.n_folds, ctx.tracker, ctx.console, ctx.out
    assert tracker is not None and ctx.gt_dir is not None  # set by _compare_locked (a programming error otherwise)
    jobs = len(entries) * n_folds
    for i, e in enumerate(entries):
        model_run = tracker.model_run(e.name, {"bundle": str(e.path), "model": e.bundle.model.name})
        open_runs.append(model_run)
        folds_out = []
        for k in range(n_folds):
            done = i * n_folds + k
            elapsed = time.time() - ctx.t_start
            eta = "" if not done else f", ETA {_clock(elapsed / done * (jobs - done))}"
            where = "all cases" if ctx.test else f"fold {k + 1}/{n_folds}"
            _say(console, f"compare [{done + 1}/{jobs}] {e.name} ({e.bundle.model.name}), {where}: training "
                          f"(elapsed {_clock(elapsed)}{eta})")
            fold = None if ctx.test else k
            bundle = fold_bundle(e, fold, out / "splits.json")
            run_dir = out / "runs" / e.name / ("all" if ctx.test else f"fold{k}")
            tags = {"mlflow.parentRunId": model_run, "medseg.fold": str(fold)} if model_run else None
            run = _train(bundle, run_dir, ctx.dev, ctx.progress, console, tags, ctx.stop)
            tracker.adopt(run.info.get("tracking_run_id"), tags)  # a reused or resumed fold joins this comparison's tree
            val = ctx.scored if ctx.test else [c for c in ctx.cases if c.name in ctx.splits[k]["val"]]
            _say(console, f"compare [{done + 1}/{jobs}] {e.name}, {where}: segmenting {len(val)} case(s)")
            folds_out.append(_predict(run, val, out / "predictions" / e.name, ctx.dev, ctx.gt_lut, fold))
        result = _score(e, folds_out, out, ctx.gt_dir)
        results.append(result)
        tracker.log(model_run, _headline(result))
        tracker.end(model_run)
        open_runs.remove(model_run)


# ---------------------------------------------------------------------------------------------


def _build_each(entries) -> None:
    """Build every network once (on the CPU, untrained): what only MONAI's or medseg's constructors
    check (a tri-planar `axes` typo) fails before the report folder is written."""
    from medseg.engine.run import build_model
    from medseg.errors import BundleError

    for e in entries:
        try:
            build_model(e.bundle)
        except BundleError as err:
            raise BundleError(f"{e.path}: {err}") from None


@contextmanager
def _report_lock(out: Path):
    """Hold ``out/.compare.lock`` (flock) for the whole comparison: a second medseg compare writing the
    same report fails at once, naming the first."""
    from medseg.locks import LockHeld, held

    made = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = held(out / ".compare.lock", remove=False)
        lock.__enter__()
    except LockHeld as e:
        raise MedsegError(f"{out} is being written by another medseg compare ({e.holder}); wait for it or choose another -o") from None
    except OSError as e:
        raise MedsegError(f"cannot write the report to {out} ({e.strerror or e}); choose another -o") from None
    try:
        yield
    finally:
        lock.__exit__(None, None, None)
        if made and [p.name for p in out.iterdir()] == [".compare.lock"]:  # refused before anything was written
            (out / ".compare.lock").unlink(missing_ok=True)
            out.rmdir()


def _check_partition(splits, cases, source) -> None:
    """Cross-validation scores every case once: the validation parts must cover the cases exactly once."""
    seen: dict[str, int] = {}
    for k, part in enumerate(splits):
        for name in part["val"]:
            if name in seen:
                raise MedsegError(f"{source}: case {name} is validated in splits {seen[name]} and {k}; cross-validation scores "
                                  "each case once, by the one fold that did not train on it")
            seen[name] = k
    missing = sorted(c.name for c in cases if c.name not in seen)
    if missing:
        raise MedsegError(f"{source}: {len(missing)} case(s) are in no split's validation part (first: {missing[0]}); "
                          "cross-validation scores every case")


def _score_lut(labels: list[str], gt_names: dict[int, str]):
    """Ground-truth value -> output class, for the classes the ground truth names (a test set may
    label fewer classes than the models predict: msd_spleen_8 only the spleen); others are background."""
    import numpy as np

    lut = np.zeros(max(max(gt_names, default=0) + 1, 2**16), dtype=np.int64)  # unnamed values (up to uint16) too
    for value, name in gt_names.items():
        if name in labels:
            lut[value] = labels.index(name) + 1
    return lut


def _test_names(found, test_labels) -> dict[int, str]:
    from medseg.engine.evaluate import read_label_names

    if test_labels is not None:
        return read_label_names(Path(test_labels), "--test-labels")
    if found.source_labels:
        return found.source_labels
    raise MedsegError("--test: the test labels' class names are unknown; name them with --test-labels FILE "
                      '(JSON value -> name, e.g. {"1": "spleen"})')


def _prepare_output(out: Path, proto: Protocol, splits, plans) -> None:
    """A new report folder, or one holding the same protocol (a re-run continues it)."""
    from medseg.engine.run import write_json

    saved = out / "protocol.json"
    from medseg.engine.train import resolve_paths

    resolved = {}
    for e in proto.entries:  # where the data are, not how they were typed; tracking is not part of a protocol
        raw = resolve_paths(e.bundle).to_dict()
        raw.pop("tracking", None)
        resolved[e.name] = raw
    record = {**proto.as_dict(), "splits": splits, "bundles_resolved": resolved}
    record["data_source"] = resolved[proto.entries[0].name]["data"]["source"]
    record = json.loads(json.dumps(record))
    if saved.is_file():
        try:
            old = json.loads(saved.read_text())
        except (OSError, ValueError):
            old = None
        if old != record:
            raise MedsegError(f"{out} holds another comparison (its protocol.json differs: other bundles, data, folds or "
                              "budget); choose another -o")
    elif out.exists() and any(p.name != ".compare.lock" for p in out.iterdir()):
        raise MedsegError(f"{out} exists and is not a medseg compare report; choose another -o")
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_json(saved, record)
        write_json(out / "splits.json", splits)
    except OSError as e:
        raise MedsegError(f"cannot write the report to {out} ({e.strerror or e}); choose another -o") from None


def _link_ground_truth(out: Path, cases, names: dict[int, str]) -> Path:
    """ground_truth/<case>.nii.gz -> each label map (links, never copies), and their class names."""
    from medseg.engine.run import write_json

    gt = out / "ground_truth"
    gt.mkdir(exist_ok=True)
    for c in cases:
        suffix = ".nii.gz" if c.label.endswith(".gz") else ".nii"
        link = gt / f"{c.name}{suffix}"
        if link.is_symlink() or link.exists():
            if os.path.realpath(link) == os.path.realpath(c.label):
                continue
            link.unlink()
        link.symlink_to(os.path.abspath(c.label))
    write_json(gt / "labels.json", {"0": "background", **{str(k): v for k, v in sorted(names.items())}})
    return gt


def _train(bundle, run_dir: Path, dev, progress: str, console: Console, tags: dict | None, stop=None):
    """Train the fold into ``run_dir``, or reuse it when complete, or resume it when it was stopped."""
    from medseg.engine.run import Run
    from medseg.engine.train import train

    if (run_dir / "run.json").is_file():
        run = Run.open(run_dir)
        if run.status == "running" or run.locked_by_other():
            raise MedsegError(f"{run_dir} is being trained by another process (pid {run.info.get('pid')}); is another "
                              "medseg compare writing this report?")
        _check_same_bundle(run, bundle)
        if run.status == "complete":
            _say(console, f"  {run_dir} is complete: reused")
            return run
        if run.checkpoint() is not None or run.status in ("interrupted", "killed", "failed"):
            try:
                train(bundle, run_dir=run_dir, resume=True, device=str(dev), console=console, progress=progress, stop=stop)
            finally:
                if stop is not None:
                    stop.armed = False
            return Run.open(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        train(bundle, run_dir=run_dir, device=str(dev), console=console, progress=progress, tracking_tags=tags, stop=stop)
    finally:
        if stop is not None:
            stop.armed = False  # outside training a signal interrupts at once (outputs are written atomically)
    return Run.open(run_dir)


def _check_same_bundle(run, bundle) -> None:
    """A run found in the report folder is reused or resumed only if it was trained from this very
    bundle (tracking aside): otherwise the report would mix protocols without saying so."""
    from medseg.config import flatten
    from medseg.engine.train import resolve_paths

    old, new = flatten(run.bundle.to_dict()), flatten(resolve_paths(bundle).to_dict())
    differ = sorted(k for k in set(old) | set(new) if not k.startswith("tracking.") and old.get(k) != new.get(k))
    if differ:
        k = differ[0]
        raise MedsegError(f"{run.path} was trained with {k} = {old.get(k)!r}, this comparison asks for {new.get(k)!r}; "
                          "choose another -o (or remove that run)")


def _predict(run, cases, folder: Path, dev, gt_lut, fold: int | None) -> dict[str, Any]:
    """Segment ``cases`` with the fold's last weights (the best checkpoint was chosen on these very
    cases); time it, measure its memory, and score it on the model grid too."""
    from medseg.compare.measure import PeakMemory, model_grid_label, score_model_grid
    from medseg.engine.infer import Predictor, segment_file

    predictor = Predictor(run, device=str(dev), checkpoint="last")
    labels = list(run.bundle.data.labels)
    rows, per_case = [], []
    for case in cases:
        with PeakMemory(dev) as mem:
            result = segment_file(predictor, Path(case.image), folder / f"{case.name}_seg.nii.gz", force=True, model_grid=True)
        seg = result["segmentation"]
        entry = {"case": case.name, "image": str(case.image), "seconds": round(seg.seconds, 3), "peak_bytes": int(mem.peak_bytes),
                 "memory_how": mem.how, "crop_shape": list(seg.crop_shape), "volume_ml": seg.volume_ml}
        if gt_lut is not None:
            gt, spacing = model_grid_label(run.bundle, gt_lut, case.image, case.label)
            scored = [labels[v - 1] for v in sorted(set(gt_lut.tolist()) - {0})]
            rows += score_model_grid(seg.model_grid[0], gt, spacing, labels, case.name, scored)
        per_case.append(entry)
    history = run.read_metrics()
    return {"fold": fold, "run": str(run.path.resolve()), "steps": run.info.get("steps"), "train_seconds": run.info.get("train_seconds"),
            "time_limited": run.info.get("time_limited"), "cases": per_case, "model_grid_rows": rows, "history": history}


def _score(e: Entry, folds: list[dict], out: Path, gt_dir: Path) -> dict[str, Any]:
    """One model's row: ``medseg evaluate`` on its predictions in each scan's geometry, the same
    metric code on the model grid, cost and time."""
    import statistics

    from medseg.cost.counted import model_cost, training_cost, windows_for
    from medseg.engine.evaluate import evaluate, summarise
    from medseg.models import get_spec

    b = e.bundle
    original = evaluate(out / "predictions" / e.name, gt_dir, gt_labels=gt_dir / "labels.json")
    grid_rows = [r for f in folds for r in f["model_grid_rows"]]
    grid = summarise(grid_rows, sorted({r["case"] for r in grid_rows})) if grid_rows else None
    classes = len(b.data.labels) + 1
    window = model_cost(b.model.name, b.infer_roi, classes, b.model.args)
    patch = window if list(b.train.roi) == list(b.infer_roi) else model_cost(b.model.name, b.train.roi, classes, b.model.args)
    patches = b.train.batch_size * b.train.samples_per_volume
    cases = [c for f in folds for c in f["cases"]]
    per_volume = [windows_for(c["crop_shape"], b.infer_roi, b.sliding_window.overlap) * window.forward_flops for c in cases]
    spec = get_spec(b.model.name)
    train_seconds = [f["train_seconds"] for f in folds if f["train_seconds"] is not None]
    return {
        "name": e.name, "bundle": str(e.path), "model": b.model.name, "display": spec.display,
        "parameters": window.params, "roi": list(b.train.roi), "window_roi": list(b.infer_roi),
        "flops_per_window": window.forward_flops, "flops_per_volume": float(sum(per_volume) / len(per_volume)),
        "train_seconds": round(sum(train_seconds), 1) if train_seconds else None,
        "train_seconds_per_fold": round(sum(train_seconds) / len(train_seconds), 1) if train_seconds else None,
        "steps": [f["steps"] for f in folds], "time_limited": any(f["time_limited"] for f in folds),
        "patches_per_step": patches, "train_flops_per_step": training_cost(patch, patches)["flops"],
        # the median: each fold's first case also pays the new model's warm-up
        "infer_seconds_per_volume": round(statistics.median(c["seconds"] for c in cases), 3),
        "model_bytes": 4 * window.params,
        "peak_memory_bytes": max(c["peak_bytes"] for c in cases), "memory_how": cases[0]["memory_how"],
        "original": {"summary": original.summary, "per_class": original.mean, "rows": original.rows, "notes": original.notes},
        "training_spacing": ({"summary": grid.summary, "per_class": grid.mean, "rows": grid.rows, "spacing": list(b.data.spacing)}
                             if grid else None),
        "folds": [{k: v for k, v in f.items() if k != "model_grid_rows"} for f in folds],
    }


def _headline(result: dict[str, Any]) -> dict[str, float]:
    s = result["original"]["summary"]
    out = {f"{m}": s[f"mean_{m}"] for m in ("dice", "iou", "precision", "recall", "accuracy", "hd95_mm", "nsd")}
    out.update({f"dice_{c}": v["dice"] for c, v in result["original"]["per_class"].items() if c != "background"})
    if result["training_spacing"]:
        out["dice_training_spacing"] = result["training_spacing"]["summary"]["mean_dice"]
    out.update(parameters=result["parameters"], flops_per_window=result["flops_per_window"],
               flops_per_volume=result["flops_per_volume"], infer_seconds_per_volume=result["infer_seconds_per_volume"],
               peak_memory_mb=result["peak_memory_bytes"] / 2**20)
    if result["train_seconds"] is not None:
        out["train_seconds"] = result["train_seconds"]
    return {k: float(v) for k, v in out.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}


def _notes(proto: Protocol, results: list[dict[str, Any]]) -> list[str]:
    notes = []
    if any(r["time_limited"] for r in results):
        notes.append("some folds were ended by --minutes before their step count: " + ", ".join(r["name"] for r in results if r["time_limited"]))
    if proto.mixed:
        notes.append("--allow-mixed: the bundles differ on " + ", ".join(proto.mixed) + "; the scores are not under one protocol")
    if proto.minutes is not None and proto.iterations is None:
        notes.append("budget in minutes only: the learning-rate schedule runs over 10^6 steps, so the rate stays near its "
                     "peak; add --iterations for a decaying schedule")
    if proto.test is not None:
        notes.append("trained on every case (validation on the training cases) and scored on the --test set")
    else:
        notes.append("each case is scored by the fold that did not train on it, with that fold's last weights")
    return notes
