"""``medseg flops`` and ``medseg memory``: what a model and a volume cost, before renting a GPU.

The analytic mode (``--shape``, ``--conv-input``) imports no torch and answers in well under a
second; the model modes trace the real model (FLOPs on the meta device, memory on fake tensors).
The model comes from exactly one of ``--model``, ``--bundle`` and ``--run`` (a trained run's own
bundle.json, the one source of truth for what it was trained as).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from medseg.cli_common import app, out, print_table, user_errors
from medseg.errors import MedsegError

ModelOpt = Annotated[str | None, typer.Option("--model", help="A registered model (medseg models).")]
BundleOpt = Annotated[Path | None, typer.Option("--bundle", help="Take model, arguments, ROI, classes, batch and AMP from a bundle.")]
RunOpt = Annotated[Path | None, typer.Option("--run", help="Take them from a trained run directory (its bundle.json).")]
RoiOpt = Annotated[str | None, typer.Option("--roi", help="Window / patch size, e.g. 96,96,96 (default: the bundle's, else 96^3).")]
ClassesOpt = Annotated[int | None, typer.Option("--classes", min=1, help="Output classes, background included (default: the "
                                                                         "bundle's labels + 1, else 14).")]
ArgOpt = Annotated[list[str] | None, typer.Option("--arg", metavar="KEY=VALUE", help="Model argument, e.g. feature_size=48 (repeatable).")]
VolumeOpt = Annotated[str | None, typer.Option("--volume", help="Whole volume in voxels at the model's spacing, e.g. 512,512,300.")]
OverlapOpt = Annotated[float | None, typer.Option("--overlap", help="Sliding-window overlap in [0, 1) (default: the bundle's, else 0.25).")]
JsonOpt = Annotated[bool, typer.Option("--json", metavar="", help="Print JSON for scripts.")]


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


def _overlap(value: float | None, cfg) -> float:
    overlap = value if value is not None else (cfg.sliding_window.overlap if cfg is not None else 0.25)
    if not 0 <= overlap < 1:
        raise MedsegError(f"--overlap must be in [0, 1), got {overlap}")
    return overlap


@dataclass
class Target:
    """What a cost is asked for: a registered model with its arguments, ROIs and classes."""

    name: str
    roi: tuple[int, ...]  # training patch
    infer_roi: tuple[int, ...]  # sliding window
    classes: int
    args: dict[str, Any]
    cfg: Any  # the bundle (from --bundle or --run), or None


def _resolve_model(model: str | None, bundle: Path | None, run: Path | None, roi: str | None, classes: int | None,
                   arg: list[str] | None) -> Target:
    """The target from exactly one of --model, --bundle and --run; --roi, --classes and --arg override a bundle's."""
    from medseg.models import check_roi, get_spec

    given = [opt for opt, value in (("--model", model), ("--bundle", bundle), ("--run", run)) if value is not None]
    if len(given) > 1:
        raise MedsegError(f"give one of --model, --bundle or --run, not {' and '.join(given)}")
    cfg = None
    if run is not None:
        from medseg.engine.run import Run

        cfg = Run.open(run).bundle
    elif bundle is not None:
        from medseg.config import load_bundle

        cfg = load_bundle(bundle)
    shape = parse_ints(roi, "--roi", 3) if roi else None
    if cfg is not None and cfg.train.roi == "auto" and shape is None:
        raise MedsegError('this bundle\'s train.roi is "auto" (planned from the data when it trains): give --roi, '
                          'or see the planned ROI with `medseg plan DATA --bundle ...`')
    if cfg is not None:
        name, args = cfg.model.name, {**cfg.model.args, **_model_args(arg)}
        train_roi, infer_roi = shape or tuple(cfg.train.roi), shape or tuple(cfg.infer_roi)
        classes = classes or len(cfg.data.labels) + 1
    else:
        name, args = model, _model_args(arg)
        spec = get_spec(name)
        train_roi = infer_roi = shape or ((96, 96, 1) if spec.axial_slices else (96, 96, 96))
        classes = classes or 14
    check_roi(name, train_roi)
    check_roi(name, infer_roi)
    return Target(name, train_roi, infer_roi, classes, args, cfg)


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
    run: RunOpt = None,
    roi: RoiOpt = None,
    classes: ClassesOpt = None,
    arg: ArgOpt = None,
    volume: VolumeOpt = None,
    overlap: OverlapOpt = None,
    tta: Annotated[bool, typer.Option("--tta", metavar="", help="Count mirrored test-time augmentation passes.")] = False,
    batch: Annotated[int | None, typer.Option("--batch", min=1, help="Patches per training iteration (default: the bundle's "
                                                                     "batch x samples per volume, else 4).")] = None,
    as_json: JsonOpt = False,
    plot: Annotated[Path | None, typer.Option("--plot", help="With --shape: write a PNG of FLOPs and memory against volume size.")] = None,
) -> None:
    """FLOPs (= 2 x MACs) of global vs windowed self-attention vs Conv3D, of a convolution, or of a model."""
    from medseg.cost.analytic import attention_report, conv_cost, human, human_bytes

    modes = [m for m, given in (("--shape", shape), ("--conv-input", conv_input), ("--model/--bundle/--run", model or bundle or run))
             if given]
    if len(modes) > 1:
        raise MedsegError(f"give one of --shape, --conv-input or --model/--bundle/--run, not {' and '.join(modes)}")
    if plot is not None and not shape:
        raise MedsegError("--plot draws the --shape comparison (attention vs convolution against volume size); "
                          "it does not apply to --conv-input or a model")
    if model or bundle or run:
        return _model_flops(_resolve_model(model, bundle, run, roi, classes, arg), volume, overlap, tta, batch, as_json)
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


