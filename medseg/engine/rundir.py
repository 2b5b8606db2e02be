"""The self-describing run directory (nnU-Net's model folder idea): weights travel with the resolved
bundle, the class names and the metrics, so inference needs nothing else.

    runs/<run name>/
      run.json          status (running | complete | failed), versions, model, best epoch and Dice
      bundle.json       the resolved bundle (every default filled in, paths absolute)
      labels.json       {"0": "background", "1": "liver", ...}
      model_best.pt     state_dict of the best validation epoch   (torch.load(weights_only=True))
      model_last.pt     state_dict after the last epoch
      checkpoint.pt     model + optimizer + scheduler + epoch, for --resume
      metrics.csv       one row per epoch
      model_summary.txt the module tree and parameter counts
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from medseg import RUN_FORMAT_VERSION, __version__
from medseg.data.io import write_text_atomic
from medseg.errors import MedsegError

RUN_FILE = "run.json"


def write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_run(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    path = run_dir / RUN_FILE
    if not path.is_file():
        raise MedsegError(f"{run_dir}: not a medseg run directory (no {RUN_FILE})")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise MedsegError(f"{path}: corrupt run file") from None
    if info.get("format_version") != RUN_FORMAT_VERSION:
        raise MedsegError(f"{run_dir}: run format {info.get('format_version')} is not supported by this medseg (needs {RUN_FORMAT_VERSION})")
    return info


def new_run_info(name: str, model: str, extra: dict[str, Any]) -> dict[str, Any]:
    return {"format_version": RUN_FORMAT_VERSION, "medseg_version": __version__, "name": name, "model": model,
            "status": "running", **extra}


def labels_json(labels: list[str]) -> dict[str, str]:
    return {"0": "background", **{str(i): n for i, n in enumerate(labels, start=1)}}


def append_metrics(path: Path, row: dict[str, Any]) -> None:
    """Append one epoch; the header is the union of the keys seen so far (validation columns appear
    on the first validated epoch), so the file is rewritten when a new column arrives."""
    rows: list[dict[str, Any]] = []
    if path.exists():
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    rows.append({k: ("" if v is None else v) for k, v in row.items()})
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def next_run_name(prefix: str, runs_root: Path, stamp: str, tracked: list[str] | None = None) -> str:
    """``<prefix>-<stamp>-runNN``, NN one more than the highest of that prefix seen in the runs
    folder or in the tracking server."""
    import re

    pattern = re.compile(rf"^{re.escape(prefix)}-\d{{8}}-\d{{4}}-run(\d+)$")
    seen = [p.name for p in runs_root.iterdir()] if runs_root.is_dir() else []
    numbers = [int(m.group(1)) for n in seen + list(tracked or []) if (m := pattern.match(n))]
    return f"{prefix}-{stamp}-run{max(numbers, default=0) + 1:02d}"
