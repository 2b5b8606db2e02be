"""Cost calculators: exact course numbers, counts equal to the real models, the SDPA trap guarded,
and the memory trace equal to a trace of a real CPU pass."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from medseg.cost.analytic import attention_flops, attention_report, conv_cost, window_attention_flops, window_plan
from medseg.cost.counted import count_flops, model_cost, windows_for
from medseg.cost.memory import inference_memory, parse_bytes, trace_peak, training_memory
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


@pytest.mark.parametrize("name", ["vnet", "unetr", "swin_unetr"])
def test_memory_trace_equals_a_real_cpu_forward_backward(name):
    """The estimate's activation term (meta trace) against the same lifetime tracker on a real CPU pass."""
    roi, args = MODELS[name]
    torch.manual_seed(0)
    real = create_model(name, out_channels=5, roi=roi, **args).train()
    measured = trace_peak(real, torch.randn(2, 1, *roi), backward=True)
    estimate = training_memory(name, roi, batch=2, classes=5, args=args)
    traced = estimate.parts["activations + gradients (traced)"]
    assert abs(traced - measured) / measured < 0.15
    params = sum(p.numel() for p in real.parameters())
    assert estimate.parts["parameters"] == 4 * params and estimate.parts["optimizer_state (AdamW)"] == 8 * params


def test_memory_responds_to_roi_batch_amp_and_checkpointing():
    base = training_memory("swin_unetr", (64, 64, 64), 1, 5, {"feature_size": 12}).total
    assert training_memory("swin_unetr", (96, 96, 96), 1, 5, {"feature_size": 12}).total > 2 * base * 0.8
    assert training_memory("swin_unetr", (64, 64, 64), 2, 5, {"feature_size": 12}).total > base
    assert training_memory("swin_unetr", (64, 64, 64), 1, 5, {"feature_size": 12}, amp=True).total < base
    assert training_memory("swin_unetr", (64, 64, 64), 1, 5, {"feature_size": 12}, checkpointing=True).total < base
    big = inference_memory("unetr", (32, 32, 32), 2, 14, MODELS["unetr"][1], volume=(512, 512, 400), method="monai")
    small = inference_memory("unetr", (32, 32, 32), 2, 14, MODELS["unetr"][1], volume=(512, 512, 400), method="stream")
    assert big.parts["MONAI output + count map (float32)"] == 15 * 512 * 512 * 400 * 4
    assert small.total < big.total / 4


def test_parse_bytes():
    assert parse_bytes("24GB") == 24 * 10**9 and parse_bytes("80GiB") == 80 * 2**30 and parse_bytes("512 MB") == 512 * 10**6
    for bad in ("lots", "-3GB", "12XB"):
        with pytest.raises(ValueError):
            parse_bytes(bad)


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


@pytest.mark.parametrize("args, needle", [
    (["--shape", "64,64,32"], "expected 4 numbers"),
    (["--shape", "64,0,32,256"], "must be positive"),
    (["--shape", "64,-2,32,256"], "must be positive"),
    (["--shape", "64,6.5,32,256"], "whole numbers"),
    (["--shape", "64,64,32,256", "--window", "8,8"], "expected 3 numbers"),
    (["--model", "swinunetr"], "did you mean 'swin_unetr'"),
    (["--model", "swin_unetr", "--roi", "96,96,80"], "multiple of [32, 32, 32]"),
    ([], "give --shape"),
])
def test_flops_cli_errors(cli, args, needle):
    result = cli("flops", *args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], result.output


def test_memory_cli(cli):
    result = cli("memory", "--model", "unetr", "--roi", "32,32,32", "--arg", "hidden_size=96", "--arg", "mlp_dim=192",
                 "--arg", "num_heads=4", "--batch", "2", "--budget", "2GB", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["training"]["total_bytes"] > report["training"]["parts_bytes"]["parameters"]
    plans = report["budget"]["plans"]
    assert [p["batch"] for p in plans] == [1, 2, 4]
    fitting = [p for p in plans if p["roi"]]
    assert fitting and all(p["total_bytes"] <= 2 * 10**9 for p in fitting)
    assert all(p["roi"][0] % 16 == 0 for p in fitting)
    bad = cli("memory", "--model", "unetr", "--budget", "lots")
    assert bad.exit_code == 2 and "cannot read 'lots'" in bad.output
