"""Cost calculators: exact course numbers, counts equal to the real models, the SDPA trap guarded;
the memory estimate against RSS measured in a fresh process, the AMP trace against the real CUDA
autocast kernels, and the cost CLI's refusals of bad input."""

import contextlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from medseg.cost.analytic import attention_flops, attention_report, conv_cost, window_attention_flops, window_plan
from medseg.cost.counted import count_flops, model_cost, windows_for
from medseg.cost.memory import (
    LiveTensorBytes,
    fake_model,
    inference_memory,
    loss_and_optimizer,
    parse_bytes,
    sliding_window_buffers,
    trace_training,
    training_memory,
)
from medseg.models import create_model


def test_course_attention_numbers():
    assert attention_flops(131_072, 256) == 17_660_905_521_152
    assert window_attention_flops((64, 64, 32), 256, (8, 8, 8)) == 137_438_953_472
    assert window_attention_flops((64, 64, 32), 256, (8, 8, 8)) == 256 * 536_870_912
    report = attention_report((64, 64, 32, 256), (8, 8, 8))
    assert report["tokens"] == 131_072 and report["window"]["windows"] == 256
    assert round(report["global_over_window"], 1) == 128.5
    assert report["global"]["attention_matrix_bytes_fp32"] == 131_072**2 * 4  # 68.7 GB for one head


def test_course_convolution_numbers():
    c2 = conv_cost((256, 256, 512), 1024, 2, 2)
    assert c2.output_shape == (128, 128, 1024)
    assert c2.weights == 2_097_152 and round(c2.params / 1e6, 1) == 2.1
    assert c2.flops == 68_719_476_736 == 2 * c2.macs  # 68.7 GFLOPs
    c3 = conv_cost((256, 256, 64, 512), 1024, 2, 2)
    assert c3.output_shape == (128, 128, 32, 1024)
    assert c3.weights == 4_194_304 and round(c3.params / 1e6, 1) == 4.2
    assert c3.flops == 4_398_046_511_104  # 4.4 TFLOPs
    same = conv_cost((64, 64, 32, 256), 256, 3, 1, "same")
    assert same.output_shape == (64, 64, 32, 256) and same.flops == 2 * 131_072 * 256 * 256 * 27


def test_conv_cost_matches_flop_counter():
    conv = nn.Conv3d(8, 16, 3, stride=2, padding=1)
    x = torch.randn(1, 8, 20, 18, 9)
    with FlopCounterMode(display=False) as fc:
        y = conv(x)
    cost = conv_cost((20, 18, 9, 8), 16, 3, 2, 1)
    assert tuple(y.shape[2:]) == cost.output_shape[:3]
    assert fc.get_total_flops() == cost.flops
    assert sum(p.numel() for p in conv.parameters()) == cost.params


def test_windows_pad_like_swin():
    plan = window_plan((60, 60, 30), (7, 7, 7))
    assert plan.padded == (63, 63, 35) and plan.windows == 9 * 9 * 5
    short = window_plan((4, 64, 64), (8, 8, 8))
    assert short.window == (4, 8, 8) and short.windows == 64


def test_swin_window_attention_block_matches_the_formula():
    """MONAI's own WindowAttention, counted on the meta device, equals windows x (8 d^2 W + 4 d W^2)."""
    from monai.networks.nets.swin_unetr import WindowAttention

    d, heads, window, n_windows = 96, 3, (7, 7, 7), 10
    block = WindowAttention(d, heads, window, qkv_bias=True).to("meta")
    x = torch.empty(n_windows, 343, d, device="meta")
    with FlopCounterMode(display=False) as fc:
        block(x, None)
    assert fc.get_total_flops() == n_windows * attention_flops(343, d)


