"""What the CLI modules share: the Typer app, consoles, options used by several commands, and the
decorator that turns a user error into one line and exit status 2."""

from __future__ import annotations

import functools
from typing import Annotated

import typer
from rich.console import Console

from medseg.errors import MedsegError, check_choice  # noqa: F401  (check_choice: the commands import it from here)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="3D CT organ segmentation: train V-Net, UNETR, Swin UNETR and a 2D FCN from JSON bundles.")
out = Console()
err = Console(stderr=True)

# Options shared between commands (fastapi-cli style).
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", metavar="KEY=VALUE",
                                                  help="Override a bundle key, e.g. train.epochs=2 (repeatable; JSON values parsed).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
TrackingOpt = Annotated[str, typer.Option("--tracking", help="mlflow (default) or none.")]
FoldsOpt = Annotated[int | None, typer.Option("--folds", metavar="K", help="K-fold cross-validation: the number of folds (default 5, "
                                              "as nnU-Net; data.folds).")]
SplitOpt = Annotated[str | None, typer.Option("--split", metavar="FILE", help="Split file: a JSON list of {\"train\": [...], "
                                              "\"val\": [...]} by case name (nnU-Net's splits_final.json; data.split_file).")]


def _one_line_usage_error(e) -> None:
    """Typer draws a usage error (unknown option, bad value) as a multi-line panel; medseg's rule is
    one line for anything a user got wrong. Installed below in place of typer's formatter."""
    if e.__class__.__name__ == "NoArgsIsHelpError":  # `medseg train` with nothing: the help was shown
        return
    from rich.markup import escape

    ctx = getattr(e, "ctx", None)
    hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
    err.print(f"[bold red]error:[/bold red] {escape(e.format_message())}{escape(hint)}", highlight=False, soft_wrap=True)


def _install_one_line_usage_errors() -> None:
    from typer import rich_utils

    rich_utils.rich_format_error = _one_line_usage_error


_install_one_line_usage_errors()


def _quiet_optional_codecs() -> None:
    """MONAI announces, on every import, that NVIDIA's optional GPU JPEG codec for DICOM is absent
    (a log line and a warning). medseg reads DICOM with pydicom/SimpleITK; the lines only bury the
    command's own output, so the CLI silences that one message."""
    import logging
    import warnings

    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")


_quiet_optional_codecs()


def print_table(table) -> None:
    """A rich table on stdout, as wide as it needs in a pipe or a file (see ``print_wide``)."""
    from medseg.engine.progress import print_wide

    print_wide(out, table)


def path_arg(text: str | None, what: str):
    """A path typed by the user; an empty one (an unset ``$SCAN``) is an error, not the current folder."""
    from pathlib import Path

    if text is None:
        return None
    if not text.strip():
        raise MedsegError(f"{what} is empty (an unset shell variable?); give a path")
    return Path(text)


def user_errors(fn):
    """Turn a MedsegError into one red line and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MedsegError as e:
            import os

            from rich.markup import escape

            if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
                err.print(f"[bold red]error:[/bold red] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/yellow]")
            raise typer.Exit(130) from None

    return wrapper
