"""``train(bundle)``: from a validated bundle to a complete, self-describing run directory.

Everything a user can get wrong (bundle keys, model arguments, ROIs, data files, label values, an
incompatible resume) is checked before the run directory is created or touched. The directory is
owned by a :class:`~medseg.engine.run.Run`, locked while training; ``run.json`` says ``running``
(with pid and heartbeat), then ``complete``, ``interrupted`` or ``failed``.

Resume is exact: the checkpoint holds the model, optimizer, gradient scaler, learning-rate schedule,
position (epoch, iteration, global step), RNG states and the metric history, and the data stream of
each epoch is seeded from (seed, epoch), so N epochs straight and N/2 + resume N/2 give the same
weights bit for bit on the CPU. A stop requested by a signal (see :class:`StopFlag`) finishes the
current optimiser step, writes a checkpoint and raises :class:`Stopped`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape

from medseg.config import Bundle, bundle_from_dict, flatten, parse_checkpoint_every
from medseg.engine.components import LOSS_NAMES, OPTIMIZER_NAMES, make_loss, make_optimizer, set_lr
from medseg.engine.device import amp_mode, autocast, grad_scaler
from medseg.engine.distributed import Dist, shard
from medseg.engine.hooks import test_hook
from medseg.engine.progress import TrainProgress
from medseg.engine.run import Run, build_model
from medseg.engine.state import capture_rng, continue_schedule, epoch_seed, lr_at, new_schedule, restore_rng
from medseg.errors import MedsegError

__all__ = ["StopFlag", "Stopped", "TrainResult", "build_model", "load_bundle_for_resume", "train"]


@dataclass
class TrainResult:
    run_dir: Path
    name: str
    best_dice: float
    best_epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)
    tracking_run_id: str | None = None


class StopFlag:
    """Set from a signal handler; training stops at the next step (or validation case) boundary."""

    def __init__(self) -> None:
        self.signal: int | None = None
        # Set once training steps run: before that (checking data, caching volumes) there is nothing
        # to checkpoint, and a stop should interrupt at once rather than wait for the first step.
        self.armed = False

    def request(self, signum: int) -> None:
        self.signal = signum

    @property
    def requested(self) -> bool:
        return self.signal is not None


class Stopped(Exception):
    """Training stopped on request after writing a checkpoint; ``medseg train --resume`` continues."""

    def __init__(self, run_dir: Path, epoch: int, iteration: int, signum: int | None) -> None:
        super().__init__(f"stopped in epoch {epoch} after iteration {iteration}; checkpoint written to {run_dir}")
        self.run_dir, self.epoch, self.iteration, self.signum = run_dir, epoch, iteration, signum


class _StopNow(Exception):
    pass


def model_summary(model: torch.nn.Module) -> str:
    total = sum(p.numel() for p in model.parameters())
    lines = [f"parameters: {total:,} ({sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable)", "",
             "top-level modules:"]
    for name, child in model.named_children():
        lines.append(f"  {name:<24} {sum(p.numel() for p in child.parameters()):>14,}")
    return "\n".join(lines + ["", repr(model)]) + "\n"


def resolve_paths(bundle: Bundle) -> Bundle:
    """The bundle with data paths made absolute, as saved in the run (so it can be resumed from anywhere)."""
    raw = bundle.to_dict()
    if bundle.data.source != "phantom":
        raw["data"]["source"] = str(Path(bundle.data.source).expanduser().resolve())
    if isinstance(bundle.data.source_labels, str):
        raw["data"]["source_labels"] = str(Path(bundle.data.source_labels).expanduser().resolve())
    if bundle.data.split_file is not None:
        raw["data"]["split_file"] = str(Path(bundle.data.split_file).expanduser().resolve())
    return bundle_from_dict(raw)


def load_bundle_for_resume(run_dir: str | Path, overrides: list[str] | None) -> Bundle:
    """The run's own resolved bundle, with ``--set`` overrides (typically a larger train.epochs)."""
    run = Run.open(run_dir)
    return bundle_from_dict(run.bundle.to_dict(), overrides)