class SDPAttention(nn.Module):
    """A plain attention layer written with scaled_dot_product_attention (the trap)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


def test_sdpa_trap_is_guarded():
    d, tokens = 64, 256
    layer = SDPAttention(d, 4)
    expected = attention_flops(tokens, d)
    with FlopCounterMode(display=False) as fc:
        layer(torch.randn(1, tokens, d))
    assert fc.get_total_flops() == 8 * d * d * tokens  # on CPU the attention matmuls are silently missing
    counted, _ = count_flops(layer.to("meta"), torch.empty(1, tokens, d, device="meta"))
    assert counted == expected  # medseg counts on the meta device


MODELS = {"vnet": ((32, 32, 32), {}), "unetr": ((32, 32, 32), {"hidden_size": 96, "mlp_dim": 192, "num_heads": 4}),
          "swin_unetr": ((64, 64, 64), {"feature_size": 12}), "fcn2d": ((64, 64, 1), {})}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_parameters_equal_the_real_model(name):
    roi, args = MODELS[name]
    cost = model_cost(name, roi, 5, args)
    real = create_model(name, out_channels=5, roi=roi, **args)
    assert cost.params == sum(p.numel() for p in real.parameters())
    assert cost.forward_flops > 0 and 2.5 < cost.train_flops / cost.forward_flops < 3.5
    assert sum(cost.per_module.values()) == cost.forward_flops


def test_vnet_flops_equal_a_real_cpu_forward():
    roi, args = MODELS["vnet"]
    torch.manual_seed(0)
    real = create_model("vnet", out_channels=5, roi=roi, **args).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        real(torch.randn(1, 1, *roi))
    assert model_cost("vnet", roi, 5, args).forward_flops == fc.get_total_flops()


def test_whole_volume_windows_follow_monai():
    from monai.data.utils import dense_patch_slices

    from medseg.engine.window import scan_interval

    for volume, roi, overlap in (((512, 512, 300), (96, 96, 96), 0.5), ((100, 80, 40), (64, 64, 64), 0.25)):
        padded = tuple(max(v, r) for v, r in zip(volume, roi))
        expected = len(dense_patch_slices(padded, roi, scan_interval(padded, roi, overlap)))
        assert windows_for(volume, roi, overlap) == expected


# -- memory: the trace --------------------------------------------------------------------------
def test_tracker_counts_new_storage_only():
    """Views and in-place results of tensors that existed before tracking are not new memory (the
    old tracker counted a parameter again when a layer took its transpose)."""
    w = torch.randn(256, 256)
    with LiveTensorBytes() as views:
        w.t()
        w[0]
        w.add_(1)
    assert views.peak == 0
    with LiveTensorBytes() as new:
        y = w * 2
        z = w.t() @ y.t()
        del y
    assert new.peak == 2 * w.nbytes and new.live == z.nbytes


SMALL = {"unetr": ((32, 32, 32), {"hidden_size": 96, "mlp_dim": 192, "num_heads": 4}),
         "swin_unetr": ((64, 64, 64), {"feature_size": 12}), "fcn2d": ((64, 64, 1), {})}


@pytest.mark.parametrize("name", ["unetr", "fcn2d"])
def test_fake_tensors_trace_the_tensors_of_a_real_step(name):
    """Two training steps on fake tensors create and free the same tensors as on real ones. This
    checks the tracing, not the memory: that is checked against RSS below."""
    roi, args = (32, 32, 32), {"feature_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4}
    if name == "fcn2d":
        roi, args = SMALL["fcn2d"]
    torch.manual_seed(0)
    real = create_model(name, out_channels=5, roi=roi, **args).train()
    x, y = torch.randn(1, 1, *roi), torch.randint(0, 5, (1, 1, *roi)).float()
    measured = trace_training(real, x, y, *loss_and_optimizer(real))
    fake, mode = fake_model(name, roi, 5, args)
    fake.train()
    with mode:
        fx, fy = torch.empty(1, 1, *roi), torch.zeros(1, 1, *roi)
    traced = trace_training(fake, fx, fy, *loss_and_optimizer(fake))
    assert traced == measured
    trained = [p for p in real.parameters() if p.grad is not None]  # UNETR has layer norms it never uses
    assert traced.optimizer_state == sum(8 * p.numel() + 4 for p in trained)  # AdamW: two moments and a step count


def _rss_growth(code: str) -> int:
    """Peak RSS growth (bytes) of ``code`` run in a fresh interpreter after a baseline taken once
    ``setup`` ran; ``code`` is 'setup ||| measured part'."""
    setup, work = code.split("|||")
    script = (f"import gc, json\n{setup}\n"
              "def kib(field):\n"
              "    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith(field + ':'))\n"
              "gc.collect()\nopen('/proc/self/clear_refs', 'w').write('5')\nbase = kib('VmRSS')\n"
              f"{work}\nprint(kib('VmHWM') - base)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


rss = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the RSS high-water mark")


@rss
def test_monai_window_buffers_against_rss():
    """MONAI's sliding window on a 160x160x96 volume, 14 classes: the estimate of what it adds to
    the process (output, count map then argmax, labels, window batches) against the peak RSS growth
    of a fresh process. Independent of the estimate: the kernel's count of resident pages."""
    volume, roi, sw, classes = (160, 160, 96), (64, 64, 64), 2, 14
    setup = (f"import torch, monai.inferers\nfrom medseg.engine.window import monai_sliding_window\n"
             f"torch.manual_seed(0)\nnet = torch.nn.Conv3d(1, {classes}, 3, padding=1)\nx = torch.randn(1, 1, *{volume})\n"
             f"with torch.no_grad():\n    net(torch.randn({sw}, 1, *{roi}))")
    work = f"with torch.no_grad():\n    monai_sliding_window(x, {roi}, {sw}, net, overlap=0.25)"
    measured = _rss_growth(setup + "|||" + work)
    parts = sliding_window_buffers(classes, volume, roi, 0.25, "monai", resample="nearest")  # the window alone, as run here
    window = sw * math.prod(roi) * 4
    expected = sum(parts.values()) - parts["input volume (float32)"] + window + 2 * classes * window  # two batches of logits
    assert 0.9 < measured / expected < 1.5, (measured, expected)


