"""``medseg export RUN --format onnx|torchscript|monai-bundle -o DIR``: a trained run for use outside medseg.

    from medseg.export import export_run
    result = export_run("runs/<name>", "onnx", "exports/liver-onnx")   # -> ExportResult

Every export folder holds the model, ``export.json`` (medseg version, run, model, classes, the input
spec: channels, window, spacing, orientation, the exact intensity map; the output; the sliding
window, body crop and post-processing medseg applies around the network; the measured parity) and
``README.txt`` (how to use it, with this run's numbers):

    onnx          model.onnx: the network on one window, batch axis free (torch's dynamo exporter)
    torchscript   model.torchscript.pt: torch.jit.trace of the same
    monai-bundle  configs/inference.json, configs/metadata.json, models/model.pt (state dict),
                  docs/README.md: ``python -m monai.bundle run`` reproduces ``medseg infer``
                  (see :mod:`medseg.export.monai_bundle`)

Every export checks itself before it is published: the exported network (onnxruntime on the CPU,
the reloaded TorchScript file, or the bundle's own network_def with models/model.pt) and the run's
PyTorch model run the same random windows; past :data:`~medseg.export.graph.ATOL` /
:data:`~medseg.export.graph.RTOL` on any logit, or below 99.9 % argmax agreement, the export fails
and nothing is written. The folder is written under a temporary name beside ``DIR`` and renamed
when complete; ``force`` replaces an earlier export (or an empty folder), never another folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from medseg.errors import MedsegError, check_choice

__all__ = ["CHECKPOINTS", "FORMATS", "ExportResult", "check_export", "export_run"]

FORMATS = ("onnx", "torchscript", "monai-bundle")
CHECKPOINTS = ("best", "last")
INFO_FILE = "export.json"
README_FILE = "README.txt"


@dataclass
class ExportResult:
    path: Path  # the export folder
    format: str
    files: list[str]  # relative to path
    parity: dict  # runtime, reference, windows, max_abs_diff, argmax_agreement, atol, rtol
    seconds: float
    info: dict = field(default_factory=dict)  # export.json's content
    notes: list[str] = field(default_factory=list)


def is_export(folder: Path) -> bool:
    """A folder medseg export wrote (its export.json names a medseg version)."""
    try:
        return "medseg_version" in json.loads((folder / INFO_FILE).read_text())
    except (OSError, ValueError, TypeError):
        return False


def foreign_files(folder: Path) -> list[Path]:
    """Files in an earlier export that it did not write (a bundle's results, the user's notes): ``--force`` keeps its hands off."""
    try:
        listed = set(json.loads((folder / INFO_FILE).read_text()).get("files", {}))
    except (OSError, ValueError, TypeError, AttributeError):
        listed = set()
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() not in listed)


def _refuse_foreign(out: Path) -> None:
    if any(out.iterdir()) and not is_export(out):
        raise MedsegError(f"{out} exists and is not a medseg export (no {INFO_FILE}); not replacing it, even with --force")
    extra = foreign_files(out) if out.is_dir() and any(out.iterdir()) else []
    if extra:
        shown = ", ".join(str(p.relative_to(out)) for p in extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
        raise MedsegError(f"{out} holds files the export did not write ({shown}); move them away first: --force replaces "
                          "only an export's own files")


def check_output(out: Path, force: bool) -> None:
    """Refuse, before any work: a file; an existing folder without ``force``; with ``force``, a
    folder that is neither empty nor an earlier export (``-o ~ --force`` must not delete a home)."""
    if out.exists() and not out.is_dir():
        raise MedsegError(f"-o {out} is a file; the export is a folder: choose another path")
    if out.is_dir():
        if any(out.iterdir()) and not is_export(out):
            raise MedsegError(f"{out} exists and is not a medseg export (no {INFO_FILE}): choose another -o")
        if not force:
            raise MedsegError(f"{out} exists; pass --force to replace it")
        _refuse_foreign(out)
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise MedsegError(f"cannot write to {parent}: choose another -o")


def _stage(out: Path) -> Path:
    """A new hidden folder beside ``out`` (same file system: the final rename is atomic)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(stage, 0o777 & ~umask)  # mkdtemp's 0700 would hide the export from the user's group
        return stage
    except OSError as e:
        raise MedsegError(f"cannot write to {out.parent}: {e.strerror or e}") from None


