"""How fast MONAI's VNet fits a toy patch under each optimiser (docs/benchmarks.md, issue 8).

    python benchmarks/vnet_optimizer_toy.py

A 32^3 patch holding two cubes (classes 1 and 2) over noise, 40 steps of DiceCE from the same
initialisation, one thread. Prints the last training loss per optimiser: a network that fits this
slowly will not learn the phantom in the few hundred steps of a CPU demo. The shipped bundle's answer,
the head at 25x the rate (`train.head_lr_scale`), is the last row; benchmarks/head_scale_overfit.py
shows the cause on a phantom volume.
"""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss
from monai.networks.nets import VNet

from medseg.engine.components import set_lr
from medseg.models import param_groups


def _head_at_25x(model: torch.nn.Module) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(param_groups("vnet", model, 25.0), 2e-3)
    set_lr(opt, 2e-3)
    return opt


OPTIMISERS = {  # each makes the optimiser for a freshly built model
    "AdamW 2e-3": lambda m: torch.optim.AdamW(m.parameters(), 2e-3),
    "AdamW 3e-4": lambda m: torch.optim.AdamW(m.parameters(), 3e-4),
    "AdamW 1e-2": lambda m: torch.optim.AdamW(m.parameters(), 1e-2),
    "SGD 1e-2, Nesterov 0.99 (nnU-Net)": lambda m: torch.optim.SGD(m.parameters(), 1e-2, momentum=0.99, nesterov=True),
    "AdamW 2e-3, head at 25x (shipped)": _head_at_25x,
}


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(1, 1, 32, 32, 32)
    y = torch.zeros(1, 1, 32, 32, 32, dtype=torch.long)
    y[:, :, 8:20, 8:20, 8:20] = 1
    y[:, :, 20:28, 4:12, 4:30] = 2
    x = x * 0.3 + y.float()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    for name, make in OPTIMISERS.items():
        torch.manual_seed(0)
        model = VNet(spatial_dims=3, in_channels=1, out_channels=3)
        opt = make(model)
        for _ in range(40):
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"{name}: loss after 40 steps {loss.item():.3f}", flush=True)


if __name__ == "__main__":
    main()