class CheckpointPolicy:
    """``train.checkpoint_every``: "epoch", "<N>it" or "<N>min" (the end of training and a stop always write)."""

    def __init__(self, spec: str, step: int) -> None:
        self.kind, self.value = parse_checkpoint_every(spec)
        self.last_step, self.last_time = step, time.time()

    def due(self, step: int, epoch_end: bool) -> bool:
        if self.kind == "epoch":
            return epoch_end
        if self.kind == "it":
            return step - self.last_step >= self.value
        return time.time() - self.last_time >= 60 * self.value

    def written(self, step: int) -> None:
        self.last_step, self.last_time = step, time.time()


def train(bundle: Bundle, *, run_dir: str | Path | None = None, runs_root: str | Path = "runs", device: str = "auto",
          resume: bool = False, console: Console | None = None, show_progress: bool = True, progress: str = "auto",
          stop: StopFlag | None = None, tracking_tags: dict[str, str] | None = None) -> TrainResult:
    """Train ``bundle`` into ``run_dir`` (default ``runs_root/<run name>``).

    ``resume=True`` continues the run in ``run_dir`` from its checkpoint (or from the start if it was
    killed before its first one) up to ``bundle.train.epochs``. ``progress``: "auto" (rich bars on a
    terminal, plain lines otherwise), "rich", "plain" or "off". ``tracking_tags``: added to a new MLflow
    run's tags (``medseg compare`` files each fold under its model's run with ``mlflow.parentRunId``).

    Under torchrun (``WORLD_SIZE`` > 1) this is one rank of a DistributedDataParallel training: each
    rank trains on its own shard of the training cases (``train.batch_size`` per rank) and validates
    its shard of the validation cases, the scores summed over ranks; rank 0 alone writes the run and
    MLflow. Every rank returns the :class:`TrainResult` (its tracking run id on rank 0 only)."""
    dist, dev = Dist.from_env(device)
    try:
        return _train(bundle, dist, dev, run_dir=run_dir, runs_root=runs_root, resume=resume, console=console,
                      show_progress=show_progress, progress=progress, stop=stop, tracking_tags=tracking_tags)
    finally:
        dist.close()


