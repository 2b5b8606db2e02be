"""``train(bundle)``: from a validated bundle to a complete, self-describing run directory.

Everything a user can get wrong (bundle keys, model arguments, ROI, data files, label values) is
checked before the run directory is created. The directory's ``run.json`` says ``running`` while
training, ``complete`` only after the last epoch's files are written, ``failed``/``interrupted``
otherwise, and inference uses complete runs only.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from medseg.config import Bundle, bundle_from_dict, flatten
from medseg.engine.components import LOSS_NAMES, OPTIMIZER_NAMES, make_loss, make_optimizer, make_scheduler
from medseg.engine.progress import TrainProgress
from medseg.engine.rundir import append_metrics, labels_json, new_run_info, next_run_name, read_run, write_json
from medseg.errors import MedsegError


@dataclass
class TrainResult:
    run_dir: Path
    name: str
    best_dice: float
    best_epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)
    tracking_run_id: str | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MedsegError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise MedsegError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def amp_context(enabled: bool, device: torch.device):
    """bf16 autocast where the GPU supports it, else fp16 with a gradient scaler; off on CPU."""
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext, None, "off"
    if torch.cuda.is_bf16_supported():
        return (lambda: torch.autocast("cuda", dtype=torch.bfloat16)), None, "bf16"
    return (lambda: torch.autocast("cuda", dtype=torch.float16)), torch.amp.GradScaler("cuda"), "fp16"


def build_model(bundle: Bundle):
    from medseg.models import check_roi, create_model

    model = create_model(bundle.model.name, out_channels=len(bundle.data.labels) + 1, roi=bundle.train.roi,
                         grad_checkpointing=bundle.train.grad_checkpointing, **bundle.model.args)
    check_roi(bundle.model.name, bundle.infer_roi)
    return model


def model_summary(model: torch.nn.Module) -> str:
    total = sum(p.numel() for p in model.parameters())
    lines = [f"parameters: {total:,} ({sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable)", "",
             "top-level modules:"]
    for name, child in model.named_children():
        lines.append(f"  {name:<24} {sum(p.numel() for p in child.parameters()):>14,}")
    return "\n".join(lines + ["", repr(model)]) + "\n"


def _save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(bundle: Bundle, *, run_dir: str | Path | None = None, runs_root: str | Path = "runs", device: str = "auto",
          resume: bool = False, console: Console | None = None, show_progress: bool = True) -> TrainResult:
    """Train ``bundle``; write the run to ``run_dir`` (default ``runs_root/<run name>``).

    With ``resume=True``, ``run_dir`` must hold a run from an earlier call; training continues
    from its ``checkpoint.pt`` up to ``bundle.train.epochs``."""
    from monai.data import CacheDataset, DataLoader, Dataset
    from monai.utils import set_determinism

    from medseg.data.datasets import prepare
    from medseg.data.transforms import train_transforms, val_transforms
    from medseg.engine.validate import validate
    from medseg.models import get_spec
    from medseg.track import NullTracker, make_tracker

    console = console or Console(stderr=True)
    t = bundle.train
    dev = resolve_device(device)

    # --- everything that can fail on user input, before anything is written ----------------------
    previous = None
    if resume:
        if run_dir is None:
            raise MedsegError("--resume needs the run directory to continue (--run-dir)")
        previous = read_run(run_dir)
        if not (Path(run_dir) / "checkpoint.pt").is_file():
            raise MedsegError(f"{run_dir}: no checkpoint.pt to resume from")
        done = torch.load(Path(run_dir) / "checkpoint.pt", map_location="cpu", weights_only=True)["epoch"]
        if done >= t.epochs:  # before run.json is touched: a complete run must stay complete
            raise MedsegError(f"{run_dir} already trained {done} epochs; raise train.epochs to continue")
    elif run_dir is not None and (Path(run_dir) / "run.json").exists():
        raise MedsegError(f"{run_dir} already holds a run; choose another --run-dir or pass --resume")
    set_determinism(seed=t.seed)
    model = build_model(bundle)
    spec = get_spec(bundle.model.name)

    def data_progress(stage: str, i: int, n: int) -> None:
        if show_progress and i == n:
            console.print(f"[dim]{'phantom: ' if stage == 'phantom' else 'checked '}{n} cases{' ready' if stage == 'phantom' else ''}[/dim]")

    found, lut, train_cases, val_cases, notes = prepare(bundle.data, bundle.data.labels, data_progress)
    for note in notes:
        console.print(f"[yellow]note:[/yellow] {note}")

    tracker = make_tracker(bundle.tracking)
    prefix = f"{spec.display}-{OPTIMIZER_NAMES[t.optimizer]}-{LOSS_NAMES[t.loss]}"
    if previous is not None:
        name, run_dir = previous["name"], Path(run_dir)
    else:
        name = next_run_name(prefix, Path(runs_root), datetime.now().strftime("%Y%m%d-%H%M"), tracker.run_names())
        run_dir = Path(run_dir) if run_dir is not None else Path(runs_root) / name
    run_dir.mkdir(parents=True, exist_ok=True)

    # --- the run directory ------------------------------------------------------------------------
    amp_ctx, scaler, amp_mode = amp_context(t.amp, dev)
    resolved = bundle.to_dict()
    if bundle.data.source != "phantom":
        resolved["data"]["source"] = str(Path(bundle.data.source).expanduser().resolve())
    if isinstance(bundle.data.source_labels, str):
        resolved["data"]["source_labels"] = str(Path(bundle.data.source_labels).expanduser().resolve())
    bundle = bundle_from_dict(resolved)
    info = new_run_info(name, bundle.model.name, {
        "created": (previous or {}).get("created", datetime.now().isoformat(timespec="seconds")),
        "device": str(dev), "amp": amp_mode, "torch_version": torch.__version__,
        "train_cases": [c.name for c in train_cases], "val_cases": [c.name for c in val_cases],
        "parameters": sum(p.numel() for p in model.parameters()),
    })
    if previous is not None:
        info.update({k: previous[k] for k in ("best_dice", "best_epoch", "tracking_run_id") if k in previous})
    write_json(run_dir / "run.json", info)
    write_json(run_dir / "bundle.json", bundle.to_dict())
    write_json(run_dir / "labels.json", labels_json(bundle.data.labels))
    write_json(run_dir / "splits.json", {"train": [c.as_dict() for c in train_cases], "val": [c.as_dict() for c in val_cases]})
    (run_dir / "model_summary.txt").write_text(model_summary(model))

    history: list[dict[str, Any]] = []
    try:
        model = model.to(dev)
        optimizer = make_optimizer(t, model.parameters())
        train_ds_cls = CacheDataset if bundle.data.cache else Dataset
        cache_kw = {"cache_rate": 1.0, "num_workers": None, "progress": False} if bundle.data.cache else {}
        train_ds = train_ds_cls([c.as_dict() for c in train_cases], train_transforms(bundle, lut), **cache_kw)
        val_ds = train_ds_cls([c.as_dict() for c in val_cases], val_transforms(bundle, lut), **cache_kw)
        generator = torch.Generator().manual_seed(t.seed)
        train_loader = DataLoader(train_ds, batch_size=t.batch_size, shuffle=True, num_workers=bundle.data.num_workers,
                                  generator=generator, pin_memory=dev.type == "cuda")
        val_loader = DataLoader(val_ds, batch_size=1, num_workers=bundle.data.num_workers)
        iters = t.iterations_per_epoch or len(train_loader)
        scheduler = make_scheduler(t, optimizer, iters * t.epochs)
        loss_fn = make_loss(t.loss)

        start_epoch, step, best, best_epoch = 1, 0, float("-inf"), 0
        if previous is not None:
            ckpt = torch.load(run_dir / "checkpoint.pt", map_location=dev, weights_only=True)
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if scheduler is not None and ckpt.get("scheduler"):
                scheduler.load_state_dict(ckpt["scheduler"])
            start_epoch, step = ckpt["epoch"] + 1, ckpt["step"]
            best, best_epoch = ckpt["best_dice"], ckpt["best_epoch"]

        if previous is not None and previous.get("tracking_run_id") and not isinstance(tracker, NullTracker):
            tracker.mlflow.start_run(run_id=previous["tracking_run_id"])
            tracker.run_id = previous["tracking_run_id"]
        else:
            params = flatten(bundle.to_dict())
            params.update({"parameters": info["parameters"], "device": str(dev), "amp_mode": amp_mode,
                           "train_cases": len(train_cases), "val_cases": len(val_cases)})
            tracker.start(name, params, {"medseg.model": spec.display, "medseg.run_dir": str(run_dir.resolve())})
            tracker.log_artifact(run_dir / "bundle.json")
            tracker.log_artifact(run_dir / "model_summary.txt")
            tracker.log_artifact(run_dir / "labels.json")
        info["tracking_run_id"] = tracker.run_id
        info["tracking_uri"] = getattr(tracker, "uri", None)
        write_json(run_dir / "run.json", info)
        tracker.log_metrics({"parameters": info["parameters"]}, step=0)

        progress = TrainProgress(console, t.epochs, iters, len(val_cases), enabled=show_progress, first_epoch=start_epoch)
        with progress:
            for epoch in range(start_epoch, t.epochs + 1):
                t0 = time.time()
                losses = train_epoch(model=model, loader=train_loader, iterations=iters, loss_fn=loss_fn, optimizer=optimizer,
                                     scheduler=scheduler, scaler=scaler, autocast=amp_ctx, device=dev,
                                     on_step=lambda loss, e=epoch: progress.advance_train(e, loss))
                step += len(losses)
                row: dict[str, Any] = {"epoch": epoch, "train_loss": sum(losses) / len(losses),
                                       "lr": optimizer.param_groups[0]["lr"], "epoch_seconds": round(time.time() - t0, 2)}
                metrics = {"train_loss": row["train_loss"], "lr": row["lr"]}
                if epoch % t.val_interval == 0 or epoch == t.epochs:
                    result = validate(model, val_loader, bundle, dev, amp_ctx, on_case=progress.advance_val)
                    row.update({"val_mean_dice": result["mean_dice"], "val_mean_iou": result["mean_iou"]})
                    row.update({f"val_dice_{k}": v for k, v in result["dice"].items()})
                    metrics.update({k: v for k, v in row.items() if k.startswith("val_")})
                    progress.show_dice(result["mean_dice"])
                    score = result["mean_dice"] if math.isfinite(result["mean_dice"]) else float("-inf")
                    if score > best or best_epoch == 0:
                        best, best_epoch = score, epoch
                        _save(model.state_dict(), run_dir / "model_best.pt")
                _save(model.state_dict(), run_dir / "model_last.pt")
                _save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                       "scheduler": scheduler.state_dict() if scheduler is not None else None,
                       "epoch": epoch, "step": step, "best_dice": best, "best_epoch": best_epoch}, run_dir / "checkpoint.pt")
                append_metrics(run_dir / "metrics.csv", row)
                tracker.log_metrics(metrics, step=epoch)
                history.append(row)

        tracker.log_artifact(run_dir / "metrics.csv")
        tracker.log_artifact(run_dir / "model_best.pt")
        info.update({"status": "complete", "finished": datetime.now().isoformat(timespec="seconds"),
                     "epochs": t.epochs, "best_dice": best, "best_epoch": best_epoch})
        write_json(run_dir / "run.json", info)
        tracker.end("FINISHED")
    except BaseException as e:
        info.update({"status": "interrupted" if isinstance(e, KeyboardInterrupt) else "failed",
                     "error": f"{type(e).__name__}: {e}"})
        write_json(run_dir / "run.json", info)
        tracker.end("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    return TrainResult(run_dir, name, best, best_epoch, history, tracker.run_id)


def train_epoch(*, model, loader, iterations: int, loss_fn, optimizer, scheduler, scaler, autocast, device, on_step) -> list[float]:
    """``iterations`` optimiser steps over ``loader`` (restarted as often as needed); the losses."""
    model.train()
    losses: list[float] = []
    batches = _cycle(loader)
    for _ in range(iterations):
        batch = next(batches)
        x, y = batch["image"].to(device), batch["label"].to(device)
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_fn(model(x), y)
        if not torch.isfinite(loss):
            raise MedsegError(f"the loss became {loss.item()} after {len(losses)} steps of this epoch (lower train.lr, or check the data)")
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
        on_step(losses[-1])
    return losses


def _cycle(loader):
    while True:
        yield from loader


def load_bundle_for_resume(run_dir: str | Path, overrides: list[str] | None) -> Bundle:
    """The run's own resolved bundle, with ``--set`` overrides (typically a larger train.epochs)."""
    import json

    read_run(run_dir)
    path = Path(run_dir) / "bundle.json"
    return bundle_from_dict(json.loads(path.read_text()), overrides)

