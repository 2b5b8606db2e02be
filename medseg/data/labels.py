"""Class names: from a source's label values to the bundle's output classes.

``data.labels`` names the output classes (background is 0, implied). A source may use other values
(TotalSegmentator has 117 classes; the phantom 6): ``source_labels`` says what each value means, and a
lookup table sends every listed name to its output index and everything else to background.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

import numpy as np

from medseg.errors import BundleError, DataError


def read_source_labels(spec: str | dict | None, base: Path | None = None) -> dict[int, str] | None:
    """A JSON file or a mapping to {value: name}. Both directions are accepted, since Decathlon
    writes {"1": "liver"} and nnU-Net v2 writes {"liver": 1}; "background"/0 is dropped."""
    if spec is None:
        return None
    if isinstance(spec, str):
        path = Path(spec)
        if not path.is_absolute() and base is not None and not path.exists():
            path = base / path
        if not path.is_file():
            raise BundleError(f"data.source_labels: no such file {spec}")
        try:
            spec = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise BundleError(f"data.source_labels: {path} is not valid JSON ({e})") from None
        if isinstance(spec, dict) and isinstance(spec.get("labels"), dict):
            spec = spec["labels"]  # a whole dataset.json
    if not isinstance(spec, dict) or not spec:
        raise BundleError("data.source_labels must be a non-empty mapping of label value to name")
    out: dict[int, str] = {}
    for k, v in spec.items():
        value, name = (k, v) if _is_int(k) else (v, k)
        if not _is_int(value) or not isinstance(name, str):
            raise BundleError(f"data.source_labels: entry {k!r}: {v!r} is not value -> name")
        if int(value) != 0:
            out[int(value)] = name
    return out


def _is_int(v) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return True
    return isinstance(v, str) and v.strip().lstrip("-").isdigit()


def build_lut(labels: list[str], source: dict[int, str] | None) -> np.ndarray:
    """Lookup table: ``lut[source_value] = output index`` (0 = background)."""
    if source is None:
        source = {i + 1: name for i, name in enumerate(labels)}
    by_name = {name: value for value, name in source.items()}
    lut = np.zeros(max(source) + 1, dtype=np.uint8 if len(labels) < 256 else np.uint16)
    for index, name in enumerate(labels, start=1):
        if name not in by_name:
            match = difflib.get_close_matches(name, list(by_name), n=1, cutoff=0.6)
            hint = f"; did you mean {match[0]!r}?" if match else f"; it has: {', '.join(sorted(by_name)[:12])}..."
            raise BundleError(f"data.labels: class {name!r} is not in the source's labels{hint}")
        lut[by_name[name]] = index
    return lut


def check_label_values(label: np.ndarray, lut: np.ndarray, path) -> None:
    """Label maps must hold whole, non-negative values the source mapping knows."""
    if np.issubdtype(label.dtype, np.floating):
        if not np.all(np.mod(label, 1) == 0):
            raise DataError(f"{path}: label map has non-integer values")
    values = np.unique(label)
    if values.size and values.min() < 0:
        raise DataError(f"{path}: label map has negative values ({int(values.min())})")
    unknown = values[values >= len(lut)]
    if unknown.size:
        raise DataError(
            f"{path}: label value {int(unknown[0])} is not in the source's labels "
            f"(highest known {len(lut) - 1}); set data.source_labels to say what it means"
        )


def apply_lut(label: np.ndarray, lut: np.ndarray) -> np.ndarray:
    return lut[np.asarray(label).astype(np.int64)]
