"""Class names: from a source's label values to the bundle's output classes.

``data.labels`` names the output classes (background is 0, implied). A source may use other values
(TotalSegmentator has 117 classes; the phantom 6): ``source_labels`` says what each value means, and a
lookup table sends every listed name to its output index and everything else to background.
"""

from __future__ import annotations

import difflib
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from medseg.errors import BundleError, DataError

MAX_LABEL_VALUE = 65535  # the lookup table has one entry per value up to the largest


def read_source_labels(spec: str | dict | None, base: Path | None = None, what: str = "data.source_labels") -> dict[int, str] | None:
    """A JSON file or a mapping to {value: name}. Both directions are accepted, since Decathlon
    writes {"1": "liver"} and nnU-Net v2 writes {"liver": 1}; "background"/0 is dropped. Anything
    else (a list, nested objects, a negative or repeated value, a file that is not UTF-8 JSON) is a
    one-line :class:`BundleError` starting with ``what`` (and the file)."""
    if spec is None:
        return None
    if isinstance(spec, (str, Path)):
        path = Path(spec).expanduser()
        if not path.is_absolute() and base is not None and not path.exists():
            path = base / path
        if not path.is_file():
            raise BundleError(f"{what}: no such file {spec}")
        what = f"{what} ({path})"
        spec = _read_json(path, what)
        if isinstance(spec, dict) and isinstance(spec.get("labels"), dict):
            spec = spec["labels"]  # a whole dataset.json
    if not isinstance(spec, dict) or not spec:
        raise BundleError(f"{what}: expected a non-empty mapping of label value to name, got {_kind(spec)}")
    out: dict[int, str] = {}
    for k, v in spec.items():
        value, name = (_as_int(k), v) if _as_int(k) is not None else (_as_int(v), k)
        if value is None or not isinstance(name, str) or not name.strip():
            raise BundleError(f"{what}: entry {k!r}: {v!r} is not a label value and its name")
        if value < 0 or value > MAX_LABEL_VALUE:
            raise BundleError(f"{what}: label value {value} ({name!r}) is out of range: values are 0 to {MAX_LABEL_VALUE}")
        if value in out:
            raise BundleError(f"{what}: label value {value} is listed twice ({out[value]!r} and {name!r})")
        if value != 0:
            out[value] = name
    if not out:
        raise BundleError(f"{what}: lists only background (value 0); it must name the values of the classes")
    return out


def _read_json(path: Path, what: str):
    def no_repeats(pairs: list) -> dict:
        keys = [k for k, _ in pairs]
        repeated = next((k for k in keys if keys.count(k) > 1), None)
        if repeated is not None:
            raise BundleError(f"{what}: the key {repeated!r} appears twice")
        return dict(pairs)

    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as e:
        raise BundleError(f"{what}: cannot read the file ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise BundleError(f"{what}: not UTF-8 text (a binary file?); expected JSON") from None
    try:
        return json.loads(text, object_pairs_hook=no_repeats)
    except json.JSONDecodeError as e:
        raise BundleError(f"{what}: not valid JSON ({e})") from None
    except RecursionError:
        raise BundleError(f"{what}: JSON nested too deeply") from None


def _kind(spec) -> str:
    return "an empty mapping" if isinstance(spec, dict) else f"{type(spec).__name__} {str(spec)[:40]!r}"


def _as_int(v) -> int | None:
    """A whole number given as an int or a string of ASCII digits (JSON keys are strings)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, str) and re.fullmatch(r"\s*[-+]?[0-9]+\s*", v):
        return int(v)
    return None


def build_lut(labels: list[str], source: dict[int, str] | None) -> np.ndarray:
    """Lookup table: ``lut[source_value] = output index`` (0 = background). Every source value
    whose name is a class maps to it (TotalSegmentator-style sources may give one name to several
    values); a class no source value names is an error."""
    if source is None:
        source = {i + 1: name for i, name in enumerate(labels)}
    values_of: dict[str, list[int]] = defaultdict(list)
    for value, name in source.items():
        values_of[name].append(value)
    lut = np.zeros(max(source) + 1, dtype=np.uint8 if len(labels) < 256 else np.uint16)
    for index, name in enumerate(labels, start=1):
        if name not in values_of:
            match = difflib.get_close_matches(name, list(values_of), n=1, cutoff=0.6)
            hint = f"; did you mean {match[0]!r}?" if match else f"; it has: {', '.join(sorted(values_of)[:12])}..."
            raise BundleError(f"data.labels: class {name!r} is not in the source's labels{hint}")
        lut[values_of[name]] = index
    return lut


def known_values(labels: list[str], source: dict[int, str] | None) -> np.ndarray:
    """The values a label map may hold: 0 and every value the source lists (1..N without one).
    A value outside these has no stated meaning, so it is refused rather than read as background."""
    listed = sorted(source) if source is not None else range(1, len(labels) + 1)
    return np.array([0, *listed], dtype=np.int64)


def check_label_values(label: np.ndarray, path, *, known: np.ndarray) -> None:
    """Label maps must hold whole, non-negative values the source mapping lists."""
    if np.issubdtype(label.dtype, np.floating):
        if not np.all(np.mod(label, 1) == 0):
            raise DataError(f"{path}: label map has non-integer values")
    values = np.unique(label)
    if values.size and values.min() < 0:
        raise DataError(f"{path}: label map has negative values ({int(values.min())})")
    unknown = values[~np.isin(values, known)]
    if unknown.size:
        more = f" (and {unknown.size - 1} more unlisted value{'s' if unknown.size > 2 else ''})" if unknown.size > 1 else ""
        contiguous = known.size == int(known[-1]) + 1
        listed = f"0..{int(known[-1])}" if contiguous else f"0 and {known.size - 1} values up to {int(known[-1])}"
        raise DataError(f"{path}: label value {int(unknown[0])} is not in the source's labels{more}; they list {listed}. "
                        "Set data.source_labels to say what each value means")


def apply_lut(label: np.ndarray, lut: np.ndarray) -> np.ndarray:
    return lut[np.asarray(label).astype(np.int64)]
