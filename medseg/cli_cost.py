"""``medseg flops`` and ``medseg memory``: what a model and a volume cost, before renting a GPU.

The analytic mode (``--shape``, ``--conv-input``) imports no torch and answers in well under a
second; the model modes trace the real model on the meta device.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from medseg.cli_common import app, out, user_errors
from medseg.errors import MedsegError

ModelOpt = Annotated[str | None, typer.Option("--model", help="A registered model (medseg models).")]
BundleOpt = Annotated[Path | None, typer.Option("--bundle", help="Take model, arguments, ROI and classes from a bundle.")]
RoiOpt = Annotated[str | None, typer.Option("--roi", help="Window / patch size, e.g. 96,96,96.")]
ClassesOpt = Annotated[int, typer.Option("--classes", min=1, help="Output classes, background included.")]
ArgOpt = Annotated[list[str] | None, typer.Option("--arg", metavar="KEY=VALUE", help="Model argument, e.g. feature_size=48 (repeatable).")]
VolumeOpt = Annotated[str | None, typer.Option("--volume", help="Whole volume in voxels at the model's spacing, e.g. 512,512,300.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def parse_ints(text: str, what: str, count: int | tuple[int, ...] | None = None, meaning: str = "") -> tuple[int, ...]:
    """'64,64,32,256' -> (64, 64, 32, 256); one clear error for anything else."""
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise MedsegError(f"{what} {text!r}: expected whole numbers separated by commas") from None
    allowed = (count,) if isinstance(count, int) else count
    if allowed is not None and len(values) not in allowed:
        expected = " or ".join(str(a) for a in allowed)
        raise MedsegError(f"{what} {text!r}: expected {expected} numbers{f' ({meaning})' if meaning else ''}, got {len(values)}")
    if any(v <= 0 for v in values):
        raise MedsegError(f"{what} {text!r}: every number must be positive")
    return values


def _model_args(items: list[str] | None) -> dict[str, Any]:
    from medseg.config import parse_override

    args = {}
    for item in items or []:
        keys, value = parse_override(item)
        args[".".join(keys)] = value
    return args


def _resolve_model(model: str | None, bundle: Path | None, roi: str | None, classes: int, arg: list[str] | None):
    """(name, roi, classes, args, bundle or None) from --model/--roi or a bundle."""
    from medseg.models import check_roi, get_spec

    cfg = None
    if bundle is not None:
        from medseg.config import load_bundle

        cfg = load_bundle(bundle)
        name, args = cfg.model.name, {**cfg.model.args, **_model_args(arg)}
        shape = parse_ints(roi, "--roi", 3) if roi else tuple(cfg.train.roi)
        classes = len(cfg.data.labels) + 1
    else:
        name, args = model, _model_args(arg)
        spec = get_spec(name)
        default = (96, 96, 1) if spec.name == "fcn2d" else (96, 96, 96)
        shape = parse_ints(roi, "--roi", 3) if roi else default
    check_roi(name, shape)
    return name, shape, classes, args, cfg


@app.command()
@user_errors
def flops(
    shape: Annotated[str | None, typer.Option("--shape", help="Feature map, spatial sizes then channels (channels last), e.g. 64,64,32,256.")] = None,
    window: Annotated[str, typer.Option("--window", help="Attention window per spatial axis.")] = "8,8,8",
    kernel: Annotated[int, typer.Option("--kernel", min=1, help="Conv3D kernel for the comparison.")] = 3,
    stride: Annotated[int, typer.Option("--stride", min=1, help="Conv3D stride for the comparison.")] = 1,
    conv_input: Annotated[str | None, typer.Option("--conv-input", help="Conv mode: input spatial..., channels, e.g. 256,256,512.")] = None,
    conv_out: Annotated[int, typer.Option("--conv-out", min=1, help="Conv mode: number of kernels (output channels).")] = 1024,
    conv_kernel: Annotated[int, typer.Option("--conv-kernel", min=1, help="Conv mode: kernel size per axis.")] = 2,
    conv_stride: Annotated[int, typer.Option("--conv-stride", min=1, help="Conv mode: stride per axis.")] = 2,
    conv_padding: Annotated[int, typer.Option("--conv-padding", min=0, help="Conv mode: padding per side.")] = 0,
    model: ModelOpt = None,
    bundle: BundleOpt = None,
    roi: RoiOpt = None,
    classes: ClassesOpt = 14,
    arg: ArgOpt = None,
    volume: VolumeOpt = None,
    overlap: Annotated[float, typer.Option("--overlap", help="Sliding-window overlap for --volume.")] = 0.5,
    tta: Annotated[bool, typer.Option("--tta", help="Count mirrored test-time augmentation passes.")] = False,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Patches per training iteration.")] = 4,
    as_json: JsonOpt = False,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a PNG of FLOPs and memory against volume size.")] = None,
) -> None:
    """FLOPs (= 2 x MACs) of global vs windowed self-attention vs Conv3D, of a convolution, or of a model."""
    from medseg.cost.analytic import attention_report, conv_cost, human, human_bytes

    if model or bundle:
        return _model_flops(model, bundle, roi, classes, arg, volume, overlap, tta, batch, as_json)
    if conv_input:
        dims = parse_ints(conv_input, "--conv-input", (2, 3, 4))
        try:
            cost = conv_cost(dims, conv_out, conv_kernel, conv_stride, conv_padding)
        except ValueError as e:
            raise MedsegError(str(e)) from None
        if as_json:
            out.print_json(json.dumps({"convention": "FLOPs = 2 x MACs", **cost.as_dict()}))
            return
        name = f"Conv{cost.dims}D"
        out.print(f"{name}: input {list(cost.input_shape)} -> output {list(cost.output_shape)} (channels last), "
                  f"{conv_out} kernels {list(cost.kernel)}, stride {list(cost.stride)}, padding {list(cost.padding)}")
        out.print(f"parameters {cost.params:,} ({cost.weights:,} weights + {conv_out:,} biases) = {cost.params / 1e6:.1f} M")
        out.print(f"MACs {cost.macs:,}; FLOPs {cost.flops:,} = {human(cost.flops)}  (FLOPs = 2 x MACs)")
        return
    if not shape:
        raise MedsegError("give --shape (attention vs convolution), --conv-input (a convolution) or --model/--bundle (a network)")
    dims = parse_ints(shape, "--shape", 4, "3 spatial sizes then channels, e.g. 64,64,32,256")
    win = parse_ints(window, "--window", 3)
    report = attention_report(dims, win, kernel, stride)
    if plot is not None:
        from medseg.cost.plot import plot_scaling

        plot_scaling(plot, channels=dims[-1], window=win, kernel=kernel)
        report["plot"] = str(plot)
    if as_json:
        out.print_json(json.dumps(report))
        return
    g, w, c = report["global"], report["window"], report["conv"]
    d = dims[-1]
    pad = f", padded to {w['padded_shape']} as Swin does" if w["padded"] else ""
    lines = [
        f"[bold]feature map {list(dims[:-1])} x {d} channels[/bold] (channels last): L = {report['tokens']:,} tokens, d = {d}",
        "FLOPs = 2 x MACs; matrix products and convolutions only (softmax, norms, biases not counted)",
        "",
        "[bold]global self-attention[/bold]  8d²L + 4dL²",
        f"  FLOPs                    {g['flops']:,}  ({human(g['flops'])})",
        f"  attention matrix / head  {human_bytes(g['attention_matrix_bytes_fp32'])} fp32, {human_bytes(g['attention_matrix_bytes_bf16'])} bf16",
        f"[bold]window attention {w['window']}[/bold]  {w['windows']:,} windows x {w['tokens_per_window']:,} tokens{pad}",
        f"  FLOPs                    {w['flops']:,}  ({human(w['flops'])})",
        f"  attention matrix / head  {human_bytes(w['attention_matrix_bytes_fp32'])} fp32, {human_bytes(w['attention_matrix_bytes_bf16'])} bf16"
        " (all windows)",
        f"[bold]Conv3D {'x'.join(str(k) for k in c['kernel'])}, stride {c['stride'][0]}[/bold]  {d} -> {d} channels, "
        f"output {list(c['output_shape'])}, {c['params']:,} parameters",
        f"  FLOPs                    {c['flops']:,}  ({human(c['flops'])})",
        "",
        f"global / window = {report['global_over_window']:.1f}x;  global / Conv3D = {g['flops'] / c['flops']:.1f}x;  "
        f"window / Conv3D = {w['flops'] / c['flops']:.2f}x",
    ]
    for line in lines:
        out.print(line, soft_wrap=True, highlight=False)
    if plot is not None:
        out.print(f"plot: {plot}")


def _model_flops(model, bundle, roi, classes, arg, volume, overlap, tta, batch, as_json) -> None:
    from medseg.cost.analytic import human
    from medseg.cost.counted import model_cost, training_cost, volume_cost

    name, shape, classes, args, cfg = _resolve_model(model, bundle, roi, classes, arg)
    if cfg is not None:
        batch = cfg.train.batch_size * cfg.train.samples_per_volume
    cost = model_cost(name, shape, classes, args)
    report = cost.as_dict()
    report["training_per_iteration"] = training_cost(cost, batch)
    if volume:
        report["inference_volume"] = volume_cost(cost, parse_ints(volume, "--volume", 3), overlap, tta, slice_model=name == "fcn2d")
    if as_json:
        out.print_json(json.dumps(report))
        return
    from rich.table import Table

    table = Table(title=f"{name} at ROI {list(shape)}, {classes} classes: {cost.params:,} parameters ({cost.params / 1e6:.1f} M)")
    table.add_column("module")
    table.add_column("forward FLOPs", justify="right")
    table.add_column("GMACs", justify="right")
    table.add_column("share", justify="right")
    for module, f in cost.per_module.items():
        table.add_row(module, f"{f:,}", f"{f / 2e9:.2f}", f"{100 * f / cost.forward_flops:.1f}%")
    table.add_row("[bold]total[/bold]", f"[bold]{cost.forward_flops:,}[/bold]", f"[bold]{cost.forward_macs / 1e9:.2f}[/bold]", "100%")
    out.print(table)
    t = report["training_per_iteration"]
    out.print(f"forward: {human(cost.forward_flops)} ({cost.forward_macs / 1e9:.2f} GMACs) per window; "
              f"forward + backward counted: {human(cost.train_flops)} per patch "
              f"({cost.train_flops / cost.forward_flops:.2f}x forward)")
    out.print(f"training: {human(t['flops'])} per iteration of {batch} patches "
              f"(3x-forward rule: {human(t['rule_of_thumb_3x_forward'])}); optimizer step not counted")
    if volume:
        v = report["inference_volume"]
        out.print(f"inference on {v['volume']}: {v['windows']} windows (overlap {overlap}) x {v['tta_passes']} pass(es) "
                  f"= {human(v['flops'])}")
    out.print("FLOPs = 2 x MACs, counted with torch FlopCounterMode on the meta device (attention matmuls included).")


@app.command()
@user_errors
def memory(
    model: ModelOpt = None,
    bundle: BundleOpt = None,
    roi: RoiOpt = None,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Training patches per iteration.")] = 2,
    amp: Annotated[bool, typer.Option("--amp", help="Mixed precision (bf16 activations), as training on CUDA uses.")] = False,
    checkpointing: Annotated[bool, typer.Option("--checkpointing", help="Gradient checkpointing.")] = False,
    classes: ClassesOpt = 14,
    arg: ArgOpt = None,
    volume: VolumeOpt = None,
    sw_batch_size: Annotated[int, typer.Option("--sw-batch-size", min=1, help="Windows per forward at inference.")] = 4,
    overlap: Annotated[float, typer.Option("--overlap", help="Sliding-window overlap.")] = 0.25,
    budget: Annotated[str | None, typer.Option("--budget", help="Find the largest ROI and batch that train in this much, e.g. 24GB.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Peak memory of training and inference, traced from the real model on the meta device."""
    from medseg.cost.analytic import human_bytes
    from medseg.cost.memory import inference_memory, parse_bytes, plan_for_budget, training_memory
    from medseg.models import get_spec

    if not (model or bundle):
        raise MedsegError("give --model NAME (or --bundle FILE)")
    name, shape, classes, args, cfg = _resolve_model(model, bundle, roi, classes, arg)
    if cfg is not None:
        batch = cfg.train.batch_size * cfg.train.samples_per_volume
        checkpointing = checkpointing or cfg.train.grad_checkpointing
    train = training_memory(name, shape, batch, classes, args, amp, checkpointing)
    infer = inference_memory(name, shape, sw_batch_size, classes, args, amp,
                             parse_ints(volume, "--volume", 3) if volume else None, overlap)
    report: dict[str, Any] = {"training": train.as_dict(), "inference": infer.as_dict()}
    if budget:
        try:
            limit = parse_bytes(budget)
        except ValueError as e:
            raise MedsegError(f"--budget: {e}") from None
        spec = get_spec(name)
        if name == "fcn2d":
            raise MedsegError("--budget plans 3D ROIs; for fcn2d pick the slice size directly")
        report["budget"] = {"bytes": limit, "roi_multiple": spec.roi_multiple[0],
                            "plans": plan_for_budget(name, limit, spec.roi_multiple[0], classes=classes, args=args, amp=amp,
                                                     checkpointing=checkpointing)}
    if as_json:
        out.print_json(json.dumps(report))
        return
    from rich.table import Table

    for title, est in ((f"training: {name}, ROI {list(shape)}, batch {batch}{', AMP' if amp else ''}"
                        f"{', checkpointing' if checkpointing else ''}", train),
                       (f"inference: sw_batch_size {sw_batch_size}" + (f", volume {volume}" if volume else ""), infer)):
        table = Table(title=title)
        table.add_column("part")
        table.add_column("bytes", justify="right")
        for part, b in est.parts.items():
            table.add_row(part, human_bytes(b))
        table.add_row("[bold]estimated peak[/bold]", f"[bold]{human_bytes(est.total)}[/bold]")
        out.print(table)
    if budget:
        out.print(f"largest isotropic ROI (multiple of {report['budget']['roi_multiple']}) that trains in {budget}:")
        for plan in report["budget"]["plans"]:
            fit = f"{plan['roi']} ({human_bytes(plan['total_bytes'])})" if plan["roi"] else "none fits"
            out.print(f"  batch {plan['batch']}: {fit}")
    out.print("Traced on the meta device (no memory used); allocator caching and fragmentation are not included.")
