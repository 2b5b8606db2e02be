"""Why V-Net learnt only the liver: how fast each network overfits one phantom volume (docs/benchmarks.md, issue 8).

    python benchmarks/head_scale_overfit.py                       # V-Net at 1x and 25x head rate, MONAI UNet
    python benchmarks/head_scale_overfit.py --steps 40 --runs vnet:1 vnet:25

One phantom case (seed 0) at 6 mm in-plane and 6 mm slices, z-scored on its foreground, padded with
air to 48 x 48 x 32, five classes (background, liver, spleen, kidneys). Each run: the same
initialisation, AdamW 2e-3 (the shipped rate) with the head's parameter group at ``:SCALE`` times
that, DiceCE, two threads. Prints, four times per run, the loss, the logits' standard deviation and
the Dice per organ on the same volume (eval mode): a network that cannot fit one volume in 80 steps
cannot learn eight in a CPU demo.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def volume() -> tuple[torch.Tensor, torch.Tensor]:
    from medseg.data.phantom import make_case

    case = make_case(0, 0)
    img = np.asarray(case.image.dataobj, dtype=np.float32)[::4, ::4, ::2]  # 1.5 x 1.5 x 3 mm -> 6 mm
    lab = np.asarray(case.label.dataobj)[::4, ::4, ::2].astype(np.int64)
    lab[lab > 4] = 0  # the four organs of the shipped bundles
    fg = img[img > -500]
    lo, hi = np.percentile(fg, [0.5, 99.5])
    mean, std = fg.clip(lo, hi).mean(), fg.clip(lo, hi).std()
    x = np.full((48, 48, 32), (lo - mean) / std, np.float32)  # air, as training pads
    y = np.zeros((48, 48, 32), np.int64)
    sx, sy, sz = img.shape
    x[:sx, :sy, :sz] = (img.clip(lo, hi) - mean) / std
    y[:sx, :sy, :sz] = lab
    return torch.from_numpy(x)[None, None], torch.from_numpy(y)[None, None]


def build(name: str) -> torch.nn.Module:
    from monai.networks.nets import UNet

    from medseg.models import create_model

    if name == "unet":  # MONAI's UNet: its head is a plain convolution on unnormalised features
        return UNet(3, 1, 5, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2)
    no_dropout = {"dropout_prob_down": None, "dropout_prob_up": [None, 0.0]} if name == "vnet" else {}  # as shipped
    return create_model(name, out_channels=5, roi=(48, 48, 32), **no_dropout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", default=["vnet:1", "vnet:25", "unet:1"], help="MODEL:HEAD_SCALE (unet: no head group)")
    ap.add_argument("--steps", type=int, default=80)
    args = ap.parse_args()
    from medseg.config import TrainConfig
    from medseg.engine.components import make_loss, make_optimizer, set_lr
    from medseg.models import param_groups

    torch.set_num_threads(2)
    x, y = volume()
    print(f"volume {tuple(x.shape[2:])}, voxels per class {np.bincount(y.numpy().ravel()).tolist()}")
    loss_fn, cfg = make_loss("dice_ce"), TrainConfig(lr=2e-3)
    for run in args.runs:
        name, scale = run.split(":")
        torch.manual_seed(0)
        model = build(name)
        groups = param_groups(name, model, float(scale)) if name != "unet" else model.parameters()
        opt = make_optimizer(cfg, groups)
        set_lr(opt, cfg.lr)
        start = time.perf_counter()
        for step in range(1, args.steps + 1):
            model.train()
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % max(1, args.steps // 4) == 0:
                model.eval()
                with torch.no_grad():
                    logits = model(x)
                pred = logits.argmax(1, keepdim=True)
                dice = [float(2 * ((pred == k) & (y == k)).sum() / max(1, int((pred == k).sum() + (y == k).sum()))) for k in range(1, 5)]
                print(f"{name} head x{scale}: step {step}, loss {loss.item():.3f}, logit std {logits.std().item():.2f}, "
                      f"Dice liver/spleen/kidney R/L {' / '.join(f'{d:.2f}' for d in dice)} ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