def _publish(stage: Path, out: Path, force: bool) -> None:
    """Rename the complete ``stage`` to ``out``. With ``force`` an earlier export is moved aside
    first and deleted after, so ``out`` is at no moment a half-written folder."""
    old = None
    if out.exists():
        if not force:
            raise MedsegError(f"{out} appeared while exporting; it was not replaced (pass --force to replace it)")
        if not out.is_dir():
            raise MedsegError(f"{out} appeared as a file while exporting; it was not replaced")
        _refuse_foreign(out)
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, old / "previous")
    try:
        os.rename(stage, out)
    except OSError as e:
        if old is not None:
            os.rename(old / "previous", out)
            old.rmdir()
        raise MedsegError(f"cannot create {out}: {e.strerror or e}") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_export(run_dir: str | Path, fmt: str, out_dir: str | Path, *, checkpoint: str = "best", force: bool = False):
    """Everything :func:`export_run` refuses, checked in well under a second (no weights loaded):
    the format, the checkpoint choice, the run directory (and its bundle and labels), the
    checkpoint's file, the output folder. Returns the :class:`~medseg.engine.run.Run`."""
    check_choice("--format", fmt, FORMATS)
    check_choice("--checkpoint", checkpoint, CHECKPOINTS)
    if fmt == "onnx":
        import importlib.util

        missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
        if missing:
            raise MedsegError(f"--format onnx needs {', '.join(missing)}: pip install 'medseg[export]'")
    from medseg.engine.run import Run

    run = Run.open(run_dir)
    check_output(Path(out_dir), force)
    run.labels  # noqa: B018  (reads and checks bundle.json and labels.json: an edited run fails here)
    if not run.weights_path(checkpoint).is_file():
        raise MedsegError(f"{run.path}: no {checkpoint} checkpoint ({run.weights_path(checkpoint).name} is missing)"
                          + (": no validation finished; try --checkpoint last" if checkpoint == "best" else ""))
    return run


def export_run(run_dir: str | Path, fmt: str, out_dir: str | Path, *, checkpoint: str = "best", force: bool = False) -> ExportResult:
    """Export the run in ``run_dir`` (its ``checkpoint`` weights: best or last) as ``fmt`` (onnx,
    torchscript, monai-bundle) into the new folder ``out_dir`` (``force``: replace an earlier export)."""
    t0 = time.time()
    run = check_export(run_dir, fmt, out_dir, checkpoint=checkpoint, force=force)
    out = Path(out_dir)
    bundle, labels = run.bundle, run.labels

    import torch

    from medseg.export import describe as d
    from medseg.export import graph as g

    model = g.unwrap_checkpointing(run.build_model(checkpoint, "cpu"))
    window = d.window_of(run, bundle)
    lo, hi = sorted(d.intensity(bundle)[k] for k in ("value_low", "value_high"))
    x = g.example_windows(g.PARITY_BATCH, 1, window.roi, lo, hi)
    parameters = sum(p.numel() for p in model.parameters())
    notes = [] if run.status == "complete" else [f"run {run.name} is {run.status}, not complete; exported its {checkpoint} checkpoint"]

    stage = _stage(out)
    try:
        if fmt == "onnx":
            written = g.write_onnx(g.graph_module(model), x, stage / "model.onnx")
            parity = g.check_onnx(stage / "model.onnx", model, x)
            files = {"model.onnx": "the network on one window (ONNX, batch axis free)"}
            if "model.onnx.data" in written:
                files["model.onnx.data"] = "its weights (past protobuf's 2 GiB limit; keep beside model.onnx)"
        elif fmt == "torchscript":
            g.write_torchscript(g.graph_module(model), x, stage / "model.torchscript.pt")
            parity = g.check_torchscript(stage / "model.torchscript.pt", model, x)
            files = {"model.torchscript.pt": "the network on one window (torch.jit.trace; batch axis free)"}
        else:
            from medseg.export import monai_bundle as mb

            mb.write_bundle(stage, model, bundle, labels, window, run.name, parameters)
            ref = g.reference_logits(model, x)
            got = g.reference_logits(mb.bundle_network(stage), x)
            parity = g.compare(ref, got, "the bundle's network_def with models/model.pt (MONAI ConfigParser)",
                               f"PyTorch {torch.__version__} eager, CPU, float32", "monai-bundle")
            files = {"configs/inference.json": "MONAI inference workflow (preprocessing, sliding window, inversion, saving)",
                     "configs/metadata.json": "MONAI metadata with network_data_format",
                     "models/model.pt": "the network's state dict",
                     "docs/README.md": "the bundle's documentation"}
        files |= {INFO_FILE: "this export's description (input spec, intensity map, classes, parity)", README_FILE: "this text"}
        info = d.describe(run, bundle, labels, checkpoint, fmt, window, files, parameters)
        info["parity"] = parity.as_dict()
        if fmt == "onnx":
            info["onnx"] = {"opset": g.onnx_opset(stage / "model.onnx"), "exporter": f"torch.onnx.export(dynamo=True), PyTorch {torch.__version__}",
                            "dynamic_axes": {"image": [0], "logits": [0]}}
        if fmt == "monai-bundle":
            info["bundle_command"] = mb.command(str(out.resolve()))
            info["bundle_requires"] = mb.requirements(bundle)
            info["network_def"] = mb.network_config(bundle)
        (stage / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        (stage / README_FILE).write_text(d.readme(info))
        _publish(stage, out, force)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    listed = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    return ExportResult(out, fmt, listed, parity.as_dict(), time.time() - t0, info, notes)
