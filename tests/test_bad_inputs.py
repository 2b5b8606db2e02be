"""The bad-input corpus: malformed NIfTI, label maps, DICOM series, bundles, run directories and CLI
arguments, generated on disk and run through the CLI as a user would type them.

Each case states its expected exit status and the words of its one error line (or, for inputs medseg
repairs, what it writes). One test runs them all and asserts: that exit status, exactly one
``error:`` line containing those words, no traceback, and nothing half-written or overwritten (every
file in the workspace is byte-identical afterwards unless the case names what it may create).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import SHARED_DATA, tiny_case, write_case, write_dicom_series

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
SMALL = ["--tracking", "none", "--progress", "off"]


@dataclass
class Bad:
    argv: list[str]
    needle: str = ""  # words of the one `error:` line
    exit: int = 2
    creates: tuple[str, ...] = ()  # workspace-relative files a repair case writes (and nothing else)
    output_has: str = ""  # words expected in the output of a repair case
    needs_shared: bool = False


def _gz_header_claiming(path: Path, shape) -> None:
    """A .nii.gz whose header claims ``shape`` but which holds only a few voxels."""
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4))
    header = img.header.copy()
    raw = bytearray(header.binaryblock)
    struct.pack_into("<8h", raw, 40, 3, *shape, 1, 1, 1, 1)  # dim[0..7]
    path.write_bytes(gzip.compress(bytes(raw) + b"\0" * 4 + np.zeros(64, np.int16).tobytes()))


def build(ws: Path, run: Path) -> dict[str, Bad]:
    """Write every malformed input under ``ws``; return the cases by id."""
    from medseg.data.phantom import make_case

    cases: dict[str, Bad] = {}
    smoke = str(BUNDLES / "smoke.json")
    fcn = str(BUNDLES / "fcn2d.json")

    def data(name: str, image=None, label=None, **kw) -> str:
        img, lab = tiny_case()
        write_case(ws / name, "a", img if image is None else image, lab if label is None else label, **kw)
        return str(ws / name)

    def train(*extra: str, bundle: str = smoke) -> list[str]:
        return ["train", bundle, *SMALL, *extra]

    # --- bundles --------------------------------------------------------------------------------
    (ws / "bundles").mkdir()
    (ws / "bundles" / "broken.json").write_text('{"model": ')
    (ws / "bundles" / "binary.json").write_bytes(b"\xff\xfe\x00\x01 not text")
    (ws / "bundles" / "array.json").write_text("[1, 2, 3]")
    (ws / "bundles" / "badargs.json").write_text(json.dumps({"model": {"name": "unetr", "args": {"hidden_size": "big"}}}))
    (ws / "afile").write_text("not a folder")
    (ws / "emptydir").mkdir()
    (ws / "notes_folder").mkdir()
    (ws / "notes_folder" / ".draft.tmp").write_text("a user's own file")
    (ws / "notes_folder" / "thesis.txt").write_text("a user's own file")
    cases.update({
        "bundle-unknown-key": Bad(train("--set", "train.learning_rate=0.1"), "unknown bundle key 'train.learning_rate'"),
        "bundle-bad-choice": Bad(train("--set", "train.loss=dice_cee"), "did you mean 'dice_ce'"),
        "bundle-not-json": Bad(["train", str(ws / "bundles" / "broken.json")], "is not valid JSON"),
        "bundle-not-utf8": Bad(["train", str(ws / "bundles" / "binary.json")], "is not valid JSON"),
        "bundle-array": Bad(["train", str(ws / "bundles" / "array.json")], "JSON object"),
        "bundle-is-folder": Bad(["train", str(ws / "bundles")], "is a folder"),
        "bundle-missing": Bad(["train", str(ws / "nope.json")], "bundle not found"),
        "model-args-string-set": Bad(train("--set", "model.args.feature_size=abc"), "model.args.feature_size must be like its default"),
        "model-args-string-file": Bad(["train", str(ws / "bundles" / "badargs.json")], "model.args.hidden_size must be like its default"),
        "model-args-unknown": Bad(train("--set", "model.args.hiden_size=96"), "did you mean 'hidden_size'"),
        "unetr-window-roi": Bad(train("--set", "sliding_window.roi=[48,48,48]"), "must equal train.roi"),
        "roi-huge": Bad(train("--set", "train.roi=[20000,20000,1]", bundle=fcn), "voxels per patch"),
        "roi-not-multiple": Bad(train("--set", "train.roi=[30,30,30]"), "does not suit UNETR"),
        "checkpoint-every": Bad(train("--set", "train.checkpoint_every=often"), "train.checkpoint_every"),
        "hu-window-brackets": Bad(train("--set", "data.hu_window=[250,-175]"), "must be [low, high] with low < high"),
        "run-dir-is-file": Bad(train("--run-dir", str(ws / "afile")), "is a file"),
        "run-dir-foreign-folder": Bad(train("--run-dir", str(ws / "notes_folder")), "is not empty and holds no run"),
        "runs-root-is-file": Bad(train("--runs-root", str(ws / "afile")), "is a file"),
        "runs-root-read-only": Bad(train("--runs-root", "/sys/medseg-runs"), "cannot create /sys/medseg-runs"),
        "resume-no-run-dir": Bad(["train", "--resume"], "--resume needs --run-dir"),
        "resume-not-a-run": Bad(["train", "--resume", "--run-dir", str(ws / "emptydir")], "not a medseg run directory"),
        "resume-with-bundle": Bad(["train", smoke, "--resume", "--run-dir", str(run)], "leave out BUNDLE"),
        "resume-incompatible": Bad(["train", "--resume", "--run-dir", str(run), *SMALL, "--set", "model.args.hidden_size=48",
                                    "--set", "train.epochs=3"], "with model.args.hidden_size changed"),
        "resume-nothing-left": Bad(["train", "--resume", "--run-dir", str(run), *SMALL], "already trained 1 epochs"),
        "progress-choice": Bad(train("--progress", "fancy"), "--progress must be auto, rich, plain or off"),
        "device-cuda": Bad(train("--device", "cuda"), "no CUDA device"),
        "unknown-option": Bad(["train", smoke, "--bogus"], "No such option: --bogus"),
        "unknown-command": Bad(["trian"], "Did you mean 'train'"),
    })

    # --- training data ----------------------------------------------------------------------------
    img, lab = tiny_case()
    shifted = np.diag([2.0, 2.0, 3.0, 1.0])
    shifted[0, 3] = 25.0  # the label map 25 mm away from its image
    corrupt = data("d-corrupt")
    p = Path(corrupt) / "imagesTr" / "a.nii.gz"
    p.write_bytes(p.read_bytes()[:400])
    huge = data("d-huge")
    _gz_header_claiming(Path(huge) / "imagesTr" / "a.nii.gz", (30000, 30000, 30000))
    nan = img.astype(np.float32)
    nan[5, 5, 5] = np.nan
    unlisted = lab.copy()
    unlisted[0, 0, 0] = 3
    (ws / "labels").mkdir()
    (ws / "labels" / "negative.json").write_text(json.dumps({"-1": "blob", "1": "other"}))
    (ws / "labels" / "binary.json").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xff")
    (ws / "labels" / "list.json").write_text("[1, 2]")
    (ws / "labels" / "gap.json").write_text(json.dumps({"1": "blob", "5": "other"}))
    (ws / "d-empty").mkdir()

    def blob(source: str, *extra: str) -> list[str]:
        return train("--set", f"data.source={source}", "--set", 'data.labels=["blob"]', *extra)

    cases.update({
        "data-truncated-nifti": Bad(blob(corrupt), "a.nii.gz"),
        "data-huge-header": Bad(blob(huge), "corrupt or truncated"),
        "data-shape-mismatch": Bad(blob(data("d-shape", label=lab[:, :-2])), "image shape (40, 36, 20) != label shape (40, 34, 20)"),
        "data-affine-mismatch": Bad(blob(data("d-affine", label_affine=shifted)), "different affines"),
        "data-nan": Bad(blob(data("d-nan", image=nan)), "voxels are NaN"),
        "data-2d": Bad(blob(data("d-2d", image=img[:, :, 0], label=lab[:, :, 0])), "expected a 3D volume"),
        "data-empty": Bad(blob(str(ws / "d-empty")), "no cases found"),
        "label-value-unlisted": Bad(blob(data("d-unlisted", label=unlisted)), "a.nii.gz: label value 3 is not in the source's labels"),
        "label-value-below-max": Bad(blob(data("d-gap", label=unlisted), "--set", f"data.source_labels={ws / 'labels' / 'gap.json'}"),
                                     "a.nii.gz: label value 3 is not in the source's labels"),
        "source-labels-negative": Bad(blob(data("d-neg"), "--set", f"data.source_labels={ws / 'labels' / 'negative.json'}"),
                                      "label value -1 ('blob') is out of range"),
        "source-labels-not-utf8": Bad(blob(data("d-bin"), "--set", f"data.source_labels={ws / 'labels' / 'binary.json'}"), "binary.json"),
        "source-labels-list": Bad(blob(data("d-list"), "--set", f"data.source_labels={ws / 'labels' / 'list.json'}"), "list.json"),
        "source-labels-missing": Bad(blob(data("d-miss"), "--set", f"data.source_labels={ws / 'labels' / 'nope.json'}"), "nope.json"),
        "class-not-in-source": Bad(train("--set", 'data.labels=["livr"]'), "did you mean 'liver'"),
        "class-in-no-case": Bad(train("--set", f"data.source={data('d-absent')}", "--set", 'data.labels=["blob","other"]',
                                      "--set", 'data.source_labels={"1": "blob", "2": "other"}'), "'other' occurs in none of the 1 case(s)"),
        "data-spacing-metres": Bad(blob(data("d-metres", affine=np.diag([3000.0, 3000.0, 3000.0, 1.0]),
                                             label_affine=np.diag([3000.0, 3000.0, 3000.0, 1.0]))), "is not that of a CT"),
        "bundle-spacing-huge": Bad(train("--set", "data.spacing=[1e6,1e6,1e6]"), "data.spacing must be \"auto\" or 3 numbers between"),
        "bundle-spacing-tiny": Bad(train("--set", "data.spacing=[0.01,0.01,0.01]"), "data.spacing must be \"auto\" or 3 numbers between"),
        "bundle-lr-infinite": Bad(train("--set", "train.lr=Infinity"), "train.lr must be a finite number"),
        "model-args-negative": Bad(train("--set", "model.args.feature_size=-1"), "must be positive"),
    })

    # --- inference: NIfTI ------------------------------------------------------------------------------
    scans = ws / "scans"
    scans.mkdir()
    good = make_case(seed=7, index=0).image
    nib.save(good, scans / "ct.nii.gz")
    raw = (scans / "ct.nii.gz").read_bytes()
    (scans / "truncated.nii.gz").write_bytes(raw[: len(raw) // 3])
    (scans / "notes.txt").write_text("not an image")
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 10, 3), np.int16), np.eye(4)), scans / "four_d.nii.gz")
    _gz_header_claiming(scans / "huge.nii.gz", (30000, 30000, 30000))
    nib.save(nib.Nifti1Image(np.asarray(good.dataobj)[:20, :20, :10], np.diag([3000.0, 3000.0, 3000.0, 1.0])), scans / "metres.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(good.dataobj)[:20, :20, :10], np.diag([0.003, 0.003, 0.003, 1.0])), scans / "microns.nii.gz")
    batch = ws / "batch"
    batch.mkdir()
    shutil.copy(scans / "ct.nii.gz", batch / "a.nii.gz")
    shutil.copy(scans / "truncated.nii.gz", batch / "b.nii.gz")
    dataset = ws / "dataset_case"
    dataset.mkdir()
    shutil.copy(scans / "ct.nii.gz", dataset / "image.nii.gz")
    nib.save(make_case(seed=7, index=0).label, dataset / "label.nii.gz")
    r = str(run)

    def infer(*extra: str) -> list[str]:
        return ["infer", *extra, "--run", r]

    broken_weights = ws / "run-broken-weights"
    shutil.copytree(run, broken_weights, ignore=shutil.ignore_patterns(".lock"))
    w = broken_weights / "model_best.pt"
    w.write_bytes(w.read_bytes()[:1000])
    bad_args = ws / "run-bad-args"
    shutil.copytree(run, bad_args, ignore=shutil.ignore_patterns(".lock"))
    b = json.loads((bad_args / "bundle.json").read_text())
    b["model"]["args"]["feature_size"] = "eight"
    (bad_args / "bundle.json").write_text(json.dumps(b))
    cases.update({
        "infer-missing": Bad(infer(str(scans / "missing.nii.gz")), "no such file"),
        "infer-empty-path": Bad(infer(""), "INPUT is empty"),
        "infer-voxels-in-metres": Bad(infer(str(scans / "metres.nii.gz"), "-o", str(ws / "o7.nii.gz")), "is not that of a CT"),
        "infer-voxels-in-microns": Bad(infer(str(scans / "microns.nii.gz"), "-o", str(ws / "o8.nii.gz")), "is not that of a CT"),
        "infer-text": Bad(infer(str(scans / "notes.txt")), "not a NIfTI file"),
        "infer-truncated": Bad(infer(str(scans / "truncated.nii.gz"), "-o", str(ws / "new" / "deep" / "o1.nii.gz")),
                               "truncated.nii.gz: corrupt or truncated"),  # and no folders left behind
        "infer-4d": Bad(infer(str(scans / "four_d.nii.gz"), "-o", str(ws / "o2.nii.gz")), "expected a 3D volume"),
        "infer-huge-header": Bad(infer(str(scans / "huge.nii.gz"), "-o", str(ws / "o3.nii.gz")), "corrupt or truncated"),
        "infer-force-onto-input": Bad(infer(str(scans / "ct.nii.gz"), "-o", str(scans / "ct.nii.gz"), "--force"), "is the input"),
        "infer-not-nifti-output": Bad(infer(str(scans / "ct.nii.gz"), "-o", str(ws / "out.png")), "must end in .nii.gz or .nii"),
        "infer-folder-to-file": Bad(infer(str(batch), "-o", str(ws / "seg.nii.gz")), "a folder input needs an output folder"),
        "infer-batch-one-truncated": Bad(infer(str(batch), "-o", str(ws / "batch_out")), "b.nii.gz", exit=1,
                                         creates=("batch_out/a_seg.nii.gz", "batch_out/a_seg.json", "batch_out/summary.csv",
                                                  "batch_out/summary.json")),
        "infer-dataset-folder": Bad(infer(str(dataset), "-o", str(ws / "ds_out")), exit=0,
                                    creates=("ds_out/dataset_case_seg.nii.gz", "ds_out/dataset_case_seg.json", "ds_out/summary.csv",
                                             "ds_out/summary.json")),
        "infer-weights-truncated": Bad(["infer", str(scans / "ct.nii.gz"), "-o", str(ws / "o4.nii.gz"), "--run", str(broken_weights)],
                                       "cannot load weights ("),
        "infer-run-bad-args": Bad(["infer", str(scans / "ct.nii.gz"), "-o", str(ws / "o5.nii.gz"), "--run", str(bad_args)],
                                  "run-bad-args/bundle.json: model.args.feature_size"),
        "infer-not-a-run": Bad(["infer", str(scans / "ct.nii.gz"), "--run", str(ws / "emptydir")], "not a medseg run directory"),
        "infer-no-runs": Bad(["infer", str(scans / "ct.nii.gz"), "-o", str(ws / "o6.nii.gz")], "no complete training run"),
        "infer-checkpoint-choice": Bad(infer(str(scans / "ct.nii.gz"), "--checkpoint", "middle"), "--checkpoint must be"),
        "infer-unknown-class": Bad(infer(str(scans / "ct.nii.gz"), "--classes", "pancreas"), "pancreas"),
        "infer-overlap": Bad(infer(str(scans / "ct.nii.gz"), "--overlap", "1.0"), "overlap"),
        "infer-window-choice": Bad(infer(str(scans / "ct.nii.gz"), "--window", "fast"), "--window must be"),
        "infer-old-labels-option": Bad(infer(str(scans / "ct.nii.gz"), "--labels", "liver"), "No such option: --labels"),
    })

    # --- inference: DICOM ----------------------------------------------------------------------------
    series = nib.Nifti1Image(np.asarray(good.dataobj)[::2, ::2, :16], good.affine @ np.diag([2, 2, 1, 1]))
    gap = write_dicom_series(series, ws / "dicom_gap")
    sorted(gap.glob("*.dcm"))[5].unlink()
    trunc = write_dicom_series(series, ws / "dicom_truncated")
    victim = sorted(trunc.glob("*.dcm"))[7]
    victim.write_bytes(victim.read_bytes()[:300])
    mixed = write_dicom_series(series, ws / "dicom_two_series")
    scout = nib.Nifti1Image(np.asarray(series.dataobj)[:, :, :2], series.affine)
    write_dicom_series(scout, mixed, series_uid="1.2.826.0.1.3680043.2.1125.99", prefix="scout")
    nested = ws / "dicom_parent"
    shutil.copytree(mixed, nested / "series")
    seg_only = ws / "dicom_seg_only"
    seg_only.mkdir()
    if (SHARED_DATA / "dicom_ct_3slice" / "liver_seg.dcm").is_file():
        shutil.copy(SHARED_DATA / "dicom_ct_3slice" / "liver_seg.dcm", seg_only / "liver_seg.dcm")
    cases.update({
        "dicom-missing-slice": Bad(infer(str(gap), "-o", str(ws / "d1.nii.gz")), "not evenly spaced"),
        "dicom-truncated-slice": Bad(infer(str(trunc), "-o", str(ws / "d2.nii.gz")), victim.name),
        "dicom-empty-folder": Bad(infer(str(ws / "emptydir"), "-o", str(ws / "d3.nii.gz")), "empty folder (no NIfTI scans, no DICOM files)"),
        "dicom-single-file": Bad(infer(str(sorted(mixed.glob("*.dcm"))[0]), "-o", str(ws / "d7.nii.gz")), "a single DICOM file"),
        "dicom-parent-folder": Bad(infer(str(nested), "-o", str(ws / "d8.nii.gz")), "are not searched: give the series' own folder"),
        "dicom-seg-only": Bad(infer(str(seg_only), "-o", str(ws / "d4.nii.gz")), "no CT image series", needs_shared=True),
        "dicom-unknown-series": Bad(infer(str(mixed), "-o", str(ws / "d5.nii.gz"), "--series", "1.2.3.4"), "no series with SeriesInstanceUID"),
        "dicom-two-series": Bad(infer(str(mixed), "-o", str(ws / "d6.nii.gz")), exit=0, output_has="the one with the most slices",
                                creates=("d6.nii.gz", "d6.json")),
    })

    # --- evaluate ----------------------------------------------------------------------------------------
    ev = ws / "eval"
    ev.mkdir()
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    cube = np.zeros((20, 20, 20), np.uint8)
    cube[5:15, 5:15, 5:15] = 1
    nib.save(nib.Nifti1Image(cube, aff), ev / "case.nii.gz")
    nib.save(nib.Nifti1Image(cube, aff), ev / "case_seg.nii.gz")
    (ev / "case_seg.json").write_text(json.dumps({"labels": {"0": "background", "1": "liver"}}))
    nib.save(nib.Nifti1Image((np.random.default_rng(0).normal(0, 300, (20, 20, 20))).astype(np.int16), aff), ev / "ct.nii.gz")
    nib.save(nib.Nifti1Image(cube[:, :, :10], aff), ev / "small.nii.gz")
    (ev / "binary.json").write_bytes(b"\xff\xfe\xfa")
    (ev / "list.json").write_text("[1, 2]")
    pred, gt = str(ev / "case_seg.nii.gz"), str(ev / "case.nii.gz")
    cases.update({
        "eval-ct-as-prediction": Bad(["evaluate", str(ev / "ct.nii.gz"), gt, "-o", str(ws / "e1")], "not a label map"),
        "eval-names-one-side": Bad(["evaluate", pred, gt, "-o", str(ws / "e2")], "--gt-labels"),
        "eval-labels-not-utf8": Bad(["evaluate", pred, gt, "--gt-labels", str(ev / "binary.json"), "-o", str(ws / "e3")], "binary.json"),
        "eval-labels-list": Bad(["evaluate", pred, gt, "--gt-labels", str(ev / "list.json"), "-o", str(ws / "e4")], "list.json"),
        "eval-output-read-only": Bad(["evaluate", pred, gt, "--gt-labels", str(ev / "case_seg.json"), "-o", "/sys/medseg/report"],
                                     "/sys/medseg"),
        "eval-shape-mismatch": Bad(["evaluate", str(ev / "small.nii.gz"), gt, "-o", str(ws / "e5")], "shape"),
        "eval-missing": Bad(["evaluate", pred, str(ev / "nope.nii.gz")], "no such file"),
        "eval-empty-path": Bad(["evaluate", "", gt], "PRED is empty"),
        "eval-old-labels-option": Bad(["evaluate", pred, gt, "--labels", str(ev / "case_seg.json")], "No such option: --labels"),
    })

    # --- cost calculators ------------------------------------------------------------------------------
    cases.update({
        "flops-arg-string": Bad(["flops", "--model", "unetr", "--roi", "32,32,32", "--arg", "feature_size=abc"], "feature_size"),
        "flops-overlap-one": Bad(["flops", "--model", "vnet", "--roi", "32,32,32", "--volume", "64,64,64", "--overlap", "1.0"], "overlap"),
        "flops-model-and-bundle": Bad(["flops", "--model", "vnet", "--bundle", smoke], "--model"),
        "flops-shape-count": Bad(["flops", "--shape", "64,64"], "expected 4 numbers"),
        "memory-budget-no-unit": Bad(["memory", "--model", "vnet", "--roi", "32,32,32", "--budget", "24"], "24"),
        "memory-model-and-bundle": Bad(["memory", "--model", "vnet", "--bundle", smoke], "--model"),
        "memory-unknown-model": Bad(["memory", "--model", "unet_r"], "did you mean 'unetr'"),
    })
    return cases


CASE_IDS = [
    "bundle-unknown-key", "bundle-bad-choice", "bundle-not-json", "bundle-not-utf8", "bundle-array", "bundle-is-folder",
    "bundle-missing", "model-args-string-set", "model-args-string-file", "model-args-unknown", "unetr-window-roi", "roi-huge",
    "roi-not-multiple", "checkpoint-every", "hu-window-brackets", "run-dir-is-file", "run-dir-foreign-folder",
    "runs-root-is-file", "runs-root-read-only",
    "resume-no-run-dir", "resume-not-a-run", "resume-with-bundle", "resume-incompatible", "resume-nothing-left", "progress-choice",
    "device-cuda", "unknown-option", "unknown-command",
    "data-truncated-nifti", "data-huge-header", "data-shape-mismatch", "data-affine-mismatch", "data-nan", "data-2d", "data-empty",
    "label-value-unlisted", "label-value-below-max", "source-labels-negative", "source-labels-not-utf8", "source-labels-list",
    "source-labels-missing", "class-not-in-source", "class-in-no-case", "data-spacing-metres", "bundle-spacing-huge",
    "bundle-spacing-tiny", "bundle-lr-infinite", "model-args-negative",
    "infer-missing", "infer-empty-path", "infer-voxels-in-metres", "infer-voxels-in-microns", "infer-text", "infer-truncated", "infer-4d",
    "infer-huge-header", "infer-force-onto-input",
    "infer-not-nifti-output", "infer-folder-to-file", "infer-batch-one-truncated", "infer-dataset-folder", "infer-weights-truncated",
    "infer-run-bad-args", "infer-not-a-run", "infer-no-runs", "infer-checkpoint-choice", "infer-unknown-class", "infer-overlap",
    "infer-window-choice", "infer-old-labels-option",
    "dicom-missing-slice", "dicom-truncated-slice", "dicom-empty-folder", "dicom-single-file", "dicom-parent-folder", "dicom-seg-only",
    "dicom-unknown-series", "dicom-two-series",
    "eval-ct-as-prediction", "eval-names-one-side", "eval-labels-not-utf8", "eval-labels-list", "eval-output-read-only",
    "eval-shape-mismatch", "eval-missing", "eval-empty-path", "eval-old-labels-option",
    "flops-arg-string", "flops-overlap-one", "flops-model-and-bundle", "flops-shape-count", "memory-budget-no-unit",
    "memory-model-and-bundle", "memory-unknown-model",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from medseg.config import load_bundle
    from medseg.engine.train import train

    ws = tmp_path_factory.mktemp("corpus")
    run = ws / "trained" / "run"
    train(load_bundle(BUNDLES / "smoke.json", ["train.epochs=1", "train.iterations_per_epoch=1", "train.samples_per_volume=1"]),
          run_dir=run, progress="off")
    cases = build(ws, run)
    assert sorted(cases) == sorted(CASE_IDS), "every generated case is listed once"
    return ws, cases


def files(ws: Path) -> dict[str, str]:
    return {str(p.relative_to(ws)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(ws.rglob("*")) if p.is_file() and p.name != ".lock"} | \
           {str(p.relative_to(ws)) + "/": "dir" for p in ws.rglob("*") if p.is_dir()}


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_bad_input(case_id, corpus, cli, monkeypatch):
    ws, cases = corpus
    case = cases[case_id]
    if case.needs_shared and not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    monkeypatch.chdir(ws)  # ./runs (absent) and outputs land in the workspace
    before = files(ws)
    result = cli(*case.argv)
    text = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exception is None or isinstance(result.exception, SystemExit), f"{case_id}: {result.exception!r}\n{text}"
    assert "Traceback" not in text, text
    assert result.exit_code == case.exit, f"{case_id}: exit {result.exit_code}\n{text}"
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    if case.exit == 2:
        assert len(errors) == 1, f"{case_id}: {len(errors)} error lines\n{text}"
    if case.needle:
        assert errors and case.needle in errors[0], f"{case_id}: {case.needle!r} not in\n{text}"
    if case.output_has:
        assert case.output_has in text, text
    after = files(ws)
    created = {k for k in after if k not in before and not k.endswith("/")}
    changed = {k for k in before if k in after and before[k] != after[k]}
    removed = {k for k in before if k not in after}
    assert not changed and not removed, f"{case_id}: changed {changed}, removed {removed}"
    assert created == set(case.creates), f"{case_id}: created {created}"
    new_dirs = {k for k in after if k.endswith("/") and k not in before}
    assert new_dirs <= {str(Path(c).parent) + "/" for c in case.creates}, f"{case_id}: new folders {new_dirs}"
    for name in case.creates:  # a repair's outputs are complete, readable files; then tidy up for the next case
        if name.endswith(".nii.gz"):
            assert len(nib.load(ws / name).shape) == 3 and np.asarray(nib.load(ws / name).dataobj).any()
        elif name.endswith(".csv"):
            assert (ws / name).read_text().startswith("name,status,")
        else:
            json.loads((ws / name).read_text())
        (ws / name).unlink()
    for d in sorted(new_dirs, reverse=True):
        (ws / d).rmdir()


def test_help_shows_no_value_for_flags(cli):
    """Typer 0.29 prints every bool flag as `--tta <bool>` and lists as `<list[str]>`, forms that fail."""
    for command in ("infer", "train", "evaluate", "flops", "memory"):
        lines = [line for line in cli(command, "--help").output.splitlines() if "--help" not in line]
        assert not [line for line in lines if "<bool>" in line or "<list[str]>" in line], command
