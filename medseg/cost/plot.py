"""How attention and convolution costs grow with the volume: the course's question as a picture."""

from __future__ import annotations

from pathlib import Path

from medseg.cost.analytic import attention_flops, attention_matrix_bytes, conv_cost, window_plan


def plot_scaling(path: str | Path, channels: int = 256, window: tuple[int, int, int] = (8, 8, 8), kernel: int = 3,
                 sides: tuple[int, ...] = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256)) -> Path:
    """Two log-log panels over cubic feature maps of side n (n^3 tokens, ``channels`` channels):
    FLOPs of global attention, shifted-window attention and a Conv3D (d -> d, ``kernel``^3), and the
    memory of one head's attention matrix (fp32) next to the Conv3D output."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = [n**3 for n in sides]
    glob = [attention_flops(t, channels) for t in tokens]
    plans = [window_plan((n, n, n), window) for n in sides]
    win = [p.windows * attention_flops(p.tokens_per_window, channels) for p in plans]
    conv = [conv_cost((n, n, n, channels), channels, kernel, 1, "same").flops for n in sides]
    mem_glob = [attention_matrix_bytes(t) for t in tokens]
    mem_win = [attention_matrix_bytes(p.tokens_per_window, p.windows) for p in plans]
    mem_conv = [t * channels * 4 for t in tokens]

    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5))
    for ax, series, ylabel in (
        (a, [(glob, "global self-attention"), (win, f"window attention {window}"), (conv, f"Conv3D {kernel}^3, d->d")], "FLOPs (2 x MACs)"),
        (b, [(mem_glob, "global attention matrix (1 head, fp32)"), (mem_win, "window attention matrices (1 head, fp32)"),
             (mem_conv, "Conv3D output activation (fp32)")], "bytes"),
    ):
        for values, label in series:
            ax.plot(tokens, values, marker="o", label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"tokens L = n^3 (n = {sides[0]}..{sides[-1]}), d = {channels}")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    a.set_title("compute: global attention grows as L^2, window attention and Conv3D as L")
    b.set_title("memory")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