def _train(bundle: Bundle, dist: Dist, dev: torch.device, *, run_dir, runs_root, resume: bool, console: Console | None,
           show_progress: bool, progress: str, stop: StopFlag | None, tracking_tags: dict[str, str] | None) -> TrainResult:
    from monai.utils import set_determinism

    from medseg.data.datasets import prepare
    from medseg.models import check_before_data, check_window
    from medseg.track import NullTracker, make_tracker

    # ranks other than 0 say nothing (rank 0 speaks for the training) and write nothing
    console = (console or Console(stderr=True)) if dist.is_main else Console(stderr=True, quiet=True)
    bundle = resolve_paths(bundle)
    t = bundle.train

    # --- everything that can fail on user input, before anything is written ----------------------
    run: Run | None = None
    ckpt: dict | None = None
    notes: list[str] = [n for n in (bundle.postprocess.unknown(bundle.data.labels),) if n]
    if resume:
        if run_dir is None:
            raise MedsegError("--resume needs the run directory to continue (--run-dir)")
        run = Run.open(run_dir)
        if run.status == "running":
            raise MedsegError(f"{run_dir} is being trained by another process (pid {run.info.get('pid')} on {run.info.get('host')})")
        changes = run.check_resume(bundle)
        notes += [f"resume changes {c}" for c in changes]
        if any(c.startswith("data.num_workers") for c in changes):
            notes.append("data.num_workers changed: the augmentation stream is seeded per worker, so this run stays valid but "
                         "is no longer bit-identical to an uninterrupted one")
        ckpt = run.checkpoint()
        finished = ckpt is not None and (ckpt["step"] >= t.iterations if t.iterations is not None else ckpt["epoch"] >= t.epochs)
        if finished:
            if run.status == "complete":
                length = (f"{ckpt['step']} steps; raise train.iterations" if t.iterations is not None
                          else f"{ckpt['epoch']} epochs; raise train.epochs")
                raise MedsegError(f"{run_dir} already trained {length} to continue")
            notes.append(f"{run.path.name} was stopped after its last checkpoint: finishing it (metrics, status)")
        if ckpt is None:
            notes.append(f"{run.path.name} has no checkpoint (it stopped before its first one): training it from the start")
        elif not finished:
            goal = f"step {t.iterations}" if t.iterations is not None else f"epoch {t.epochs}"
            where = f"epoch {ckpt['epoch'] + 1}, after iteration {ckpt['iteration']}" if ckpt["iteration"] else f"epoch {ckpt['epoch'] + 1}"
            notes.append(f"resuming {run.path.name} at {where} (step {ckpt['step']}), up to {goal}")
    elif run_dir is not None and (Path(run_dir) / "run.json").exists():
        raise MedsegError(f"{run_dir} already holds a run; choose another --run-dir, or continue it with --resume")
    set_determinism(seed=t.seed)
    planned = bundle.planned_fields()
    # a bad model argument, head rate or ROI fails before the data are read, also when the plan fills in ct_stats or the ROI
    spec = check_before_data(bundle.model.name, bundle.model.args, t.head_lr_scale, t.roi, bundle.infer_roi)
    if not planned:  # and what only building the network shows (MONAI's own checks)
        model = build_model(bundle)
    mode = progress if show_progress and dist.is_main else "off"

    def data_progress(stage: str, i: int, n: int) -> None:
        if mode != "off" and i == n:
            what = {"phantom": "phantom: {n} cases ready", "check": "checked {n} cases", "fingerprint": "fingerprinted {n} cases"}[stage]
            console.print(f"[dim]{what.format(n=n)}[/dim]")

    # rank 0 first: it writes the phantom cache the others then read, and its data error stops them all
    found, lut, train_cases, val_cases, data_notes = dist.main_first(prepare, bundle.data, bundle.data.labels, data_progress)
    if dist.enabled and len(train_cases) < dist.world:
        raise MedsegError(f"{len(train_cases)} training case(s) cannot be shared by {dist.world} processes (each trains on its own "
                          "cases): use fewer processes")
    plan = None
    if planned:
        # K folds are planned on every case, as nnU-Net does, so that the folds share one preprocessing and can be ensembled
        seen, others = (sorted(train_cases + val_cases, key=lambda c: c.name), []) if bundle.data.fold is not None else (train_cases, val_cases)
        # planned once, on rank 0 (each rank's GPU would size its own ROI and batch), then shared
        bundle, plan = dist.from_main(_plan, bundle, found.root, lut, seen, dev, console if mode != "off" else None,
                                      lambda i, n: data_progress("fingerprint", i, n), others=others)
        t = bundle.train
        model = build_model(bundle)
        check_window(bundle.model.name, t.roi, bundle.infer_roi)
    test_hook("data_ready")
    splits = {"train": [c.as_dict() for c in train_cases], "val": [c.as_dict() for c in val_cases]}
    if found.splits is not None:
        splits.update(fold=bundle.data.fold, folds=found.splits)
    if run is not None:
        _check_same_split(run, splits)
    saved_uri = run.info.get("tracking_uri") if run is not None else None
    if saved_uri and bundle.tracking.backend != "none":
        _check_store_exists(saved_uri)
    tracker = make_tracker(bundle.tracking, uri=saved_uri) if dist.is_main else NullTracker()

    # --- the run directory (locked from here on) ---------------------------------------------------
    amp = amp_mode(t.amp, dev)
    extra = {"device": str(dev), "amp": amp, "torch_version": torch.__version__,
             "train_cases": [c.name for c in train_cases], "val_cases": [c.name for c in val_cases],
             "parameters": sum(p.numel() for p in model.parameters())}
    if dist.enabled:
        extra["distributed"] = {"world_size": dist.world, "backend": dist.backend, "batch_size_per_rank": t.batch_size,
                                "train_shards": [[c.name for c in shard(train_cases, r, dist.world)] for r in range(dist.world)],
                                "val_shards": [[c.name for c in shard(val_cases, r, dist.world)] for r in range(dist.world)]}
    fresh = run is None

    def open_run() -> Run:
        if not fresh:
            run.acquire()
            return run
        prefix = f"{spec.display}-{OPTIMIZER_NAMES[t.optimizer]}-{LOSS_NAMES[t.loss]}"
        return Run.create(prefix, run_dir=run_dir, runs_root=runs_root, model=bundle.model.name,
                          tracked_names=tracker.run_names(), extra=extra)

    opened: list[Run] = []  # rank 0 owns the directory; the other ranks learn where it is (or rank 0's error)
    path = dist.from_main(lambda: str((opened.append(open_run()) or opened[0]).path))
    run = opened[0] if dist.is_main else _Follower(Path(path))  # type: ignore[assignment]
    if dist.enabled:  # each rank its own dropout and augmentation stream (the weights are rank 0's: DDP broadcasts them)
        set_determinism(seed=(t.seed + 7_919 * dist.rank) % 2**31)
    try:
        # What can still fail (the checkpoint, the tracking store) fails before a file of the run changes.
        try:
            session = _Session(bundle, run, model, dev, amp, lut, train_cases, val_cases, console, mode, stop or StopFlag(), tracker,
                               dist)
            rng = session.restore(ckpt) if ckpt is not None else None
            if fresh:
                run.write_description(bundle, splits, model_summary(model), plan=plan.as_dict() if plan else None)
            session.open_tracking(fresh, tracking_tags or {})
        except BaseException:
            tracker.end("FAILED")
            if fresh:
                run.discard()  # a run that never started leaves nothing behind
            raise
        run.info.update(extra)
        if not dist.enabled:
            run.info.pop("distributed", None)  # a run resumed by one process: no longer sharded
        run.mark_running()
        if not fresh:
            run.write_description(bundle, splits, model_summary(model))  # the resumed bundle (a new length, ...)
        for note in data_notes + notes + session.notes:
            console.print(f"[yellow]note:[/yellow] {escape(note)}", highlight=False, soft_wrap=True)
        return session.fit(rng)
    finally:
        run.release()