@rss
@pytest.mark.slow
def test_training_step_against_rss():
    """One V-Net training step at 32^3 (fresh process, benchmarks/memory_estimate.py's worker):
    the traced peak of the step against the peak RSS growth."""
    case = {"model": "vnet", "args": {}, "roi": [32, 32, 32], "batch": 1, "classes": 14, "cuda": False, "amp": False}
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_estimate.py"
    done = subprocess.run([sys.executable, str(script), "--worker", "train", json.dumps(case)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.splitlines()[-1])
    fake, mode = fake_model("vnet", (32, 32, 32), 14)
    fake.train()
    with mode:
        x, y = torch.empty(1, 1, 32, 32, 32), torch.zeros(1, 1, 32, 32, 32)
    est = trace_training(fake, x, y, *loss_and_optimizer(fake))
    assert 0.85 < measured["step1"] / est.first_step < 1.4, (measured, est)
    assert 0.85 < measured["steps12"] / est.steady < 1.4, (measured, est)


# -- memory: AMP as CUDA autocast runs it ---------------------------------------------------------
def test_autocast_policy_covers_every_cuda_autocast_op():
    """Every op this torch autocasts on CUDA has a policy here (a new torch that adds one fails)."""
    from medseg.cost.autocast import POLICY, ops_with_kernel

    assert ops_with_kernel("AutocastCUDA") == set(POLICY)


class _DtypeLog(TorchDispatchMode):
    """(op, input dtypes, first output dtype) of every op; the CUDA and CPU fake kernels differ in
    the dtype of batch norm's saved statistics and in a few layout clones, which are left out."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if name not in ("prim.device.default", "aten.empty.memory_format", "aten.clone.default"):
            first = tree_flatten(out)[0][:1]
            self.ops.append((name, tuple(str(a.dtype) for a in args if isinstance(a, torch.Tensor)),
                             str(first[0].dtype) if first and isinstance(first[0], torch.Tensor) else None))
        return out


class _CudaIndexing(TorchFunctionMode):
    """Python indexing, permute and contiguous on a fake CUDA tensor ask for a CUDA device guard,
    which a CPU build lacks; the same views through aten ops do not."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__getitem__:
            return self._index(*args)
        if func is torch.Tensor.__setitem__:
            view = self._index(args[0], args[1])
            return view.copy_(args[2]) if isinstance(args[2], torch.Tensor) else view.fill_(args[2])
        if func is torch.Tensor.permute:
            dims = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
            return torch.permute(args[0], tuple(dims))
        if func is torch.Tensor.contiguous:
            return args[0] if args[0].is_contiguous() else torch.ops.aten.clone.default(args[0], memory_format=torch.contiguous_format)
        return func(*args, **(kwargs or {}))

    @staticmethod
    def _index(x, idx):
        idx = idx if isinstance(idx, tuple) else (idx,)
        if any(isinstance(i, torch.Tensor) for i in idx):
            return torch.ops.aten.index.Tensor(x, [i if isinstance(i, torch.Tensor) else None for i in idx])
        dim = 0
        for i in idx:
            if i is Ellipsis:
                dim += x.ndim - dim - sum(j is not None and j is not Ellipsis for j in idx[idx.index(i) + 1:])
            elif i is None:
                x, dim = x.unsqueeze(dim), dim + 1
            elif isinstance(i, int):
                x = x.select(dim, i)
            else:
                start, stop, step = i.indices(x.shape[dim])
                x, dim = torch.ops.aten.slice.Tensor(x, dim, start, stop, step), dim + 1
        return x


def _forward_dtypes(name: str, device: str, autocast) -> list[tuple]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    roi, args = SMALL.get(name, MODELS.get(name))
    model = create_model(name, out_channels=5, roi=roi, **args).to("meta").eval()
    with FakeTensorMode(allow_non_fake_inputs=True):
        model._apply(lambda t: torch.empty_like(t, device=device))
        model.requires_grad_(False)  # autograd on CUDA tensors needs the CUDA build: forward only
        x = torch.empty(1, 1, *roi, device=device)
        log = _DtypeLog()
        with torch.no_grad(), autocast(), _CudaIndexing(), log:
            model(x)
    return log.ops


@contextlib.contextmanager
def _real_cuda_autocast():
    """torch.autocast("cuda") refuses to start without a GPU; its CUDA kernels are in every build."""
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", torch.bfloat16)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        torch.autocast_decrement_nesting()
        torch.set_autocast_enabled("cuda", False)
        torch.clear_autocast_cache()


@pytest.mark.parametrize("name", ["vnet", "unetr", "swin_unetr", "fcn2d"])
def test_amp_trace_casts_as_cuda_autocast(name):
    """Op by op, the forward under medseg's policy on CPU tensors runs in the dtypes the real
    AutocastCUDA kernels choose on (fake) CUDA tensors. CPU's own autocast does not (softmax,
    layer norm and upsampling stay bf16 there), which is why the policy exists."""
    from medseg.cost.autocast import cuda_autocast

    cuda = _forward_dtypes(name, "cuda", _real_cuda_autocast)
    assert any("bfloat16" in str(op) for op in cuda)
    assert _forward_dtypes(name, "cpu", cuda_autocast) == cuda
    if name == "swin_unetr":
        cpu_own = _forward_dtypes(name, "cpu", lambda: torch.autocast("cpu", dtype=torch.bfloat16))
        assert cpu_own != cuda
        assert ("aten._softmax.default", ("torch.float32",), "torch.float32") in cuda


def test_amp_keeps_attention_in_float32():
    """Under CUDA autocast Swin UNETR saves its attention probabilities in float32 (softmax) and
    again in bf16 (for the next matmul), so its AMP step needs more than fp32 at this width. The
    old model, the whole network cast to bf16, said AMP needed less."""
    roi, args = SMALL["swin_unetr"]
    key = "gradients, activations, temporaries (traced)"
    fp32 = training_memory("swin_unetr", roi, 2, 5, args).device[key]
    amp = training_memory("swin_unetr", roi, 2, 5, args, amp=True).device[key]
    assert amp > fp32
    vnet_fp32 = training_memory("vnet", (32, 32, 32), 2, 5).device[key]
    assert training_memory("vnet", (32, 32, 32), 2, 5, amp=True).device[key] <= vnet_fp32  # convolutions only: bf16 helps


def test_cuda_policy_is_removed_on_exit():
    from medseg.cost.autocast import cuda_autocast

    x = torch.randn(4, 4, dtype=torch.bfloat16)
    with cuda_autocast():
        assert torch.softmax(x, 1).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.softmax(x, 1).dtype == torch.bfloat16  # CPU autocast's own rule is back


# -- memory: where it lives -----------------------------------------------------------------------
def test_training_memory_parts_live_on_the_device():
    roi, args = MODELS["unetr"]
    est = training_memory("unetr", roi, batch=2, classes=5, args=args)
    params = est.params
    assert est.device["parameters and buffers (float32)"] >= 4 * params
    assert 7.9 * params < est.device["optimizer state (AdamW)"] < 8.1 * params  # two moments (UNETR leaves a few norms unused)
    assert est.host == {"batch as loaded, before .to(device)": 2 * 2 * 32**3 * 4} and est.cuda_only == set(est.host)
    assert est.cpu_total == est.device_total  # on a CPU run the batch is not copied


def test_linear_resampling_keeps_float16_probabilities_while_they_fit():
    small, big = (160, 160, 96), (512, 512, 400)
    key = "class probabilities for linear resampling (float16)"
    assert sliding_window_buffers(14, small, (64,) * 3, 0.25, "stream")[key] == 14 * math.prod(small) * 2  # auto: linear
    assert key not in sliding_window_buffers(14, big, (64,) * 3, 0.25, "stream")  # auto falls back to nearest (> 1 GiB)
    assert key not in sliding_window_buffers(14, small, (64,) * 3, 0.25, "stream", resample="nearest")
    assert sliding_window_buffers(14, big, (64,) * 3, 0.25, "stream", resample="linear")[key] == 14 * math.prod(big) * 2


def test_inference_buffers_live_on_the_host():
    roi, args = MODELS["unetr"]
    volume = (512, 512, 400)
    monai = inference_memory("unetr", roi, 2, 14, args, volume=volume, method="monai")
    stream = inference_memory("unetr", roi, 2, 14, args, volume=volume, method="stream")
    voxels = 512 * 512 * 400
    assert monai.host["MONAI output (float32, classes x volume)"] == 14 * voxels * 4
    assert monai.host["input volume (float32)"] == stream.host["input volume (float32)"] == voxels * 4
    assert max(monai.device.values()) < voxels  # nothing volume-sized on the GPU
    assert monai.cpu_total == monai.device_total + monai.host_total
    assert stream.host_total < monai.host_total / 4
    assert stream.device_total < monai.device_total  # MONAI keeps the previous batch's logits on the device


def test_memory_responds_to_roi_batch_and_checkpointing():
    roi, args = MODELS["unetr"]
    base = training_memory("unetr", roi, 1, 5, args).device_total
    assert training_memory("unetr", (64, 64, 64), 1, 5, args).device_total > base
    assert training_memory("unetr", roi, 4, 5, args).device_total > base
    assert training_memory("unetr", roi, 4, 5, args, checkpointing=True).device_total < training_memory("unetr", roi, 4, 5, args).device_total


def test_budget_planner_finds_the_largest_fitting_roi(monkeypatch):
    """The bisection, against a stand-in estimate: bytes = batch x side^3."""
    import medseg.cost.memory as memory

    def fake_training_memory(name, roi, batch, *rest):
        return memory.MemoryEstimate(name, tuple(roi), batch, False, False, 0, device={"all": batch * roi[0] ** 3})

    monkeypatch.setattr(memory, "training_memory", fake_training_memory)
    plans = memory.plan_for_budget("vnet", 100**3, 16, batches=(1, 2, 4, 1000))
    assert [(p["batch"], p["roi"]) for p in plans] == [(1, [96] * 3), (2, [64] * 3), (4, [48] * 3), (1000, None)]


def test_parse_bytes():
    assert parse_bytes("24GB") == 24 * 10**9 and parse_bytes("80GiB") == 80 * 2**30 and parse_bytes("512 MB") == 512 * 10**6
    assert parse_bytes("1.5 TB") == 1_500_000_000_000 and parse_bytes("100B") == 100
    for bad in ("lots", "-3GB", "12XB", "0GB"):
        with pytest.raises(ValueError, match="size"):
            parse_bytes(bad)
    for bare in ("24", "1e9"):  # 24 bytes was never meant
        with pytest.raises(ValueError, match="no unit"):
            parse_bytes(bare)


def test_flops_cli(cli, tmp_path):
    result = cli("flops", "--shape", "64,64,32,256")
    assert result.exit_code == 0, result.output
    for number in ("17,660,905,521,152", "137,438,953,472", "128.5x", "FLOPs = 2 x MACs"):
        assert number in result.output
    data = json.loads(cli("flops", "--shape", "64,64,32,256", "--json").output)
    assert data["global"]["flops"] == 17_660_905_521_152 and data["window"]["flops"] == 137_438_953_472
    conv = cli("flops", "--conv-input", "256,256,64,512", "--conv-out", "1024", "--conv-kernel", "2", "--conv-stride", "2")
    assert "4,398,046,511,104" in conv.output and "4.2 M" in conv.output
    padded = cli("flops", "--shape", "60,60,30,96", "--window", "7,7,7")
    assert "padded to [63, 63, 35]" in padded.output
    plot = cli("flops", "--shape", "64,64,32,256", "--plot", tmp_path / "scaling.png")
    assert plot.exit_code == 0 and (tmp_path / "scaling.png").stat().st_size > 20_000
    model = cli("flops", "--model", "unetr", "--roi", "32,32,32", "--arg", "hidden_size=96", "--arg", "mlp_dim=192",
                "--arg", "num_heads=4", "--volume", "100,100,60", "--overlap", "0.5", "--tta", "--json")
    report = json.loads(model.output)
    assert report["inference_volume"]["tta_passes"] == 8
    assert report["inference_volume"]["flops"] == report["inference_volume"]["windows"] * 8 * report["forward_flops"]


SMALL_UNETR = ["--model", "unetr", "--roi", "32,32,32", "--arg", "hidden_size=96", "--arg", "mlp_dim=192", "--arg", "num_heads=4"]


def _bad_bundle(tmp_path: Path) -> Path:
    raw = json.loads(Path(__file__).resolve().parents[1].joinpath("bundles", "swin_unetr.json").read_text())
    raw["model"]["args"]["feature_size"] = "abc"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize("args, needle", [
    (["--shape", "64,64,32"], "expected 4 numbers"),
    (["--shape", "64,0,32,256"], "must be positive"),
    (["--shape", "64,-2,32,256"], "must be positive"),
    (["--shape", "64,6.5,32,256"], "whole numbers"),
    (["--shape", "64,64,32,256", "--window", "8,8"], "expected 3 numbers"),
    (["--model", "swinunetr"], "did you mean 'swin_unetr'"),
    (["--model", "swin_unetr", "--roi", "96,96,80"], "multiple of [32, 32, 32]"),
    ([], "give --shape"),
    (["--model", "swin_unetr", "--arg", "feature_size=abc"], "feature_size"),
    (["--bundle", "BAD_BUNDLE"], "feature_size"),
    ([*SMALL_UNETR, "--volume", "100,100,60", "--overlap", "1.0"], "--overlap must be in [0, 1)"),
    ([*SMALL_UNETR, "--overlap", "-0.1"], "--overlap must be in [0, 1)"),
    ([*SMALL_UNETR, "--plot", "PLOT"], "--plot draws the --shape comparison"),
    (["--conv-input", "256,256,512", "--plot", "PLOT"], "--plot draws the --shape comparison"),
    (["--model", "vnet", "--bundle", "bundles/unetr.json"], "not --model and --bundle"),
    (["--shape", "64,64,32,256", "--model", "vnet"], "give one of --shape, --conv-input or --model"),
    (["--run", "NO_RUN"], "not a medseg run directory"),
])
def test_flops_cli_errors(cli, tmp_path, args, needle):
    args = [{"BAD_BUNDLE": _bad_bundle(tmp_path), "PLOT": tmp_path / "p.png", "NO_RUN": tmp_path}.get(a, a) for a in args]
    result = cli("flops", *args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], result.output
    assert "Traceback" not in result.output and not (tmp_path / "p.png").exists()


@pytest.mark.parametrize("args, needle", [
    (["--model", "unetr", "--budget", "lots"], "cannot read 'lots'"),
    (["--model", "unetr", "--budget", "24"], "no unit"),
    ([*SMALL_UNETR, "--arg", "feature_size=abc"], "feature_size"),
    (["--bundle", "BAD_BUNDLE"], "feature_size"),
    ([*SMALL_UNETR, "--overlap", "1"], "--overlap must be in [0, 1)"),
    (["--model", "vnet", "--bundle", "bundles/unetr.json"], "not --model and --bundle"),
    (["--bundle", "bundles/unetr.json", "--run", "NO_RUN"], "not --bundle and --run"),
    ([], "give --model"),
])
def test_memory_cli_errors(cli, tmp_path, args, needle):
    args = [{"BAD_BUNDLE": _bad_bundle(tmp_path), "NO_RUN": tmp_path}.get(a, a) for a in args]
    result = cli("memory", *args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], result.output


def test_memory_cli(cli):
    result = cli("memory", *SMALL_UNETR, "--batch", "2", "--volume", "200,200,100", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    train, infer = report["training"], report["inference"]
    assert train["device_total_bytes"] > train["device_bytes"]["parameters and buffers (float32)"]
    assert train["cpu_run_total_bytes"] == train["device_total_bytes"]
    assert "input volume (float32)" in infer["host_bytes"]
    assert infer["cpu_run_total_bytes"] == infer["device_total_bytes"] + infer["host_total_bytes"]
    text = cli("memory", *SMALL_UNETR, "--volume", "200,200,100")
    assert text.exit_code == 0 and "GPU (device)" in text.output and "host RAM" in text.output
    assert "on a CPU run both are RAM" in text.output


@pytest.mark.slow
def test_memory_cli_budget(cli):
    result = cli("memory", *SMALL_UNETR, "--budget", "2GB", "--json")
    assert result.exit_code == 0, result.output
    plans = json.loads(result.output)["budget"]["plans"]
    assert [p["batch"] for p in plans] == [1, 2, 4]
    fitting = [p for p in plans if p["roi"]]
    assert fitting and all(p["device_bytes"] <= 2 * 10**9 for p in fitting)
    assert all(p["roi"][0] % 16 == 0 for p in fitting)
    assert [p["roi"][0] for p in fitting] == sorted((p["roi"][0] for p in fitting), reverse=True)


def test_cost_cli_reads_a_run_directory(cli, tmp_path):
    """--run takes model, arguments, ROI, classes, batch and AMP from the run's own bundle.json."""
    from medseg import RUN_FORMAT_VERSION
    from medseg.config import load_bundle

    bundle = load_bundle("bundles/unetr.json", ["model.args.hidden_size=96", "model.args.mlp_dim=192", "model.args.num_heads=4",
                                                "train.roi=[32,32,32]", "train.batch_size=2", "train.samples_per_volume=3",
                                                'data.ct_stats={"low": -150, "high": 250, "mean": 40, "std": 60}'])  # as planned
    run = tmp_path / "UNETR-run01"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"format_version": RUN_FORMAT_VERSION, "name": run.name, "status": "complete"}))
    (run / "bundle.json").write_text(json.dumps(bundle.to_dict()))
    flops = json.loads(cli("flops", "--run", run, "--json").output)
    same = json.loads(cli("flops", *SMALL_UNETR, "--classes", "5", "--batch", "6", "--json").output)
    assert flops["model"] == "unetr" and flops["roi"] == [32, 32, 32] and flops["classes"] == 5
    assert flops["forward_flops"] == same["forward_flops"] and flops["training_per_iteration"]["patches_per_iteration"] == 6
    memory = json.loads(cli("memory", "--run", run, "--json").output)
    assert memory["training"]["batch"] == 6 and memory["training"]["amp"] is True  # the bundle trains with AMP
    both = cli("memory", "--run", run, "--model", "unetr")
    assert both.exit_code == 2 and "not --model and --run" in both.output


