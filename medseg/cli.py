"""The ``medseg`` command line: parse, call the Python API with keywords, print with rich.

Heavy libraries are imported inside the commands, so ``medseg --help`` starts fast. Errors a user
can cause (:class:`~medseg.errors.MedsegError`) print as one line and exit with status 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from medseg import __version__
from medseg.cli_common import DeviceOpt, FoldsOpt, SetOpt, SplitOpt, TrackingOpt, app, err, out, path_arg, print_table, user_errors
from medseg.errors import MedsegError


def _version(value: bool) -> None:
    if value:
        out.print(f"medseg {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")] = False) -> None:
    """medseg: train, compare and run 3D CT segmentation models."""


@app.command()
@user_errors
def train(
    bundle: Annotated[Path | None, typer.Argument(help="Bundle JSON (e.g. bundles/swin_unetr.json). Not with --resume.")] = None,
    set_: SetOpt = None,
    run_dir: Annotated[Path | None, typer.Option("--run-dir", help="Run directory (default runs/<run name>).")] = None,
    runs_root: Annotated[Path, typer.Option("--runs-root", help="Parent of new run directories.")] = Path("runs"),
    device: DeviceOpt = "auto",
    tracking: TrackingOpt = "mlflow",
    resume: Annotated[bool, typer.Option("--resume", metavar="", help="Continue the run in --run-dir from its last checkpoint "
                                         "(or from the start if it was killed before one).")] = False,
    progress: Annotated[str, typer.Option("--progress", help="auto (bars on a terminal, plain lines in a log), rich, plain or off.")] = "auto",
    no_progress: Annotated[bool, typer.Option("--no-progress", metavar="", help="Same as --progress off.")] = False,
    fold: Annotated[int | None, typer.Option("--fold", metavar="k", help="Train fold k (0 .. K-1) of K-fold cross-validation "
                                             "(data.fold); its validation cases are part k.")] = None,
    folds: FoldsOpt = None,
    split: SplitOpt = None,
    nproc: Annotated[int | None, typer.Option("--nproc", min=1, metavar="N", help="Train with N processes on this machine "
                                              "(torchrun + DistributedDataParallel: one per GPU, or gloo on the CPU); each trains on "
                                              "its own share of the cases. For several machines run torchrun yourself (README).")] = None,
) -> None:
    """Train a model from a bundle; with no data named, on the built-in synthetic CT phantom.

    Ctrl-C or SIGTERM (a scheduler's time limit) stops after the current step, writes a checkpoint
    and exits 130/143; `medseg train --resume --run-dir DIR` continues exactly where it stopped."""
    import os

    from medseg.cli_common import check_choice
    from medseg.config import load_bundle

    check_choice("--tracking", tracking, ("mlflow", "none"))
    check_choice("--progress", progress, ("auto", "rich", "plain", "off"))
    overrides = list(set_ or [])
    if tracking == "none":
        overrides.append("tracking.backend=none")
    if (folds is not None or split is not None) and fold is None:
        raise MedsegError("--folds and --split choose how cases are split; name the fold to train with --fold k")
    if folds is not None and split is not None:
        raise MedsegError("--split names the folds; leave out --folds")
    overrides += [f"data.{k}={json.dumps(v)}" for k, v in (("fold", fold), ("folds", folds), ("split_file", split)) if v is not None]
    if resume:
        if bundle is not None:
            raise MedsegError("--resume continues the run's own bundle; leave out BUNDLE and change keys with --set")
        if run_dir is None:
            raise MedsegError("--resume needs --run-dir DIR")
        from medseg.engine.train import load_bundle_for_resume

        cfg = load_bundle_for_resume(run_dir, overrides)
    else:
        if bundle is None:
            raise MedsegError("name a bundle, e.g. medseg train bundles/swin_unetr.json")
        cfg = load_bundle(bundle, overrides)
    if nproc is not None and nproc > 1 and not resume and run_dir is not None and (Path(run_dir) / "run.json").exists():
        raise MedsegError(f"{run_dir} already holds a run; choose another --run-dir, or continue it with --resume")
    if nproc is not None and nproc > 1:  # the bundle and options are checked; torchrun starts the ranks, each runs this command
        from medseg.engine.distributed import launch_torchrun

        args = ["train", *([str(bundle)] if bundle is not None else []), *[a for o in (set_ or []) for a in ("--set", o)],
                *(["--run-dir", str(run_dir)] if run_dir is not None else []), "--runs-root", str(runs_root), "--device", device,
                "--tracking", tracking, "--progress", "off" if no_progress else progress, *(["--resume"] if resume else []),
                *(["--fold", str(fold)] if fold is not None else []), *(["--folds", str(folds)] if folds is not None else []),
                *(["--split", str(split)] if split is not None else [])]
        raise typer.Exit(launch_torchrun(nproc, args))
    speaks = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 speaks for the training

    import signal

    from medseg.engine.train import StopFlag, Stopped
    from medseg.engine.train import train as run_training

    stop = StopFlag()
    _stop_on_signals(stop)
    try:
        result = run_training(cfg, run_dir=run_dir, runs_root=runs_root, device=device, resume=resume,
                              console=err, progress="off" if no_progress else progress, stop=stop)
    except KeyboardInterrupt:
        if speaks:
            err.print("[yellow]interrupted[/yellow]" + ("" if stop.armed else " before training started; no run was written or changed"))
        raise typer.Exit(143 if stop.signal == signal.SIGTERM else 130) from None
    except Stopped as e:
        if speaks:
            err.print(f"[yellow]stopped[/yellow] in epoch {e.epoch} after iteration {e.iteration}; checkpoint written. Continue with:\n"
                      f"  medseg train --resume --run-dir {e.run_dir}" + (f" --nproc {os.environ['WORLD_SIZE']}" if "WORLD_SIZE" in os.environ
                                                                           else ""), highlight=False, soft_wrap=True)
        raise typer.Exit(143 if e.signum == signal.SIGTERM else 130) from None
    if speaks:
        _print_result(result)


def _stop_on_signals(stop) -> None:
    """SIGTERM (a `kill`, a scheduler's time limit) and the first Ctrl-C ask training to stop at the next
    step and checkpoint; a second Ctrl-C interrupts at once."""
    import os
    import signal

    def handler(signum, frame):
        if not stop.armed or (stop.requested and signum == signal.SIGINT):
            stop.signal = stop.signal or signum
            raise KeyboardInterrupt
        stop.request(signum)
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
            err.print("[yellow]stopping after this step (Ctrl-C again to abort without a checkpoint)[/yellow]")

    try:
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread (e.g. a notebook's worker): leave it alone
        pass


def _print_result(result) -> None:
    from rich.table import Table

    last = next((row for row in reversed(result.history) if "val_mean_dice" in row), {})
    out.print(f"[bold]{result.name}[/bold]")
    table = Table(show_header=True)
    table.add_column("class")
    table.add_column("val Dice (last epoch)", justify="right")
    for key, value in last.items():
        if key.startswith("val_dice_"):
            table.add_row(key.removeprefix("val_dice_"), f"{value:.3f}")
    if last:
        table.add_row("[bold]mean[/bold]", f"[bold]{last['val_mean_dice']:.3f}[/bold]")
    print_table(table)
    out.print(f"best mean Dice {result.best_dice:.3f} at epoch {result.best_epoch}; run directory: {escape(str(result.run_dir))}",
              soft_wrap=True, highlight=False)


@app.command()
@user_errors
def infer(
    input_arg: Annotated[str, typer.Argument(metavar="INPUT", help="NIfTI file, DICOM series folder, folder of NIfTI files, or a "
                                               "dataset folder (imagesTr/ and imagesTs/, or image.nii.gz: only images are segmented).")],
    output_arg: Annotated[str | None, typer.Option("-o", "--output", metavar="PATH",
                                                   help="Output label map (one scan) or folder (a folder input).")] = None,
    run: Annotated[list[Path] | None, typer.Option("--run", metavar="DIR", help="Run directory; default: the newest complete run under "
                                                    "./runs. Repeat it, or name a folder of runs (e.g. a model's folds), for an ensemble: "
                                                    "the mean of their probabilities.")] = None,
    checkpoint: Annotated[str, typer.Option("--checkpoint", metavar="best|last",
                                            help="best (best validation Dice) or last (the latest checkpoint).")] = "best",
    device: DeviceOpt = "auto",
    overlap: Annotated[float | None, typer.Option("--overlap", help="Window overlap (default: the bundle's).")] = None,
    sw_batch_size: Annotated[int | None, typer.Option("--sw-batch-size", help="Windows per forward pass.")] = None,
    tta: Annotated[bool, typer.Option("--tta", metavar="", help="Average over mirrored inputs (8 flips).")] = False,
    save_probabilities: Annotated[bool, typer.Option("--save-probabilities", metavar="",
                                                     help="Also write a 4D probability map (uint8, 255 = 1).")] = False,
    preview: Annotated[bool, typer.Option("--preview", metavar="", help="Also write an axial/coronal/sagittal overlay PNG.")] = False,
    classes: Annotated[list[str] | None, typer.Option("--classes", metavar="NAME", help="Keep only this class (repeatable).")] = None,
    window: Annotated[str, typer.Option("--window", metavar="auto|monai|stream",
                                        help="Sliding window: auto, monai or stream (memory-bounded).")] = "auto",
    resample: Annotated[str, typer.Option("--resample", metavar="auto|linear|nearest",
                                          help="Back to the scan's grid: linear (probabilities, then argmax), nearest (labels; least "
                                          "memory) or auto (linear unless its buffer would be large).")] = "auto",
    series: Annotated[str | None, typer.Option("--series", metavar="UID", help="DICOM series to read from a folder holding several.")] = None,
    output_type: Annotated[str, typer.Option("--output-type", metavar="nifti|dicom-seg",
                                             help="nifti (a label map) or dicom-seg (DICOM folder inputs: a DICOM Segmentation "
                                             "referencing the series, X_seg.dcm, instead of the NIfTI).")] = "nifti",
    force: Annotated[bool, typer.Option("--force", metavar="", help="Overwrite existing outputs (never the input).")] = False,
    no_postprocess: Annotated[bool, typer.Option("--no-postprocess", metavar="",
                                                 help="Skip postprocess.largest_component (the raw argmax).")] = False,
    nproc: Annotated[int | None, typer.Option("--nproc", min=1, metavar="N", help="A folder input: N worker processes on this machine "
                                              "(one per GPU if there are GPUs), each a share of the cases.")] = None,
    part: Annotated[str | None, typer.Option("--part", metavar="i/n", help="A folder input: segment only worker i's share of n "
                                             "(0 <= i < n), e.g. a SLURM array task's; under torchrun: RANK/WORLD_SIZE.")] = None,
) -> None:
    """Segment a CT scan (or a folder of scans); the label map keeps the scan's own geometry.

    A folder (a cohort) is resumable: a case whose outputs are complete for this run and these
    settings is skipped, so a re-run after a kill does what is left; with -o, OUT/summary.csv and
    .json list every case (done, failed, pending; seconds; organ volumes). A case that cannot be
    segmented is reported and skipped; the exit status is then 1."""
    import os

    from rich.markup import escape

    from medseg.cli_common import check_choice, path_arg
    from medseg.engine import cohort as co
    from medseg.engine.infer import Predictor, check_output_type, check_outputs, plan_inputs, wanted_outputs

    input_path, output = path_arg(input_arg, "INPUT"), path_arg(output_arg, "-o")

    check_choice("--checkpoint", checkpoint, ("best", "last"))
    check_choice("--window", window, ("auto", "monai", "stream"))
    check_choice("--resample", resample, ("auto", "linear", "nearest"))
    share = co.parse_part(part) if part is not None else co.torchrun_part()
    if (nproc or 1) > 1 and share is not None:
        raise MedsegError("--nproc starts its own workers, each with its --part: give one or the other (and not --nproc under torchrun)")
    plan = plan_inputs(input_path, output)
    check_output_type(plan.cases, output_type)
    if (nproc or 1) > 1 or share is not None:
        if not plan.batch or output is None:
            raise MedsegError("--nproc, --part and torchrun share out the scans of a folder: give a folder input and an output folder (-o)")
        if share is not None and not run:
            raise MedsegError("name the run(s) with --run: every worker must use the same model, not each the newest under ./runs")
    # before any work: no output is an input; for one scan, no output exists (a cohort decides case by case)
    check_outputs(plan, wanted_outputs(save_probabilities, preview, output_type), force or plan.batch)
    if (nproc or 1) > 1:
        opts = {"run": run, "checkpoint": checkpoint, "device": device, "window": window, "resample": resample, "output_type": output_type,
                "overlap": overlap, "sw_batch_size": sw_batch_size, "classes": classes, "series": series, "tta": tta, "force": force,
                "save_probabilities": save_probabilities, "preview": preview, "no_postprocess": no_postprocess}
        raise typer.Exit(_infer_workers(nproc, plan, input_path, output, opts))
    if share is not None and device in ("auto", "cuda") and "LOCAL_RANK" in os.environ:
        import torch

        if torch.cuda.is_available():  # under torchrun: this rank's GPU
            device = f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"
    mine = co.my_cases(plan.cases, share)
    predictor = Predictor(run, device=device, overlap=overlap, sw_batch_size=sw_batch_size, tta=tta, method=window,
                          checkpoint=checkpoint, resample=resample, postprocess=not no_postprocess)
    predictor.class_subset(classes)  # an unknown name fails before the first case
    names = ", ".join(list(predictor.names.values())[1:])
    if len(predictor.runs) > 1:
        err.print(f"ensemble of {len(predictor.runs)} runs: {', '.join(r.name for r in predictor.runs)} ({names})", soft_wrap=True, highlight=False)
    else:
        err.print(f"using run {predictor.run_dir} ({predictor.bundle.model.name}; {names})", soft_wrap=True, highlight=False)
    if share is not None:
        err.print(f"worker {share[0]} of {share[1]}: {len(mine)} of the {len(plan.cases)} scans", highlight=False)
    for note in predictor.notes:
        err.print(f"[yellow]note:[/yellow] {escape(note)}", soft_wrap=True, highlight=False)
    for r in predictor.runs:
        if r.status != "complete":
            err.print(f"[yellow]note:[/yellow] run {r.name} is {r.status}, not complete; using its {checkpoint} checkpoint",
                      soft_wrap=True, highlight=False)
    with _InferUI(len(mine), plan.batch) as ui:
        result = co.segment_share(predictor, plan, mine, ui, worker=f"{share[0]}/{share[1]}" if share else "0/1", output=output,
                                  output_type=output_type, classes=classes, force=force, save_probabilities=save_probabilities,
                                  preview=preview, series=series)
    if plan.batch:
        line = (f"{result.segmented} of {len(mine)} scans segmented" + (f", {result.skipped} done earlier" if result.skipped else "")
                + (f", {result.busy} being segmented by another process" if result.busy else "")
                + (f"; failed: {', '.join(result.failed)}" if result.failed else ""))
        if output is not None:
            left = sum(r["status"] == "pending" for r in co.read_summary(output).values())
            line += f" (summary: {output / co.SUMMARY[1]}" + (f"; {left} pending in other workers' shares" if left else "") + ")"
        out.print(escape(line), soft_wrap=True, highlight=False)
        if result.failed and co.torchrun_part() is None:
            raise typer.Exit(1)  # under torchrun a failed rank would stop the others: the failures are in the summary


def _infer_workers(nproc: int, plan, input_path: Path, output: Path, o: dict) -> int:
    """``medseg infer --nproc N``: the runs and classes checked here once (every worker gets the
    same runs, named), then N workers; their summary tells the outcome."""
    from rich.markup import escape

    from medseg.engine import cohort as co
    from medseg.engine.infer import resolve_runs

    notes: list[str] = []
    runs = resolve_runs(o["run"], notes=notes)
    known = set(runs[0].labels.values()) - {"background"}
    unknown = [c for c in (o["classes"] or []) if c not in known]
    if unknown:
        raise MedsegError(f"--classes: {', '.join(unknown)} not in this run's classes ({', '.join(sorted(known))})")
    args = [str(input_path), "-o", str(output), *[a for r in runs for a in ("--run", str(r.path))], "--checkpoint", o["checkpoint"],
            "--device", o["device"], "--window", o["window"], "--resample", o["resample"], "--output-type", o["output_type"],
            *(["--overlap", str(o["overlap"])] if o["overlap"] is not None else []),
            *(["--sw-batch-size", str(o["sw_batch_size"])] if o["sw_batch_size"] is not None else []),
            *[a for c in (o["classes"] or []) for a in ("--classes", c)], *(["--series", o["series"]] if o["series"] else []),
            *[flag for flag, key in (("--tta", "tta"), ("--save-probabilities", "save_probabilities"), ("--preview", "preview"),
                                     ("--force", "force"), ("--no-postprocess", "no_postprocess")) if o[key]]]
    code = co.launch_workers(nproc, args, o["device"])
    rows = co.read_summary(output)
    done = sum(rows.get(name, {}).get("status") == "done" for name in _case_names(plan))
    failed = [p.name for p, n in zip((p for p, _ in plan.cases), _case_names(plan)) if rows.get(n, {}).get("status") == "failed"]
    out.print(escape(f"{done} of {len(plan.cases)} scans done" + (f"; failed: {', '.join(failed)}" if failed else "")
                     + f" (summary: {output / co.SUMMARY[1]})"), soft_wrap=True, highlight=False)
    if code in (130, 143):
        err.print("[yellow]interrupted[/yellow]; the same command continues (finished cases are skipped)", highlight=False)
        return code
    return 1 if code or failed or done < len(plan.cases) else 0


def _case_names(plan) -> list[str]:
    from medseg.engine.infer import batch_name

    return [batch_name(p) for p, _ in plan.cases]


class _InferUI:
    """``medseg infer``'s view of a share: a cases bar and a windows bar per scan (rich on a
    terminal), a line per case on stdout, notes and errors on stderr."""

    def __init__(self, n: int, batch: bool) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        # bars on a terminal only: in a log (or a --nproc worker's pipe) the lines per case say it all
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err,
                            disable=not err.is_terminal)
        self.cases = self.bar.add_task("cases", total=n, visible=batch)
        self.windows = None

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def started(self, path: Path):
        self.windows = self.bar.add_task(escape(path.name), total=None)
        return lambda i, n, t=self.windows: self.bar.update(t, completed=i, total=n)

    def ended(self, path: Path) -> None:
        self.bar.remove_task(self.windows)
        self.bar.advance(self.cases)

    def skipped(self, path: Path, status) -> None:
        self.bar.advance(self.cases)
        out.print(escape(f"{path.name}: done earlier ({status.output})"), soft_wrap=True, highlight=False)

    def failed(self, path: Path, message: str) -> None:
        err.print(f"[bold red]error:[/bold red] {escape(message)}", soft_wrap=True, highlight=False)

    def busy(self, path: Path, message: str) -> None:
        err.print(f"[yellow]note:[/yellow] {escape(message)}: left to it", soft_wrap=True, highlight=False)

    def segmented(self, path: Path, result: dict) -> None:
        for note in result["notes"]:
            err.print(f"[yellow]note:[/yellow] {escape(note)}", soft_wrap=True, highlight=False)
        seg = result["segmentation"]
        volumes = ", ".join(f"{k} {v:.0f} ml" for k, v in seg.volume_ml.items())
        written = result["paths"].get("labels") or result["paths"]["dicom_seg"]
        line = f"{path.name} -> {written}  ({seg.method} window, {seg.resample}, {seg.seconds:.1f} s)  {volumes}"
        out.print(escape(line), soft_wrap=True, highlight=False)


@app.command()
@user_errors
def evaluate(
    pred_arg: Annotated[str, typer.Argument(metavar="PRED", help="Predicted label map, or a folder of them (X_seg.nii.gz matches X.nii.gz).")],
    gt_arg: Annotated[str, typer.Argument(metavar="GT", help="Ground-truth label map, or a folder of them (a Decathlon folder: its labelsTr/).")],
    pred_labels: Annotated[Path | None, typer.Option("--pred-labels", help="JSON value -> name for PRED (default: its sidecar X_seg.json).")] = None,
    gt_labels: Annotated[Path | None, typer.Option(
        "--gt-labels", help="JSON value -> name (or a dataset.json) for GT (default: a Decathlon folder's dataset.json).")] = None,
    nsd_tolerance: Annotated[float, typer.Option("--nsd-tolerance", min=0.0, help="Normalised surface Dice tolerance in mm.")] = 2.0,
    output_arg: Annotated[str | None, typer.Option("-o", "--output", metavar="PREFIX",
                                                   help="Prefix for .csv and .json (default: beside PRED).")] = None,
) -> None:
    """Per-class Dice, IoU, precision, recall, accuracy, HD95 (mm) and NSD, classes matched by name; printed and written as CSV/JSON."""
    from rich.markup import escape
    from rich.table import Table

    from medseg.cli_common import path_arg
    from medseg.engine.evaluate import METRICS, check_writable, report_prefix, write_report
    from medseg.engine.evaluate import evaluate as run_evaluate

    pred, gt, output = path_arg(pred_arg, "PRED"), path_arg(gt_arg, "GT"), path_arg(output_arg, "-o")

    prefix = report_prefix(pred, output)
    check_writable(prefix)
    report = run_evaluate(pred, gt, pred_labels=pred_labels, gt_labels=gt_labels, nsd_tolerance=nsd_tolerance)
    for note in report.notes:
        err.print(f"[yellow]note:[/yellow] {escape(note)}", highlight=False, soft_wrap=True)
    table = Table(title=f"{len(report.cases)} case(s), mean over cases; NSD at {nsd_tolerance:g} mm")
    table.add_column("class")
    for m in METRICS:
        table.add_column(m, justify="right")

    def fmt(v: float) -> str:
        return "-" if v != v else f"{v:.3f}"  # NaN: not defined for this class

    for name, values in report.mean.items():
        table.add_row(escape(name), *(fmt(values[m]) for m in METRICS))
    s = report.summary
    table.add_row("[bold]mean (foreground)[/bold]", *(fmt(s[f"mean_{m}"]) for m in METRICS))
    table.add_row("mean (with background)", *(fmt(s[f"mean_{m}_with_background"]) for m in METRICS))
    print_table(table)
    csv_path, json_path = write_report(report, prefix)
    out.print(escape(f"wrote {csv_path} and {json_path}"), soft_wrap=True, highlight=False)


@app.command()
@user_errors
def plan(
    data: Annotated[str | None, typer.Argument(help="A data folder, a dataset.json or 'phantom' (default: the bundle's data.source).")] = None,
    bundle: Annotated[Path | None, typer.Option("--bundle", "-b", help="Plan this bundle's \"auto\" fields (default: every planned "
                                                "field on auto, \"ct\" normalisation, Swin UNETR).")] = None,
    set_: SetOpt = None,
    budget: Annotated[str | None, typer.Option("--budget", help="Memory a training step may use, e.g. 24GB (default: plan.budget).")] = None,
    device: DeviceOpt = "auto",
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write the plan and the planned bundle as JSON; `medseg train FILE` trains that bundle.")] = None,
    force: Annotated[bool, typer.Option("--force", metavar="", help="Replace an existing --output file.")] = False,
) -> None:
    """Fingerprint a dataset and plan spacing, normalisation, ROI and batch size (what `medseg train`
    does for a bundle's fields left on "auto"), without training."""
    import json
    import os

    from rich.markup import escape

    from medseg.config import bundle_from_dict, load_bundle
    from medseg.data.datasets import prepare
    from medseg.engine.device import resolve_device
    from medseg.engine.train import print_plan, resolve_paths
    from medseg.models import check_before_data, check_window
    from medseg.plan import apply_plan, fingerprint, make_plan

    overrides = list(set_ or [])
    if data is not None:
        overrides.append(f"data.source={path_arg(data, 'DATA') if data != 'phantom' else 'phantom'}")
    if budget is not None:
        overrides.append(f"plan.budget={budget}")
    if bundle is not None:
        cfg = load_bundle(bundle, overrides)
    else:
        base = {"data": {"spacing": "auto", "normalization": "ct"}, "train": {"roi": "auto", "batch_size": "auto"}}
        cfg = bundle_from_dict(base, overrides)
    if output is not None:
        if not str(output).strip() or output.is_dir():
            raise MedsegError(f"-o {output}: give a file name for the plan JSON, not a folder")
        if output.exists() and not force:
            raise MedsegError(f"{output} exists; use --force to replace it")
        if output.suffix != ".json":
            raise MedsegError(f"-o {output}: the plan is JSON; give a name ending in .json")
        parent = next((p for p in output.resolve().parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise MedsegError(f"-o {output}: {parent} is a file, not a folder")
        if parent is not None and not os.access(parent, os.W_OK):
            raise MedsegError(f"-o {output}: cannot write to {parent} (permission denied or read-only file system)")
    check_before_data(cfg.model.name, cfg.model.args, cfg.train.head_lr_scale, cfg.train.roi, cfg.infer_roi)
    dev = resolve_device(device)
    found, lut, train_cases, _, notes = prepare(cfg.data, cfg.data.labels)
    for note in notes:
        err.print(f"[yellow]note:[/yellow] {note}", highlight=False, soft_wrap=True)
    fp = fingerprint(train_cases, lut, cfg.data.labels, root=found.root)
    result = make_plan(fp, cfg, str(dev))
    print_plan(out, result, fp)
    if output is not None:
        from medseg.data.io import publish, temporary_beside

        planned = resolve_paths(apply_plan(cfg, result))  # absolute data paths: trainable from any folder
        check_window(planned.model.name, planned.train.roi, planned.infer_roi)
        text = json.dumps({"plan": result.as_dict(), "bundle": planned.to_dict()}, indent=2) + "\n"
        try:
            tmp = temporary_beside(output, ".tmp")
            Path(tmp).write_text(text)
            try:
                publish(tmp, output, force)
            finally:
                Path(tmp).unlink(missing_ok=True)
        except FileExistsError:
            raise MedsegError(f"{output} appeared while planning (another medseg plan?); use --force to replace it") from None
        except OSError as e:
            raise MedsegError(f"cannot write {output}: {e.strerror or e}") from None
        out.print(f"wrote {escape(str(output))}", soft_wrap=True, highlight=False)


@app.command()
@user_errors
def synth(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write imagesTr/, labelsTr/ and dataset.json into.")],
    cases: Annotated[int, typer.Option("--cases", "-n", min=1, help="Number of cases.")] = 8,
    seed: Annotated[int, typer.Option("--seed", help="Phantom stream seed.")] = 0,
) -> None:
    """Write synthetic CT phantom cases (NIfTI image + label map) in Decathlon layout."""
    from rich.progress import Progress

    from medseg.data.phantom import write_phantom

    with Progress(console=err) as bar:
        task = bar.add_task("phantom cases", total=cases)
        write_phantom(out_dir, cases, seed, progress=lambda i, n: bar.update(task, completed=i))
    out.print(escape(f"wrote {cases} phantom cases to {out_dir}"), soft_wrap=True, highlight=False)


@app.command()
@user_errors
def models() -> None:
    """List the registered models (parameters counted at a 96^3 ROI with 5 output classes)."""
    from rich.table import Table

    from medseg.models import create_model, get_spec, list_models

    table = Table(show_header=True)
    for col in ("name", "display", "parameters", "ROI multiple / minimum", "description"):
        table.add_column(col, justify="right" if col == "parameters" else "left")
    for name in list_models():
        spec = get_spec(name)
        roi = (96, 96, 1) if spec.axial_slices else (96, 96, 96)
        # Built on the CPU: Swin UNETR's constructor calls .item(), which the meta device refuses.
        n = sum(p.numel() for p in create_model(name, out_channels=5, roi=roi).parameters())
        constraint = f"{list(spec.roi_multiple)} / {list(spec.min_roi)}"
        table.add_row(name, spec.display, f"{n / 1e6:.1f} M", constraint, spec.description)
    print_table(table)


from medseg import cli_compare, cli_cost, cli_export  # noqa: E402,F401  (registers compare, flops, memory and export)

if __name__ == "__main__":
    app()