def _plan(bundle: Bundle, root, lut, cases, dev, console: Console | None, progress, others=()) -> tuple[Bundle, Any]:
    """Fill the bundle's "auto" fields from a fingerprint of the training cases (``medseg/plan.py``)."""
    from medseg.data.io import check_grid, read_image
    from medseg.plan import apply_plan, fingerprint, make_plan

    fp = fingerprint(cases, lut, bundle.data.labels, root=root, progress=progress)
    plan = make_plan(fp, bundle, str(dev))
    if console is not None:
        print_plan(console, plan, fp)
    planned = apply_plan(bundle, plan)
    for case in [*cases, *others]:  # the size check data.spacing "auto" skipped: a planned spacing may still be extreme for one case
        check_grid(read_image(case.image), case.image, planned.data.spacing)
    return planned, plan


def print_plan(console: Console, plan, fp) -> None:
    from rich.table import Table

    from medseg.engine.progress import print_wide
    from medseg.plan import plan_rows

    table = Table(title=f"plan for {plan.model} ({', '.join(plan.filled) or 'nothing on auto'})", title_justify="left")
    for col in ("", "value", "from"):
        table.add_column(col)
    for row in plan_rows(plan, fp):
        table.add_row(*(escape(c) for c in row))
    print_wide(console, table)
    for note in plan.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}", highlight=False, soft_wrap=True)


def _check_store_exists(uri: str) -> None:
    """A resumed run's SQLite store must still be there (MLflow would silently create an empty one)."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if not path.is_file():
            raise MedsegError(f"the run's MLflow store {path} is gone; restore it, or resume with --tracking none")


def _check_same_split(run: Run, splits: dict[str, list]) -> None:
    import json

    try:
        saved = json.loads((run.path / "splits.json").read_text())
    except (OSError, json.JSONDecodeError):
        return  # killed before the description was written: nothing to compare with
    for part in ("train", "val"):
        old = sorted(c["name"] for c in saved.get(part, []))
        new = sorted(c["name"] for c in splits[part])
        if old != new:
            gone, added = sorted(set(old) - set(new)), sorted(set(new) - set(old))
            what = f"{len(gone)} gone (first: {gone[0]})" if gone else f"{len(added)} new (first: {added[0]})"
            raise MedsegError(f"cannot resume {run.path.name}: its {part} cases changed since it started ({what}); start a new run")


def _cycle(loader):
    while True:
        yield from loader


class _Follower:
    """What a rank other than 0 holds of the run: where it is. Writing the run is rank 0's."""

    def __init__(self, path: Path) -> None:
        self.path, self.name, self.info = path, path.name, {}

    def heartbeat(self, force: bool = False) -> None: ...
    def save_checkpoint(self, state: dict) -> None: ...
    def save_best(self, model_state: dict) -> None: ...
    def write_metrics(self, history) -> None: ...
    def save_info(self, **changes) -> None: ...
    def mark_running(self) -> None: ...
    def write_description(self, *args, **kwargs) -> None: ...
    def discard(self) -> None: ...
    def release(self) -> None: ...


