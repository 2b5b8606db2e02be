"""What the CLI modules share: the Typer app, consoles, options used by several commands, and the
decorator that turns a user error into one line and exit status 2."""

from __future__ import annotations

import functools
from typing import Annotated

import typer
from rich.console import Console

from medseg.errors import MedsegError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="3D CT organ segmentation: train V-Net, UNETR, Swin UNETR and a 2D FCN from JSON bundles.")
out = Console()
err = Console(stderr=True)

# Options shared between commands (fastapi-cli style).
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", metavar="KEY=VALUE",
                                                  help="Override a bundle key, e.g. train.epochs=2 (repeatable; JSON values parsed).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
TrackingOpt = Annotated[str, typer.Option("--tracking", help="mlflow (default) or none.")]


def user_errors(fn):
    """Turn a MedsegError into one red line and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MedsegError as e:
            from rich.markup import escape

            err.print(f"[bold red]error:[/bold red] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/yellow]")
            raise typer.Exit(130) from None

    return wrapper