def test_analytic_flops_import_no_torch():
    """``medseg flops --shape`` answers without importing torch (or numpy)."""
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom medseg.cli import app\n"
            "r = CliRunner().invoke(app, ['flops', '--shape', '64,64,32,256'])\n"
            "assert r.exit_code == 0 and '17,660,905,521,152' in r.output, r.output\n"
            "print(sorted(m for m in ('torch', 'numpy', 'monai') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_tracing_a_big_step_allocates_no_real_memory():
    """MONAI's one-hot target used to be a real tensor in the trace: batch 4 x 14 classes x 256^3
    float32 is 3.8 GB of real RAM for a number that should cost nothing (the OOM killer ended
    `medseg memory --budget` on large budgets). Peak RSS of a fresh process, after the imports."""
    code = ("import resource, torch\nfrom medseg.cost.memory import training_memory\n"
            "training_memory('vnet', (32,) * 3, 1, 14, {})\n"
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "est = training_memory('vnet', (256,) * 3, 4, 14, {})\n"
            "print(est.device_total, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    estimate, grown = (int(v) for v in done.stdout.split()[-2:])
    assert estimate > 4 * 14 * 256**3 * 4  # the one-hot target is counted ...
    assert grown < 600 * 2**20, grown / 2**20  # ... but never allocated