def _model_flops(target: Target, volume, overlap, tta, batch, as_json) -> None:
    from medseg.cost.analytic import human
    from medseg.cost.counted import model_cost, training_cost, volume_cost
    from medseg.models import get_spec

    name, shape, classes, args, cfg = target.name, target.roi, target.classes, target.args, target.cfg
    overlap = _overlap(overlap, cfg)
    if batch is None:
        batch = (cfg.train.batch_size if cfg.train.batch_size != "auto" else 1) * cfg.train.samples_per_volume if cfg is not None else 4
    vol = parse_ints(volume, "--volume", 3) if volume else None
    cost = model_cost(name, shape, classes, args)
    report = cost.as_dict()
    report["training_per_iteration"] = training_cost(cost, batch)
    if vol:
        window = model_cost(name, target.infer_roi, classes, args) if target.infer_roi != shape else cost
        report["inference_volume"] = volume_cost(window, vol, overlap, tta, slice_model=get_spec(name).axial_slices)
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
    print_table(table)
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
    run: RunOpt = None,
    roi: RoiOpt = None,
    batch: Annotated[int | None, typer.Option("--batch", min=1, help="Training patches per iteration (default: the bundle's "
                                                                     "batch x samples per volume, else 2).")] = None,
    amp: Annotated[bool | None, typer.Option("--amp/--no-amp", metavar="", help="bf16 autocast as on a GPU (default: the bundle's train.amp, "
                                                                    "else off).")] = None,
    checkpointing: Annotated[bool | None, typer.Option("--checkpointing/--no-checkpointing", metavar="", help="Gradient checkpointing "
                                                                                                  "(default: the bundle's).")] = None,
    classes: ClassesOpt = None,
    arg: ArgOpt = None,
    volume: VolumeOpt = None,
    sw_batch_size: Annotated[int | None, typer.Option("--sw-batch-size", min=1, help="Windows per forward at inference "
                                                                                     "(default: the bundle's, else 4).")] = None,
    overlap: OverlapOpt = None,
    budget: Annotated[str | None, typer.Option("--budget", help="GPU memory: the largest ROI for each batch size whose training "
                                                                "step fits, e.g. 24GB or 80GiB (a unit is required).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Peak memory of a training step and of inference, on the GPU and in host RAM, traced from the real model."""
    from medseg.cost.memory import inference_memory, parse_bytes, plan_for_budget, training_memory
    from medseg.models import get_spec

    if not (model or bundle or run):
        raise MedsegError("give --model NAME, --bundle FILE or --run RUN_DIR")
    limit = None
    if budget:
        try:
            limit = parse_bytes(budget)
        except ValueError as e:
            raise MedsegError(f"--budget: {e}") from None
    target = _resolve_model(model, bundle, run, roi, classes, arg)
    name, cfg = target.name, target.cfg
    if limit is not None and get_spec(name).axial_slices:
        raise MedsegError(f"--budget plans 3D ROIs; for {name} pick the slice size directly")
    overlap = _overlap(overlap, cfg)
    vol = parse_ints(volume, "--volume", 3) if volume else None
    train_cfg = cfg.train if cfg is not None else None
    if batch is None:
        volumes = train_cfg.batch_size if train_cfg and train_cfg.batch_size != "auto" else 1
        batch = volumes * train_cfg.samples_per_volume if train_cfg else 2
    amp = amp if amp is not None else bool(train_cfg and train_cfg.amp)
    checkpointing = checkpointing if checkpointing is not None else bool(train_cfg and train_cfg.grad_checkpointing)
    sw_batch_size = sw_batch_size or (cfg.sliding_window.sw_batch_size if cfg is not None else 4)
    train = training_memory(name, target.roi, batch, target.classes, target.args, amp, checkpointing, train_cfg)
    infer = inference_memory(name, target.infer_roi, sw_batch_size, target.classes, target.args, amp, vol, overlap)
    report: dict[str, Any] = {"training": train.as_dict(), "inference": infer.as_dict()}
    if limit is not None:
        multiple = get_spec(name).roi_multiple[0]
        report["budget"] = {"device_bytes": limit, "roi_multiple": multiple,
                            "plans": plan_for_budget(name, limit, multiple, classes=target.classes, args=target.args, amp=amp,
                                                     checkpointing=checkpointing, train_cfg=train_cfg)}
    if as_json:
        out.print_json(json.dumps(report))
        return
    _print_memory(name, train, infer, volume, report.get("budget"), budget)


def _print_memory(name: str, train, infer, volume: str | None, plan: dict | None, budget: str | None) -> None:
    from rich.table import Table

    from medseg.cost.analytic import human_bytes

    titles = (f"training step: {name}, ROI {list(train.roi)}, batch {train.batch}{', AMP (bf16 autocast)' if train.amp else ''}"
              f"{', checkpointing' if train.checkpointing else ''}",
              f"inference: ROI {list(infer.roi)}, sw_batch_size {infer.batch}{', AMP' if infer.amp else ''}"
              + (f", volume {volume}" if volume else ""))
    for title, est in zip(titles, (train, infer)):
        table = Table(title=title)
        table.add_column("part")
        table.add_column("GPU (device)", justify="right")
        table.add_column("host RAM", justify="right")
        for part, b in est.device.items():
            table.add_row(part, human_bytes(b), "")
        for part, b in est.host.items():
            table.add_row(part + (" *" if part in est.cuda_only else ""), "", human_bytes(b))
        table.add_row("[bold]estimated peak[/bold]", f"[bold]{human_bytes(est.device_total)}[/bold]", f"[bold]{human_bytes(est.host_total)}[/bold]")
        print_table(table)
        if est.amp:
            out.print("a CPU run uses no AMP: --no-amp gives its RAM (GPU and host parts together)", highlight=False)
        else:
            marked = " (the parts marked * are copies that exist only with a GPU)" if est.cuda_only else ""
            out.print(f"on a CPU run both are RAM: {human_bytes(est.cpu_total)}{marked}", highlight=False)
    if plan:
        out.print(f"largest isotropic ROI (multiple of {plan['roi_multiple']}) whose training step fits {budget} of GPU memory:")
        for p in plan["plans"]:
            fit = f"{p['roi']} ({human_bytes(p['device_bytes'])})" if p["roi"] else "none fits"
            out.print(f"  batch {p['batch']}: {fit}")
    out.print("Traced on fake tensors (nothing computed). Not included: allocator caching and fragmentation, cuDNN/oneDNN "
              "workspaces, the CUDA context (~0.5 GB), the data loader, Python + torch themselves (~0.5 GB of RAM).")