class TrainForward(torch.nn.Module):
    """Network and loss as one module, ``(image, label) -> loss``: what DistributedDataParallel wraps,
    so that a model scoring what it trains on (``training_loss``: the tri-planar FCN's slices per axis)
    also goes through DDP's forward and has its gradients averaged over ranks."""

    def __init__(self, model: torch.nn.Module, loss_fn) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if hasattr(self.model, "training_loss"):
            return self.model.training_loss(x, y, self.loss_fn)
        return self.loss_fn(self.model(x), y)


class _Session:
    """One training process's state: built once, then :meth:`fit` runs the epochs."""

    def __init__(self, bundle: Bundle, run: Run, model, dev, amp: str, lut, train_cases, val_cases, console, mode, stop, tracker,
                 dist: Dist | None = None):
        from monai.data import CacheDataset, DataLoader, Dataset

        from medseg.data.transforms import train_transforms, val_transforms
        from medseg.models import param_groups

        self.bundle, self.run, self.dev, self.amp, self.console, self.stop, self.tracker = bundle, run, dev, amp, console, stop, tracker
        self.dist = dist = dist or Dist()
        t = self.t = bundle.train
        self.model = model.to(dev)
        self.optimizer = make_optimizer(t, param_groups(self.bundle.model.name, self.model, t.head_lr_scale))
        self.scaler = grad_scaler(amp)
        self.autocast = autocast(amp, dev)
        self.loss_fn = make_loss(t.loss)
        self.net: torch.nn.Module = TrainForward(self.model, self.loss_fn)
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            # static_graph: every step uses the same parameters, and some never (MONAI's ViT leaves a few unused)
            self.net = DistributedDataParallel(self.net, device_ids=[dev.index] if dev.type == "cuda" else None, static_graph=True)
        ds_cls = CacheDataset if bundle.data.cache else Dataset
        kw = {"cache_rate": 1.0, "num_workers": None, "progress": False} if bundle.data.cache else {}
        # each rank its own shard (all of them with one process)
        mine, my_val = shard(train_cases, dist.rank, dist.world), shard(val_cases, dist.rank, dist.world)
        self.train_ds = ds_cls([c.as_dict() for c in mine], train_transforms(bundle, lut), **kw)
        self.val_ds = ds_cls([c.as_dict() for c in my_val], val_transforms(bundle, lut), **kw)
        self.generator = torch.Generator()
        self.loader = DataLoader(self.train_ds, batch_size=t.batch_size, shuffle=True, num_workers=bundle.data.num_workers,
                                 generator=self.generator, pin_memory=dev.type == "cuda")
        # every rank takes the same number of steps (DDP averages gradients at each): the largest shard's batches
        self.iters = t.iterations_per_epoch_for(-(-len(shard(train_cases, 0, dist.world)) // t.batch_size))
        self.seen: set[str] = set()  # the training cases this process's loader gave (run.json's distributed.seen)
        self.time_up = False  # train.max_minutes spent, as the ranks agreed
        self.mode = mode
        self.n_val = len(self.val_ds)  # this rank's
        # position and history
        self.epoch_done, self.iteration, self.step = 0, 0, 0
        self.epoch_losses: list[float] = []
        self.epoch_seconds = 0.0
        self.best, self.best_epoch = float("-inf"), 0
        self.history: list[dict[str, Any]] = []
        self.n_epochs = self.count_epochs()
        self.schedule = new_schedule(t.scheduler, t.lr, self.step_total(), t.warmup)
        self.notes: list[str] = []
        if t.warmup >= self.step_total():
            self.notes.append(f"train.warmup {t.warmup} is not shorter than the {self.step_total()} training steps: the rate "
                              "only climbs, and training ends at its peak with no decay")

    # -- checkpoint -------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        rngs = self.dist.gather(capture_rng())  # every rank's, so that each continues its own stream on resume
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict() if self.scaler is not None else None, "schedule": self.schedule,
                 "epoch": self.epoch_done, "iteration": self.iteration, "step": self.step, "iterations_per_epoch": self.iters,
                 "epoch_losses": list(self.epoch_losses), "epoch_seconds": self.epoch_seconds,
                 "best_dice": self.best, "best_epoch": self.best_epoch, "history": self.history, "rng": rngs[0], "amp": self.amp}
        if self.dist.enabled:
            state.update(world_size=self.dist.world, rng_ranks=rngs)
        return state

    def checkpoint(self) -> None:
        """On every rank at the same step (the gather of RNG states is collective); rank 0 writes."""
        self.run.save_checkpoint(self.state())
        self.run.heartbeat(force=True)

    def restore(self, ckpt: dict) -> dict | None:
        """Load ``ckpt``; return its RNG states, to be restored once the data stream is repositioned."""
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch_done, self.iteration, self.step = ckpt["epoch"], ckpt["iteration"], ckpt["step"]
        self.epoch_losses, self.epoch_seconds = list(ckpt["epoch_losses"]), ckpt["epoch_seconds"]
        self.best, self.best_epoch = ckpt["best_dice"], ckpt["best_epoch"]
        self.history = [dict(row) for row in ckpt["history"]]
        self.n_epochs = self.count_epochs()
        rng = ckpt["rng"]
        saved_world = ckpt.get("world_size", 1)
        if saved_world == self.dist.world:
            rng = ckpt.get("rng_ranks", [rng])[self.dist.rank]
        else:
            self.notes.append(f"the checkpoint was written by {saved_world} process(es), this training has {self.dist.world}: "
                              "the cases are shared out anew, so it continues validly but not bit-identically")
        self.schedule, note = continue_schedule(ckpt["schedule"], self.step, self.t.scheduler, self.t.lr, self.step_total())
        # the fresh run's warm-up note does not describe a resumed schedule; continue_schedule's note does
        self.notes = [n for n in self.notes if not n.startswith("train.warmup ")]
        if note:
            self.notes.append(note)
        return rng

    def epoch_length(self) -> int:
        """Steps in the current epoch: a full one, or what is left of ``train.iterations`` counted from
        the step this epoch started at (so a resume with a new iterations_per_epoch still stops there)."""
        if self.t.iterations is None:
            return self.iters
        return max(0, min(self.iters, self.t.iterations - (self.step - self.iteration)))

    def count_epochs(self) -> int:
        """Epochs when the run is done, counted from the current position (fresh or resumed)."""
        if self.t.iterations is None:
            return self.t.epochs
        left = max(0, self.t.iterations - (self.step - self.iteration))  # from the start of the current epoch
        return self.epoch_done + max(1 if left or self.iteration else 0, -(-left // self.iters))

    def step_total(self) -> int:
        """Optimiser steps when the run is done (iterations per epoch may have changed on resume)."""
        if self.t.iterations is not None:
            return self.t.iterations
        left_this_epoch = max(0, self.iters - self.iteration)
        return self.step + left_this_epoch + self.iters * max(0, self.n_epochs - self.epoch_done - 1)

    def train_seconds(self) -> float:
        """Seconds of optimiser steps so far (the finished epochs' and this one's; validation not counted)."""
        return sum(row.get("epoch_seconds", 0.0) for row in self.history) + self.epoch_seconds

    def time_spent(self) -> bool:
        """``train.max_minutes`` spent (on this rank's clock; ranks agree through :meth:`Dist.any`)."""
        return self.time_up or self.t.max_minutes is not None and self.train_seconds() >= 60 * self.t.max_minutes

    # -- the data stream ----------------------------------------------------------------------------
    def batches(self, epoch: int, skip: int):
        """Epoch ``epoch``'s batches, seeded from (seed, epoch) alone; the first ``skip`` are drawn and
        dropped, so a resume mid-epoch continues with the batch an uninterrupted run would see."""
        seed = (epoch_seed(self.t.seed, epoch) + 104_729 * self.dist.rank) % 2**31  # each rank its own augmentations
        self.generator.manual_seed(seed)
        self.train_ds.transform.set_random_state(seed=seed)
        stream = _cycle(self.loader)
        for _ in range(skip):
            next(stream)
        return stream

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self, rng: dict | None) -> TrainResult:
        """The epochs left; ``rng``: the checkpoint's RNG states (None for a fresh start)."""
        self.stop.armed = True
        if self.history:
            self.run.write_metrics(self.history)  # rows a killed process checkpointed but never wrote
        self.fill_tracking_gaps()
        policy = CheckpointPolicy(self.t.checkpoint_every, self.step)
        bar = TrainProgress(self.console, self.n_epochs, self.iters, self.n_val, mode=self.mode,
                            first_epoch=self.epoch_done + 1, first_iteration=min(self.iteration, self.iters),
                            done=self.step, total=self.step_total())
        try:
            with bar:
                for epoch in range(self.epoch_done + 1, self.n_epochs + 1):
                    self.train_iterations(epoch, rng, policy, bar)
                    rng = None
                    time_up = self.time_up = self.dist.any(self.time_spent())[0]
                    if time_up:  # train.max_minutes: this is the last epoch (validated and checkpointed as such)
                        self.n_epochs = epoch
                    row = self.finish_epoch(epoch, bar)
                    self.epoch_done, self.iteration, self.epoch_losses, self.epoch_seconds = epoch, 0, [], 0.0
                    self.history.append(row)
                    if self.dist.any(policy.due(self.step, epoch_end=True) or epoch == self.n_epochs)[0]:
                        self.checkpoint()
                        policy.written(self.step)
                    test_hook("epoch_end")
                    self.run.write_metrics(self.history)
                    self.tracker.log_metrics(_metrics_of(row), step=epoch)
                    bar.end_epoch(epoch, row)
                    if time_up:
                        self.console.print(f"[yellow]note:[/yellow] train.max_minutes {self.t.max_minutes:g} spent after step "
                                           f"{self.step} of {self.step_total()}: training ends here", highlight=False)
                        break
        except _StopNow:
            self.checkpoint()
            self.run.write_metrics(self.history)
            self.run.save_info(status="interrupted", error=f"stopped by signal {self.stop.signal}")
            self.tracker.end("KILLED")
            raise Stopped(self.run.path, self.epoch_done + 1, self.iteration, self.stop.signal) from None
        except BaseException as e:
            self.run.save_info(status="interrupted" if isinstance(e, KeyboardInterrupt) else "failed", error=f"{type(e).__name__}: {e}")
            self.tracker.end("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
        self.tracker.log_artifact(self.run.path / "metrics.csv")
        if (self.run.path / "model_best.pt").is_file():
            self.tracker.log_artifact(self.run.path / "model_best.pt")
        if self.dist.enabled:  # the training cases each rank's loader actually gave, since this process started
            seen = self.dist.gather(sorted(self.seen))
            self.run.save_info(distributed={**self.run.info.get("distributed", {}), "seen_train": seen})
        self.run.save_info(status="complete", finished=time.strftime("%Y-%m-%dT%H:%M:%S"), epochs=self.n_epochs, steps=self.step,
                           best_dice=self.best, best_epoch=self.best_epoch, train_seconds=round(self.train_seconds(), 2),
                           time_limited=self.time_spent())
        self.tracker.end("FINISHED")
        return TrainResult(self.run.path, self.run.name, self.best, self.best_epoch, self.history, self.tracker.run_id)

    def train_iterations(self, epoch: int, rng: dict | None, policy: CheckpointPolicy, bar: TrainProgress) -> None:
        n = self.epoch_length()
        bar.iters = n  # "iteration i/n" of this epoch, which may be shorter than a full one
        if self.iteration >= n:  # stopped during this epoch's validation: only that is left
            if rng is not None:
                restore_rng(rng)
            return
        batches = self.batches(epoch, self.iteration)
        if rng is not None:  # after repositioning the data stream: the uninterrupted run's exact state
            restore_rng(rng)
        self.model.train()
        t0 = time.time() - self.epoch_seconds
        while self.iteration < n:
            batch = next(batches)
            self.seen.update(batch["name"])
            loss = self.train_step(batch)
            self.iteration += 1
            self.step += 1
            self.epoch_losses.append(loss)
            self.epoch_seconds = time.time() - t0
            bar.advance_train(epoch, self.iteration, loss)
            self.run.heartbeat()
            test_hook(f"step:{self.step}")
            # decided by all ranks together (a signal, a clock or a timed checkpoint may come to one rank first)
            stop, time_up, due = self.dist.any(self.stop.requested, self.time_spent(),
                                               self.iteration < n and policy.due(self.step, epoch_end=False))
            if stop:
                raise _StopNow
            if time_up:
                self.time_up = True
                break  # train.max_minutes: this epoch ends here (validated and checkpointed as usual)
            if due:
                self.checkpoint()
                policy.written(self.step)

    def train_step(self, batch) -> float:
        x, y = batch["image"].to(self.dev), batch["label"].to(self.dev)
        set_lr(self.optimizer, lr_at(self.schedule, self.step))
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = self.net(x, y)  # TrainForward, in DDP with several ranks
        value = self.dist.mean(loss.detach().item())  # the mean over ranks: all of them see a NaN on one, and stop together
        if not math.isfinite(value):
            raise MedsegError(f"the loss became {value} at step {self.step + 1} (lower train.lr, or check the data)")
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if self.t.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.t.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if self.t.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.t.grad_clip)
            self.optimizer.step()
        return value

    def finish_epoch(self, epoch: int, bar: TrainProgress) -> dict[str, Any]:
        from medseg.engine.validate import validate

        t = self.t
        row: dict[str, Any] = {"epoch": epoch, "step": self.step,
                               "train_loss": sum(self.epoch_losses) / max(1, len(self.epoch_losses)),
                               "lr": lr_at(self.schedule, max(0, self.step - 1)), "epoch_seconds": round(self.epoch_seconds, 2)}
        if epoch % t.val_interval == 0 or epoch == self.n_epochs:
            bar.start_validation(epoch)
            self.dist.sync_buffers(self.model)
            test_hook("validation")

            def on_case(i: int, n: int | None = None) -> None:
                bar.advance_val(i, n)
                if self.dist.enabled:  # ranks validate their shards at their own pace: a stop waits for the next step
                    self.run.heartbeat()
                else:
                    self.check_stop()

            result = validate(self.model, self.val_ds, self.bundle, self.dev, self.autocast, on_case=on_case,
                              on_window=None if self.dist.enabled else (lambda i, n: self.check_stop()), reduce=self.dist.sum_array)
            row.update({"val_mean_dice": result["mean_dice"], "val_mean_iou": result["mean_iou"]})
            row.update({f"val_dice_{k}": v for k, v in result["dice"].items()})
            score = result["mean_dice"] if math.isfinite(result["mean_dice"]) else float("-inf")
            if score > self.best or self.best_epoch == 0:
                self.best, self.best_epoch = score, epoch
                self.run.save_best(self.model.state_dict())
        return row

    def check_stop(self) -> None:
        self.run.heartbeat()
        if self.stop.requested:
            raise _StopNow

    # -- tracking ---------------------------------------------------------------------------------
    def open_tracking(self, fresh: bool, tags: dict[str, str]) -> None:
        """Start the MLflow run (fresh), or continue the run's own one; with tracking off, keep the
        link the run already has so a later resume with tracking continues it."""
        from medseg.track import NullTracker

        tracker, run = self.tracker, self.run
        previous = run.info.get("tracking_run_id")
        if isinstance(tracker, NullTracker):
            return
        if previous:
            try:
                tracker.resume(previous)
            except Exception as e:
                detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise MedsegError(f"cannot continue MLflow run {previous} in {tracker.uri} ({detail}); "
                                  "resume with --tracking none, or restore that store") from None
        else:
            params = flatten(self.bundle.to_dict())
            params.update({"parameters": sum(p.numel() for p in self.model.parameters()), "device": str(self.dev),
                           "amp_mode": self.amp, "train_cases": len(self.train_ds), "val_cases": len(self.val_ds)})
            tracker.start(run.name, params, {"medseg.model": self.bundle.model.name, "medseg.run_dir": str(run.path.resolve()), **tags})
            for name in ("bundle.json", "plan.json", "model_summary.txt", "labels.json"):
                if (run.path / name).is_file():
                    tracker.log_artifact(run.path / name)
            tracker.log_metrics({"parameters": params["parameters"]}, step=0)
        run.info.update(tracking_run_id=tracker.run_id, tracking_uri=tracker.uri)

    def fill_tracking_gaps(self) -> None:
        """Epochs a killed process finished but never logged: one continuous history."""
        logged = self.tracker.logged_steps("train_loss")
        for row in self.history:
            if row["epoch"] not in logged:
                self.tracker.log_metrics(_metrics_of(row), step=row["epoch"])


def _metrics_of(row: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in row.items() if k in ("train_loss", "lr") or k.startswith("val_")}
