"""What makes a comparison fair, decided once for every bundle: the same cases and split, the same
preprocessing plan, the same training budget.

A protocol field that differs between bundles (classes, spacing, intensity normalisation) is an
error naming it, unless the user asks for a mixed comparison. The cases (data source, source label
meanings, phantom) must always be the same: a split by case name means nothing otherwise.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.config import Bundle, bundle_from_dict, load_bundle
from medseg.errors import BundleError, MedsegError

# Must be equal whatever --allow-mixed says: they decide which cases exist and what their labels mean.
CASE_FIELDS = ("data.source", "data.source_labels", "data.phantom")
# Must be equal unless --allow-mixed: they decide what is predicted and what the model sees.
PROTOCOL_FIELDS = ("data.labels", "data.spacing", "data.normalization", "data.hu_window", "data.ct_stats",
                   # and how a prediction is finished: the same window blending and postprocessing for every model
                   "sliding_window.overlap", "sliding_window.mode", "postprocess.largest_component")


@dataclass
class Entry:
    """One bundle in the comparison: its report name and its bundle (planned once loaded)."""

    name: str
    path: Path
    bundle: Bundle


@dataclass
class Protocol:
    entries: list[Entry]
    folds: int
    iterations: int | None
    minutes: float | None
    test: Path | None = None
    test_labels: Path | None = None
    allow_mixed: bool = False
    mixed: dict[str, dict[str, Any]] = field(default_factory=dict)  # field -> {model: value}, when allowed

    def budget(self) -> str:
        parts = []
        if self.iterations is not None:
            parts.append(f"{self.iterations} optimiser steps")
        if self.minutes is not None:
            parts.append(f"{self.minutes:g} min of optimiser steps (wall clock, validation not counted)")
        return " or ".join(parts) + (", whichever comes first" if len(parts) == 2 else "")

    def as_dict(self) -> dict[str, Any]:
        first = self.entries[0].bundle
        return {"bundles": {e.name: str(e.path.resolve()) for e in self.entries}, "folds": None if self.test else self.folds,
                "test": str(self.test) if self.test else None, "iterations": self.iterations, "minutes": self.minutes,
                "budget": self.budget(), "data_source": first.data.source, "labels": first.data.labels,
                "spacing": first.data.spacing, "normalization": first.data.normalization,
                "ct_stats": first.to_dict()["data"]["ct_stats"], "postprocess": first.postprocess.largest_component,
                "overlap": first.sliding_window.overlap, "allow_mixed": self.allow_mixed, "mixed": self.mixed}


def _get(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def report_names(paths: list[Path]) -> list[str]:
    """Each bundle's name in the report: its file stem, made unique."""
    names: list[str] = []
    for p in paths:
        stem, k = p.stem, 2
        name = stem
        while name in names:
            name, k = f"{stem}-{k}", k + 1
        names.append(name)
    return names


def load_entries(paths: list[Path], overrides: list[str], *, data: str | None, iterations: int | None,
                 minutes: float | None, test: bool) -> list[Entry]:
    if not paths:
        raise MedsegError("name at least one bundle, e.g. medseg compare bundles/fcn2d.json bundles/vnet.json")
    if iterations is None and minutes is None:
        raise MedsegError("name the training budget every model gets: --iterations N (optimiser steps) or --minutes M (wall clock)")
    if iterations is not None and iterations < 1:
        raise MedsegError(f"--iterations must be >= 1, got {iterations}")
    if minutes is not None and not (math.isfinite(minutes) and minutes > 0):
        raise MedsegError(f"--minutes must be a number > 0, got {minutes}")
    resolved = [p.resolve() for p in paths]
    for i, p in enumerate(resolved):
        if p in resolved[:i]:
            raise MedsegError(f"bundle {paths[i]} is named twice; a comparison trains each bundle once")
    common = list(overrides)
    if data is not None:
        common.append(f"data.source={data}")
    if iterations is not None:
        common.append(f"train.iterations={iterations}")
    elif minutes is not None:
        common.append("train.iterations=1000000")  # the clock ends training, not a length
    common.append(f"train.max_minutes={json.dumps(minutes)}")
    if test:
        common.append("data.val_fraction=0")  # every case trains; the scores come from the test set
    entries = []
    for path, name in zip(paths, report_names(paths)):
        try:
            bundle = load_bundle(path, common)
        except BundleError as e:
            raise BundleError(str(e) if str(path) in str(e) else f"{path}: {e}") from None
        if bundle.data.fold is not None or bundle.data.split_file is not None:
            raise MedsegError(f"{path}: data.fold / data.split_file are chosen by medseg compare (--folds, --split); leave them out")
        entries.append(Entry(name, Path(path), bundle))
    return entries


def check_protocol(entries: list[Entry], allow_mixed: bool) -> dict[str, dict[str, Any]]:
    """The fields on which the bundles differ; an error for case fields always and for protocol
    fields unless ``allow_mixed``."""
    raw = {e.name: e.bundle.to_dict() for e in entries}
    mixed: dict[str, dict[str, Any]] = {}
    for key in CASE_FIELDS + PROTOCOL_FIELDS:
        if key == "data.phantom" and any(_get(r, "data.source") != "phantom" for r in raw.values()):
            continue
        if key == "data.hu_window" and all(_get(r, "data.normalization") == "ct" for r in raw.values()):
            continue  # unused by "ct" normalisation but for the clip's lower bound, which ct_stats decides
        values = {name: _get(r, key) for name, r in raw.items()}
        if len({json.dumps(v, sort_keys=True) for v in values.values()}) > 1:
            shown = ", ".join(f"{n} {json.dumps(v)}" for n, v in values.items())
            if key in CASE_FIELDS:
                raise MedsegError(f"the bundles disagree on {key} ({shown}): a comparison needs the same cases; pass --data")
            if not allow_mixed:
                raise MedsegError(f"the bundles disagree on {key} ({shown}): a comparison needs one protocol; make them equal "
                                  "(--set) or pass --allow-mixed")
            mixed[key] = values
    return mixed


def plan_once(entries: list[Entry], found, lut, cases, device: str, progress=None) -> dict[str, Any] | None:
    """Fill every bundle's "auto" fields from ONE fingerprint of all the cases (nnU-Net's way), so
    that spacing and normalisation statistics are the same for every model; ROI and batch size are
    still each model's own. Returns the fingerprint's summary, or None when nothing was on auto."""
    if not any(e.bundle.planned_fields() for e in entries):
        return None
    from medseg.data.io import check_grid, read_image
    from medseg.plan import apply_plan, fingerprint, make_plan

    first = entries[0].bundle
    fp = fingerprint(sorted(cases, key=lambda c: c.name), lut, first.data.labels, root=found.root, progress=progress)
    plans = {}
    for e in entries:
        if e.bundle.planned_fields():
            plan = make_plan(fp, e.bundle, device)
            e.bundle = apply_plan(e.bundle, plan)
            plans[e.name] = plan.as_dict()
    spacings = {tuple(e.bundle.data.spacing) for e in entries}
    for case in cases:
        for spacing in spacings:
            check_grid(read_image(case.image), case.image, list(spacing))
    return plans


def fold_bundle(entry: Entry, fold: int | None, split_file: Path | None) -> Bundle:
    """The entry's bundle for one fold of the shared split (None: the --test protocol, no folds)."""
    raw = entry.bundle.to_dict()
    if fold is not None:
        raw["data"]["fold"], raw["data"]["split_file"] = fold, str(split_file)
    return bundle_from_dict(raw)
