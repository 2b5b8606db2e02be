"""One test over every registered model (timm style), plus the registry's checks."""

import pytest
import torch

from medseg.errors import BundleError
from medseg.models import check_head_lr, create_model, get_spec, list_models, param_groups

# Small but valid settings per model so the whole registry runs on a CPU in seconds.
SMALL = {
    "vnet": ({}, (32, 32, 32)),
    "unetr": ({"feature_size": 8, "hidden_size": 96, "mlp_dim": 192, "num_heads": 4}, (32, 32, 32)),
    "swin_unetr": ({"feature_size": 12}, (64, 64, 32)),  # its smallest ROI
    "fcn2d": ({"features": [8, 16, 16, 32, 32]}, (40, 36, 2)),
    "fcn_triplanar": ({"features": [8, 8, 16, 16, 16], "train_slices": 2}, (40, 36, 32)),
}


def test_all_five_models_are_registered():
    assert set(list_models()) >= {"vnet", "unetr", "swin_unetr", "fcn2d", "fcn_triplanar"}
    assert set(SMALL) == set(list_models()), "add the new model to SMALL"


@pytest.mark.parametrize("name", list_models())
def test_model_forward_backward_shape(name):
    torch.manual_seed(0)
    args, roi = SMALL[name]
    model = create_model(name, out_channels=3, roi=roi, **args)
    assert sum(p.numel() for p in model.parameters()) > 0
    x = torch.randn(1, 1, *roi)
    y = model(x)
    assert y.shape == (1, 3, *roi)
    assert torch.isfinite(y).all()
    y.square().mean().backward()
    # MONAI's TransformerBlock builds a cross-attention norm it never uses without cross-attention.
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert all("norm_cross_attn" in n for n in unused), unused
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", list_models())
def test_gradient_checkpointing_gives_the_same_gradients(name):
    args, roi = SMALL[name]
    x = torch.randn(1, 1, *roi)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = create_model(name, out_channels=2, roi=roi, grad_checkpointing=ckpt, **args)
        for m in model.modules():  # dropout would make the two runs differ
            if isinstance(m, torch.nn.modules.dropout._DropoutNd):
                m.p = 0.0
        model.train()
        model(x).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_fcn2d_is_slice_wise():
    """Each output slice depends on its input slice only."""
    args, _ = SMALL["fcn2d"]
    model = create_model("fcn2d", out_channels=2, roi=(40, 36, 1), **args).eval()
    x = torch.randn(1, 1, 40, 36, 5)
    with torch.no_grad():
        whole = model(x)
        alone = model(x[..., 2:3])
    assert torch.allclose(whole[..., 2:3], alone, atol=1e-5)


def test_registry_errors_suggest():
    with pytest.raises(BundleError, match="did you mean 'swin_unetr'"):
        get_spec("swinunetr")
    with pytest.raises(BundleError, match="did you mean 'hidden_size'"):
        create_model("unetr", out_channels=2, roi=(32, 32, 32), hiden_size=96)
    with pytest.raises(BundleError, match="multiple of \\[32, 32, 32\\]"):
        create_model("swin_unetr", out_channels=2, roi=(64, 64, 48))
    with pytest.raises(BundleError, match="at least \\[64, 64, 32\\]"):
        create_model("swin_unetr", out_channels=2, roi=(32, 32, 32))
    from monai.networks.nets import SwinUNETR  # the minimum is MONAI's: a one-voxel deepest map cannot be normalised

    with pytest.raises(ValueError, match="more than 1 spatial element"):
        SwinUNETR(in_channels=1, out_channels=2, feature_size=12).train()(torch.randn(1, 1, 32, 32, 32))
    for bad in ({"feature_size": 0}, {"num_heads": [0, 0, 0, 0]}):  # once a ZeroDivisionError traceback
        with pytest.raises(BundleError, match="must (be|hold) positive"):
            create_model("swin_unetr", out_channels=2, roi=(64, 64, 32), **bad)
    with pytest.raises(BundleError, match="model.args for unetr"):
        create_model("unetr", out_channels=2, roi=(32, 32, 32), hidden_size=100, num_heads=12)


# The module each network's logits come out of, by MONAI's names: what train.head_lr_scale speeds up.
HEADS = {"vnet": "out_tr", "unetr": "out", "swin_unetr": "out"}


@pytest.mark.parametrize("name", sorted(HEADS))
def test_head_lr_scale_puts_exactly_the_output_head_in_its_own_group(name):
    args, roi = SMALL[name]
    model = create_model(name, out_channels=3, roi=roi, **args)
    rest, head = param_groups(name, model, 25.0)
    expected = {id(p) for p in getattr(model, HEADS[name]).parameters()}
    assert {id(p) for p in head["params"]} == expected and head["lr_scale"] == 25.0
    assert not expected & {id(p) for p in rest["params"]} and rest["lr_scale"] == 1.0
    assert len(rest["params"]) + len(head["params"]) == len(list(model.parameters()))
    assert len(param_groups(name, model, 1.0)) == 1


def test_head_lr_scale_needs_a_registered_head():
    with pytest.raises(BundleError, match="no registered output head"):
        check_head_lr("fcn2d", 2.0)
    check_head_lr("fcn2d", 1.0)


def test_null_model_args_only_where_the_network_allows_none():
    create_model("vnet", out_channels=2, roi=(32, 32, 32), dropout_prob_down=None)  # float | None
    with pytest.raises(BundleError, match="must be like its default"):  # tuple[float | None, float]: None only inside
        create_model("vnet", out_channels=2, roi=(32, 32, 32), dropout_prob_up=None)
    with pytest.raises(BundleError, match="model.args for vnet"):  # one value for two: MONAI's IndexError, one line
        create_model("vnet", out_channels=2, roi=(32, 32, 32), dropout_prob_up=[0.5])


def test_vnet_learns_faster_with_its_head_at_a_higher_rate():
    """V-Net's head follows batch norm, so only its own weights can scale the logits up; at AdamW's
    2e-3 that takes hundreds of steps and V-Net learnt only the liver on the phantom
    (docs/benchmarks.md). Same data, same initialisation, 15 steps of DiceCE: the scaled head must end
    with a clearly lower loss."""
    from medseg.config import TrainConfig
    from medseg.engine.components import make_loss, make_optimizer, set_lr

    torch.manual_seed(0)
    y = torch.zeros(1, 1, 32, 32, 32, dtype=torch.long)
    y[:, :, 8:20, 8:20, 8:20] = 1
    y[:, :, 20:28, 4:12, 4:30] = 2
    x = torch.randn(1, 1, 32, 32, 32) * 0.3 + y.float()
    cfg = TrainConfig(lr=2e-3)
    loss_fn = make_loss("dice_ce")
    final = {}
    for scale in (1.0, 25.0):
        torch.manual_seed(0)
        model = create_model("vnet", out_channels=3, roi=(32, 32, 32), dropout_prob_down=None, dropout_prob_up=[None, 0.0])
        opt = make_optimizer(cfg, param_groups("vnet", model, scale))
        set_lr(opt, cfg.lr)  # as the training loop does each step
        for _ in range(15):
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        final[scale] = loss.item()
    print(f"V-Net loss after 15 steps: head x1 {final[1.0]:.3f}, head x25 {final[25.0]:.3f}")
    assert final[25.0] < final[1.0] - 0.5
