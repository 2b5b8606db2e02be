"""The comparison in MLflow: a parent run, a child per model, the folds' training runs under their
model's run; created with the client (nothing left active) and continued across re-runs."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from medseg.compare.protocol import Protocol
from medseg.errors import MedsegError


class Tracker:
    """The comparison in MLflow: one parent run, a child run per model, the folds' training runs
    under their model's run (runs are created with the client: nothing is left active). Their ids
    are kept in the report's tracking.json, so a re-run that continues the report continues them."""

    def __init__(self, client, experiment_id: str | None, parent: str | None, saved: Path | None = None) -> None:
        self.client, self.experiment_id, self.parent, self.saved = client, experiment_id, parent, saved
        self.models: dict[str, str] = {}
        self.uri = ""

    def reopen(self, run_id: str | None) -> str | None:
        """``run_id`` set running again, or None when the store no longer has it."""
        if self.client is None or not run_id:
            return None
        try:
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        except Exception:
            return None

    def save(self) -> None:
        if self.client is not None and self.saved is not None:
            from medseg.engine.run import write_json

            write_json(self.saved, {"uri": self.uri, "parent": self.parent, "models": self.models})

    def model_run(self, name: str, params: dict[str, Any]) -> str | None:
        run_id = self.reopen(self.models.get(name)) or self.start(name, params, parent=self.parent, tags={"medseg.compare.model": name})
        if run_id:
            self.models[name] = run_id
            self.save()
        return run_id

    def start(self, name: str, params: dict[str, Any], parent: str | None = None, tags: dict[str, str] | None = None) -> str | None:
        if self.client is None:
            return None
        tags = dict(tags or {})
        if parent:
            tags["mlflow.parentRunId"] = parent
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        for key, value in params.items():
            self.client.log_param(run.info.run_id, key, json.dumps(value) if isinstance(value, (list, dict)) else value)
        return run.info.run_id

    def adopt(self, run_id: str | None, tags: dict[str, str] | None) -> None:
        """File an existing run (a fold trained by an earlier, interrupted comparison) under this one."""
        if self.client is not None and run_id and tags:
            try:
                for key, value in tags.items():
                    self.client.set_tag(run_id, key, value)
            except Exception:  # a fold tracked in another store: it stays where it is
                pass

    def log(self, run_id: str | None, metrics: dict[str, float]) -> None:
        if self.client is not None and run_id:
            for key, value in metrics.items():
                self.client.log_metric(run_id, key, value)

    def artifact(self, run_id: str | None, path: Path) -> None:
        if self.client is not None and run_id:
            self.client.log_artifact(run_id, str(path))

    def end(self, run_id: str | None, status: str = "FINISHED") -> None:
        if self.client is not None and run_id:
            self.client.set_terminated(run_id, status)


def make_tracker(bundle, proto: Protocol, out: Path) -> Tracker:
    if bundle.tracking.backend == "none":
        return Tracker(None, None, None)
    import logging

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from mlflow import MlflowClient

        from medseg.track import tracking_uri

        uri = tracking_uri(bundle.tracking)
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(bundle.tracking.experiment)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(bundle.tracking.experiment)
        tracker = Tracker(client, exp_id, None, out / "tracking.json")
        tracker.uri = uri
        try:
            before = json.loads((out / "tracking.json").read_text())
        except (OSError, ValueError):
            before = {}
        if before.get("uri") == uri and tracker.reopen(before.get("parent")):  # a continued comparison: the same runs
            tracker.parent, tracker.models = before["parent"], dict(before.get("models") or {})
            return tracker
        flat = {k: v for k, v in proto.as_dict().items() if k not in ("mixed", "bundles")}
        folder = out.resolve().name
        name = folder if folder.startswith("compare") else f"compare-{folder}"
        tracker.parent = tracker.start(f"{name}-{time.strftime('%Y%m%d-%H%M')}",
                                       {**flat, "bundles": list(proto.as_dict()["bundles"]), "report": str(out.resolve())},
                                       tags={"medseg.compare": str(out.resolve())})
        tracker.save()
        return tracker
    except Exception as e:  # an unreachable server, a read-only folder, a bad URI
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MedsegError(f"MLflow tracking failed ({first}); fix it or pass --tracking none") from None
