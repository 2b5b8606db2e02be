"""``medseg compare``: train and score several bundles under one protocol (medseg/compare/)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medseg.cli_common import DeviceOpt, FoldsOpt, SetOpt, SplitOpt, TrackingOpt, app, err, out, path_arg, print_table, user_errors


@app.command()
@user_errors
def compare(
    bundles: Annotated[list[Path], typer.Argument(metavar="BUNDLE...", help="Bundles to compare (e.g. bundles/fcn2d.json bundles/vnet.json).")],
    data: Annotated[str | None, typer.Option("--data", metavar="D", help="Data for every bundle (data.source); default: theirs, "
                                             "which must then agree.")] = None,
    folds: FoldsOpt = None,
    split: SplitOpt = None,
    iterations: Annotated[int | None, typer.Option("--iterations", metavar="N", help="Optimiser steps per model and fold.")] = None,
    minutes: Annotated[float | None, typer.Option("--minutes", metavar="M", help="Wall-clock minutes of optimiser steps per model "
                                                  "and fold (with --iterations: whichever comes first).")] = None,
    test: Annotated[str | None, typer.Option("--test", metavar="D", help="Train on every case of the data and score on this "
                                             "labelled data instead of cross-validating.")] = None,
    test_labels: Annotated[str | None, typer.Option("--test-labels", metavar="FILE", help="Class names of the --test label "
                                                    'values (JSON, e.g. {"1": "spleen"}).')] = None,
    output: Annotated[str, typer.Option("-o", "--output", metavar="DIR", help="Report folder (a re-run with the same protocol "
                                        "continues it).")] = "compare",
    allow_mixed: Annotated[bool, typer.Option("--allow-mixed", metavar="", help="Compare bundles that differ in classes, spacing "
                                              "or normalisation (the report says so).")] = False,
    set_: SetOpt = None,
    device: DeviceOpt = "auto",
    tracking: TrackingOpt = "mlflow",
    progress: Annotated[str, typer.Option("--progress", help="auto, rich, plain or off (each training's progress).")] = "auto",
) -> None:
    """Train and score every bundle under one protocol: same cases and folds, one preprocessing plan,
    one training budget, the same metric code; writes compare.md/.csv/.json and pictures."""
    from rich.markup import escape
    from rich.table import Table

    from medseg.cli_common import check_choice
    from medseg.compare import compare as run_compare

    check_choice("--tracking", tracking, ("mlflow", "none"))
    check_choice("--progress", progress, ("auto", "rich", "plain", "off"))
    from medseg.errors import MedsegError

    if test is not None and (folds is not None or split is not None):
        raise MedsegError("--test scores on a separate set: leave out --folds and --split")
    if folds is not None and split is not None:
        raise MedsegError("--split names the folds; leave out --folds")
    import signal

    from medseg.cli import _stop_on_signals
    from medseg.engine.train import StopFlag, Stopped

    stop = StopFlag()
    _stop_on_signals(stop)
    again = "re-run the same medseg compare command to continue: finished folds are reused"
    try:
        report = run_compare(bundles, output=path_arg(output, "-o"), data=data, folds=5 if folds is None else folds, split=split,
                             iterations=iterations, minutes=minutes, test=test, test_labels=test_labels, overrides=set_,
                             allow_mixed=allow_mixed, device=device, tracking=tracking, progress=progress, console=err, stop=stop)
    except KeyboardInterrupt:
        err.print(f"[yellow]interrupted[/yellow]; {again}", highlight=False, soft_wrap=True)
        raise typer.Exit(143 if stop.signal == signal.SIGTERM else 130) from None
    except Stopped as e:
        err.print(f"[yellow]stopped[/yellow] in epoch {e.epoch} after iteration {e.iteration} of {e.run_dir}; checkpoint written; "
                  f"{again} and this fold resumes", highlight=False, soft_wrap=True)
        raise typer.Exit(143 if e.signum == signal.SIGTERM else 130) from None
    table = Table(title="mean foreground scores, each scan's own geometry", title_justify="left")
    for col in ("model", "Dice", "IoU", "HD95 mm", "NSD", "params M", "GFLOPs/vol", "train min", "infer s"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for m in report["models"]:
        s = m["original"]["summary"]
        train = "-" if m["train_seconds"] is None else f"{m['train_seconds'] / 60:.1f}"
        table.add_row(escape(m["name"]), f"{s['mean_dice']:.3f}", f"{s['mean_iou']:.3f}", f"{s['mean_hd95_mm']:.1f}",
                      f"{s['mean_nsd']:.3f}", f"{m['parameters'] / 1e6:.2f}", f"{m['flops_per_volume'] / 1e9:,.0f}", train,
                      f"{m['infer_seconds_per_volume']:.2f}")
    print_table(table)
    out.print(escape(f"report: {Path(output) / 'compare.md'}"), soft_wrap=True, highlight=False)
