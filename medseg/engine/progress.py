"""Rich progress bars for training: one bar over all iterations with epoch, loss and the last
validation Dice, and a bar over validation cases."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    def __init__(self, console: Console, epochs: int, iters: int, val_cases: int, enabled: bool = True,
                 first_epoch: int = 1) -> None:
        self.enabled = enabled
        self.epochs, self.val_cases = epochs, val_cases
        self.dice = "-"
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=console, disable=not enabled, transient=False,
        )
        done = (first_epoch - 1) * iters
        self.train_task = self.progress.add_task(f"epoch {first_epoch}/{epochs}", total=epochs * iters, completed=done, status="")
        self.val_task = None

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def advance_train(self, epoch: int, loss: float) -> None:
        self.progress.update(self.train_task, advance=1, description=f"epoch {epoch}/{self.epochs}",
                             status=f"loss {loss:.4f}  val dice {self.dice}")

    def advance_val(self, case: int) -> None:
        if self.val_task is None:
            self.val_task = self.progress.add_task("validation", total=self.val_cases, status="")
        self.progress.update(self.val_task, completed=case)

    def show_dice(self, dice: float) -> None:
        self.dice = f"{dice:.3f}"
        if self.val_task is not None:
            self.progress.remove_task(self.val_task)
            self.val_task = None
