"""``medseg export``: a trained run as ONNX, TorchScript or a MONAI bundle (medseg/export/)."""

from __future__ import annotations

from typing import Annotated

import typer

from medseg.cli_common import app, err, out, path_arg, user_errors


@app.command()
@user_errors
def export(
    run: Annotated[str, typer.Argument(metavar="RUN", help="Run directory written by medseg train.")],
    fmt: Annotated[str, typer.Option("--format", "-f", metavar="onnx|torchscript|monai-bundle",
                                     help="onnx (model.onnx, checked with onnxruntime), torchscript (model.torchscript.pt) or "
                                          "monai-bundle (configs/inference.json reproduces medseg infer).")],
    output: Annotated[str, typer.Option("-o", "--output", metavar="DIR", help="New folder for the export.")],
    checkpoint: Annotated[str, typer.Option("--checkpoint", metavar="best|last",
                                            help="best (best validation Dice) or last (the latest checkpoint).")] = "best",
    force: Annotated[bool, typer.Option("--force", metavar="", help="Replace an earlier export in DIR.")] = False,
) -> None:
    """Export a trained run: the network (one sliding window, batch axis free) with export.json (classes, input spec,
    intensity map, window, parity) and README.txt; the export checks itself against PyTorch before it is written."""
    from rich.markup import escape

    from medseg.cli_common import check_choice
    from medseg.export import CHECKPOINTS, FORMATS, check_export, export_run

    check_choice("--format", fmt, FORMATS)
    check_choice("--checkpoint", checkpoint, CHECKPOINTS)
    run_dir, out_dir = path_arg(run, "RUN"), path_arg(output, "-o")
    check_export(run_dir, fmt, out_dir, checkpoint=checkpoint, force=force)  # bad input: one line, before the announcement
    err.print(f"exporting {escape(str(run_dir))} ({checkpoint} checkpoint) as {fmt} ...", highlight=False, soft_wrap=True)
    import signal

    def interrupt(signum, frame):  # SIGTERM as Ctrl-C: the staging folder is removed on the way out
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread
        pass
    result = export_run(run_dir, fmt, out_dir, checkpoint=checkpoint, force=force)
    for note in result.notes:
        err.print(f"[yellow]note:[/yellow] {escape(note)}", highlight=False, soft_wrap=True)
    p = result.parity
    out.print(escape(f"parity: max |logit difference| {p['max_abs_diff']:.3g}, argmax agreement {p['argmax_agreement']:.4%} "
                     f"on {p['windows']} random windows ({p['runtime']} vs PyTorch)"), highlight=False, soft_wrap=True)
    out.print(escape(f"wrote {result.path}/: {', '.join(result.files)} ({result.seconds:.1f} s)"), highlight=False, soft_wrap=True)
    if fmt == "monai-bundle":
        out.print(escape(f"run it: {result.info['bundle_command']}"), highlight=False, soft_wrap=True)
