"""Training progress: rich bars on a terminal, plain lines when stderr is a file or a pipe.

On a terminal: one bar over all iterations (epoch, loss, last validation Dice, elapsed, ETA) and a
bar over validation cases. Elsewhere (a batch job's log, CI, ``| tee``): a line at the end of every
epoch, a line when validation starts, and a line at most every ``interval`` seconds in between,
each saying what, how far, and the ETA.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def print_wide(console: Console, table) -> None:
    """Print a rich table; in a pipe or a file (80 columns by default) as wide as it needs, so class
    names and paths are not cut to ``kidney_ri…`` in a log."""
    if console.is_terminal:
        console.print(table)
    else:
        Console(file=console.file, width=240).print(table)


def _clock(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class TrainProgress:
    """``mode``: "rich", "plain" or "off" ("auto" picks rich on a terminal, else plain)."""

    def __init__(self, console: Console, epochs: int, iters: int, val_cases: int, mode: str = "auto",
                 first_epoch: int = 1, first_iteration: int = 0, interval: float = 30.0,
                 done: int | None = None, total: int | None = None) -> None:
        """``iters``: steps per epoch (the caller sets ``.iters`` when an epoch is shorter); ``done`` /
        ``total``: optimiser steps before this process and at the end (default: from epochs x iters)."""
        if mode == "auto":
            mode = "rich" if console.is_terminal else "plain"
        self.mode, self.console = mode, console
        self.epochs, self.iters, self.val_cases, self.interval = epochs, iters, val_cases, interval
        self.dice = "-"
        self.done = (first_epoch - 1) * iters + first_iteration if done is None else done  # steps before this process
        self.total = epochs * iters if total is None else total
        self.start_done = self.done
        self.t0 = self.last_line = time.time()
        self.progress = None
        if mode == "rich":
            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                console=console, transient=False,
            )
            self.train_task = self.progress.add_task(f"epoch {first_epoch}/{epochs}", total=self.total, completed=self.done,
                                                     status="")
            self.val_task = None

    def __enter__(self):
        if self.progress is not None:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            return self.progress.__exit__(*exc)
        return False

    def _eta(self) -> str:
        rate = (self.done - self.start_done) / max(time.time() - self.t0, 1e-9)
        left = max(0, self.total - self.done)
        return _clock(left / rate) if rate > 0 else "?"

    def _line(self, text: str) -> None:
        self.last_line = time.time()
        self.console.print(escape(f"{text}  elapsed {_clock(time.time() - self.t0)}  ETA {self._eta()}"),
                           highlight=False, soft_wrap=True)

    def advance_train(self, epoch: int, iteration: int, loss: float) -> None:
        self.done += 1
        if self.mode == "rich":
            self.progress.update(self.train_task, advance=1, description=f"epoch {epoch}/{self.epochs}",
                                 status=f"loss {loss:.4f}  val dice {self.dice}")
        elif self.mode == "plain" and time.time() - self.last_line >= self.interval and iteration < self.iters:
            self._line(f"epoch {epoch}/{self.epochs}  iteration {iteration}/{self.iters}  loss {loss:.4f}")

    def start_validation(self, epoch: int) -> None:
        if self.mode == "plain":
            self._line(f"epoch {epoch}/{self.epochs}  validating {self.val_cases} case(s)")

    def advance_val(self, case: int, total: int | None = None) -> None:
        if self.mode != "rich":
            return
        if self.val_task is None:
            self.val_task = self.progress.add_task("validation", total=self.val_cases, status="")
        self.progress.update(self.val_task, completed=case)

    def end_epoch(self, epoch: int, row: dict) -> None:
        if "val_mean_dice" in row:
            self.dice = f"{row['val_mean_dice']:.3f}"
        if self.mode == "rich":
            if self.val_task is not None:
                self.progress.remove_task(self.val_task)
                self.val_task = None
            self.progress.update(self.train_task, status=f"loss {row['train_loss']:.4f}  val dice {self.dice}")
        elif self.mode == "plain":
            self._line(f"epoch {epoch}/{self.epochs}  done  loss {row['train_loss']:.4f}  val dice {self.dice}  "
                       f"lr {row['lr']:.2e}  {row['epoch_seconds']:.1f} s")

    def note(self, text: str) -> None:
        if self.mode != "off":
            self.console.print(escape(text), highlight=False, soft_wrap=True)
