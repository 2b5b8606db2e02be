"""The ``medseg`` command line: parse, call the Python API with keywords, print with rich.

Heavy libraries are imported inside the commands, so ``medseg --help`` starts fast. Errors a user
can cause (:class:`~medseg.errors.MedsegError`) print as one line and exit with status 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medseg import __version__
from medseg.cli_common import DeviceOpt, SetOpt, TrackingOpt, app, err, out, user_errors
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
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --run-dir from its last checkpoint.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")] = True,
) -> None:
    """Train a model from a bundle; with no data named, on the built-in synthetic CT phantom."""
    from medseg.config import load_bundle

    if tracking not in ("mlflow", "none"):
        raise MedsegError(f"--tracking must be mlflow or none, got {tracking!r}")
    overrides = list(set_ or [])
    if tracking == "none":
        overrides.append("tracking.backend=none")
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

    from medseg.engine.train import train as run_training

    _sigterm_interrupts()
    result = run_training(cfg, run_dir=run_dir, runs_root=runs_root, device=device, resume=resume,
                          console=err, show_progress=progress)
    _print_result(result)


def _sigterm_interrupts() -> None:
    """A `kill` (or a scheduler's time limit) ends training like Ctrl-C, so run.json says interrupted."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, handler)
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
    out.print(table)
    out.print(f"best mean Dice {result.best_dice:.3f} at epoch {result.best_epoch}; run directory: {result.run_dir}")


@app.command()
@user_errors
def infer(
    input_path: Annotated[Path, typer.Argument(metavar="INPUT", help="NIfTI file, DICOM series folder, or folder of NIfTI files.")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Output label map (one input) or folder (batch).")] = None,
    run: Annotated[Path | None, typer.Option("--run", help="Run directory; default: the newest complete run under ./runs.")] = None,
    device: DeviceOpt = "auto",
    overlap: Annotated[float | None, typer.Option("--overlap", help="Window overlap (default: the bundle's).")] = None,
    sw_batch_size: Annotated[int | None, typer.Option("--sw-batch-size", help="Windows per forward pass.")] = None,
    tta: Annotated[bool, typer.Option("--tta", help="Average over mirrored inputs (8 flips).")] = False,
    save_probabilities: Annotated[bool, typer.Option("--save-probabilities", help="Also write a 4D probability map.")] = False,
    preview: Annotated[bool, typer.Option("--preview", help="Also write an axial/coronal/sagittal overlay PNG.")] = False,
    labels: Annotated[list[str] | None, typer.Option("--labels", help="Keep only these classes (repeatable).")] = None,
    window: Annotated[str, typer.Option("--window", help="Sliding window: auto, monai or stream (memory-bounded).")] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")] = False,
) -> None:
    """Segment a CT scan (or a folder of scans); the label map keeps the scan's own geometry."""
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from medseg.data.io import case_name
    from medseg.engine.infer import Predictor, list_inputs, output_paths, refuse_overwrite, segment_file, wanted_outputs

    if window not in ("auto", "monai", "stream"):
        raise MedsegError(f"--window must be auto, monai or stream, got {window!r}")
    inputs = list_inputs(input_path)
    batch = len(inputs) > 1 or (input_path.is_dir() and inputs[0] != input_path)
    if batch and output is not None and output.exists() and not output.is_dir():
        raise MedsegError(f"-o {output}: a folder input needs an output folder")
    targets = [(output / f"{case_name(p)}_seg.nii.gz" if batch else output) if output is not None else None for p in inputs]
    if not force:  # refuse before any work, not after the first case
        for path, target in zip(inputs, targets):
            refuse_overwrite(output_paths(path, target), wanted_outputs(save_probabilities, preview))
    predictor = Predictor(run, device=device, overlap=overlap, sw_batch_size=sw_batch_size, tta=tta, method=window)
    classes = ", ".join(list(predictor.names.values())[1:])
    err.print(f"using run {predictor.run_dir} ({predictor.bundle.model.name}; {classes})", soft_wrap=True, highlight=False)
    if predictor.info.get("status") != "complete":
        err.print(f"[yellow]note:[/yellow] this run is {predictor.info.get('status')}, not complete; using its {predictor.run_dir.name} "
                  "best checkpoint so far", soft_wrap=True, highlight=False)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err) as bar:
        cases = bar.add_task("cases", total=len(inputs), visible=batch)
        for path, target in zip(inputs, targets):
            windows = bar.add_task(escape(path.name), total=None)
            result = segment_file(predictor, path, target, force=force, save_probabilities=save_probabilities, preview=preview,
                                  labels=labels, on_window=lambda i, n, t=windows: bar.update(t, completed=i, total=n))
            bar.remove_task(windows)
            bar.advance(cases)
            seg = result["segmentation"]
            volumes = ", ".join(f"{k} {v:.0f} ml" for k, v in seg.volume_ml.items())
            line = f"{path.name} -> {result['paths']['labels']}  ({seg.method} window, {seg.seconds:.1f} s)  {volumes}"
            out.print(escape(line), soft_wrap=True, highlight=False)


@app.command()
@user_errors
def evaluate(
    pred: Annotated[Path, typer.Argument(help="Predicted label map, or a folder of them (X_seg.nii.gz matches X.nii.gz).")],
    gt: Annotated[Path, typer.Argument(help="Ground-truth label map, or a folder of them.")],
    labels: Annotated[Path | None, typer.Option("--labels", help="JSON value -> name (default: the prediction's sidecar).")] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Prefix for .csv and .json (default: beside PRED).")] = None,
) -> None:
    """Per-class Dice, IoU, precision, recall, accuracy and HD95 (mm), printed and written as CSV/JSON."""
    from rich.table import Table

    from medseg.data.io import case_name
    from medseg.engine.evaluate import METRICS, write_report
    from medseg.engine.evaluate import evaluate as run_evaluate

    report = run_evaluate(pred, gt, labels)
    table = Table(title=f"{len(report.cases)} case(s), mean over cases")
    table.add_column("class")
    for m in METRICS:
        table.add_column(m, justify="right")
    def fmt(v: float) -> str:
        return "-" if v != v else f"{v:.3f}"  # NaN: not defined for this class

    for name, values in report.mean.items():
        table.add_row(name, *(fmt(values[m]) for m in METRICS))
    s = report.summary
    table.add_row("[bold]mean (foreground)[/bold]", *(fmt(s[f"mean_{m}"]) for m in METRICS))
    table.add_row("mean (with background)", *(fmt(s[f"mean_{m}_with_background"]) for m in METRICS))
    out.print(table)
    prefix = output or (pred / "evaluation" if pred.is_dir() else pred.with_name(case_name(pred) + "_metrics"))
    csv_path, json_path = write_report(report, prefix)
    out.print(f"wrote {csv_path} and {json_path}", soft_wrap=True, highlight=False)


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
    out.print(f"wrote {cases} phantom cases to {out_dir}")


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
        roi = (96, 96, 1) if name == "fcn2d" else (96, 96, 96)
        # Built on the CPU: Swin UNETR's constructor calls .item(), which the meta device refuses.
        n = sum(p.numel() for p in create_model(name, out_channels=5, roi=roi).parameters())
        constraint = f"{list(spec.roi_multiple)} / {list(spec.min_roi)}"
        table.add_row(name, spec.display, f"{n / 1e6:.1f} M", constraint, spec.description)
    out.print(table)


from medseg import cli_cost  # noqa: E402,F401  (registers flops and memory)

if __name__ == "__main__":
    app()
