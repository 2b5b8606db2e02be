"""Each shipped bundle, trained as shipped on the phantom, scored on held-out phantom cases.

    python benchmarks/phantom_heldout.py                          # all four bundles, as shipped
    python benchmarks/phantom_heldout.py --bundles vnet fcn2d
    python benchmarks/phantom_heldout.py --bundles swin_unetr --set 'train.augment_p={"enhance": 0}'

For each bundle: ``medseg train``'s API on the bundle's own phantom data and length, then ``medseg
infer`` and ``medseg evaluate``'s code on ``--cases`` phantom cases from another random stream
(``--seed``, default 1: patients the run never saw), as ``make demo`` does for Swin UNETR. Prints
one JSON line per run and a markdown table: training wall time, mean foreground Dice and HD95 on the
held-out cases, per-class Dice, and the predicted organ volumes beside the true ones (from the
held-out label maps), so a model that scores well by Dice but predicts a 9-litre liver shows.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def true_volumes(heldout: Path) -> dict[str, float]:
    """Mean volume (ml) per class over the held-out label maps, named by their dataset.json."""
    by_value = {int(k): v for k, v in json.loads((heldout / "dataset.json").read_text())["labels"].items()}
    sums: dict[str, list[float]] = {}
    for path in sorted((heldout / "labelsTr").glob("*.nii.gz")):
        img = nib.load(path)
        arr = np.asarray(img.dataobj)
        ml = float(np.prod(img.header.get_zooms()[:3])) / 1000
        for value, name in by_value.items():
            if value:
                sums.setdefault(name, []).append(float((arr == value).sum()) * ml)
    return {k: round(float(np.mean(v))) for k, v in sums.items()}


def run_one(name: str, extra: list[str], work: Path, heldout: Path) -> dict:
    from medseg.config import load_bundle
    from medseg.engine.evaluate import evaluate
    from medseg.engine.infer import Predictor, segment_file
    from medseg.engine.train import train

    bundle = load_bundle(ROOT / "bundles" / f"{name}.json", ["tracking.backend=none", *extra])
    t0 = time.time()
    result = train(bundle, runs_root=work / "runs", progress="plain")
    seconds = time.time() - t0
    pred = work / f"{result.name}_pred"
    pred.mkdir()
    predictor = Predictor(result.run_dir)
    volumes: dict[str, list[float]] = {}
    for scan in sorted((heldout / "imagesTr").glob("*.nii.gz")):
        out = pred / scan.name
        segment_file(predictor, scan, out)
        sidecar = json.loads(out.with_name(out.name.replace(".nii.gz", ".json")).read_text())
        for k, v in sidecar["volume_ml"].items():
            volumes.setdefault(k, []).append(v)
    report = evaluate(pred, heldout)
    return {"bundle": name, "overrides": extra, "train_s": round(seconds), "train_val_dice": round(result.best_dice, 3),
            "mean_dice": round(report.summary["mean_dice"], 3), "mean_hd95_mm": round(report.summary["mean_hd95_mm"], 1),
            "dice": {k: round(v["dice"], 3) for k, v in report.mean.items() if k != "background"},
            "predicted_ml": {k: round(float(np.mean(v))) for k, v in volumes.items()}, "run": str(result.run_dir)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundles", nargs="+", default=["swin_unetr", "vnet", "unetr", "fcn2d"])
    ap.add_argument("--set", dest="extra", action="append", default=[], help="bundle override for every run")
    ap.add_argument("--cases", type=int, default=2, help="held-out phantom cases (default 2, as make demo)")
    ap.add_argument("--seed", type=int, default=1, help="their phantom stream (training uses seed 0)")
    ap.add_argument("--work", type=Path, default=None, help="keep runs and outputs here (default: a temporary folder)")
    a = ap.parse_args()
    from medseg.data.phantom import write_phantom

    work = a.work or Path(tempfile.mkdtemp(prefix="medseg-phantom-"))
    heldout = work / f"heldout-seed{a.seed}-{a.cases}cases"
    if not (heldout / "dataset.json").is_file():
        write_phantom(heldout, a.cases, a.seed)
    truth = true_volumes(heldout)
    rows = []
    for name in a.bundles:
        row = run_one(name, list(a.extra), work, heldout)
        rows.append(row)
        print(json.dumps(row), flush=True)
    classes = [c for c in truth if any(c in r["dice"] for r in rows)]
    print("\n| bundle | overrides | train (s) | mean Dice | mean HD95 (mm) | " + " | ".join(f"{c} Dice" for c in classes)
          + " | predicted / true volume (ml) |")
    print("| --- " * (5 + len(classes) + 1) + "|")
    for r in rows:
        vols = ", ".join(f"{c} {r['predicted_ml'].get(c, 0)} / {truth[c]}" for c in classes)
        print(f"| {r['bundle']} | {' '.join(r['overrides']) or '-'} | {r['train_s']} | **{r['mean_dice']}** | {r['mean_hd95_mm']} | "
              + " | ".join(str(r["dice"].get(c, "-")) for c in classes) + f" | {vols} |")
    (work / "phantom_heldout.json").write_text(json.dumps(rows, indent=2))
    print(f"\nruns and outputs in {work}")


if __name__ == "__main__":
    main()
