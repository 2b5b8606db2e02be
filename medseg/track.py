"""Experiment tracking with MLflow; a no-op tracker when disabled.

The store is, in order: ``MLFLOW_TRACKING_URI`` from the environment, the bundle's
``tracking.uri``, else MLflow's embedded SQLite store ``mlflow.db`` in the working directory
(``mlflow ui --backend-store-uri sqlite:///mlflow.db`` shows it).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from medseg.config import TrackingConfig


def tracking_uri(cfg: TrackingConfig) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if cfg.uri:
        return cfg.uri
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


class NullTracker:
    """Used with ``--tracking none``: every call does nothing."""

    run_id: str | None = None
    uri: str | None = None

    def start(self, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> None: ...
    def resume(self, run_id: str) -> None: ...
    def logged_steps(self, key: str) -> set[int]:
        return set()
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path) -> None: ...
    def end(self, status: str = "FINISHED") -> None: ...
    def run_names(self) -> list[str]:
        return []


class MlflowTracker:
    def __init__(self, cfg: TrackingConfig, uri: str | None = None) -> None:
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
        import mlflow

        self.mlflow = mlflow
        self.uri = uri or tracking_uri(cfg)
        self.experiment = cfg.experiment
        self.run_id: str | None = None
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_experiment(self.experiment)

    def run_names(self) -> list[str]:
        exp = self.mlflow.get_experiment_by_name(self.experiment)
        if exp is None:
            return []
        runs = self.mlflow.search_runs([exp.experiment_id], output_format="list", max_results=5000)
        return [r.info.run_name for r in runs if r.info.run_name]

    def start(self, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> None:
        run = self.mlflow.start_run(run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        flat = {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in params.items()}
        items = list(flat.items())
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.mlflow.log_params(dict(items[i : i + 100]))

    def resume(self, run_id: str) -> None:
        """Continue the run ``run_id`` in the store this tracker was made for (the one saved in run.json)."""
        self.mlflow.start_run(run_id=run_id)
        self.run_id = run_id

    def logged_steps(self, key: str) -> set[int]:
        """Steps at which ``key`` was logged in this run (to fill gaps left by a killed process)."""
        if self.run_id is None:
            return set()
        return {m.step for m in self.mlflow.MlflowClient(tracking_uri=self.uri).get_metric_history(self.run_id, key)}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None and v == v}  # drop None / NaN
        if clean:
            self.mlflow.log_metrics(clean, step=step)

    def log_artifact(self, path: str | Path) -> None:
        self.mlflow.log_artifact(str(path))

    def end(self, status: str = "FINISHED") -> None:
        if self.mlflow.active_run() is not None:
            self.mlflow.end_run(status=status)


def make_tracker(cfg: TrackingConfig, uri: str | None = None):
    """``uri`` (a resumed run's own store) wins over the environment and the bundle."""
    if cfg.backend == "none":
        return NullTracker()
    try:
        return MlflowTracker(cfg, uri)
    except Exception as e:  # an unreachable server, a read-only folder, a bad URI
        from medseg.errors import MedsegError

        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MedsegError(f"MLflow tracking at {uri or tracking_uri(cfg)} failed ({first}); fix it or pass --tracking none") from None
