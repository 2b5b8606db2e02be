"""One test over every registered model (timm style), plus the registry's checks."""

import pytest
import torch

from medseg.errors import BundleError
from medseg.models import create_model, get_spec, list_models

# Small but valid settings per model so the whole registry runs on a CPU in seconds.
SMALL = {
    "vnet": ({}, (32, 32, 32)),
    "unetr": ({"feature_size": 8, "hidden_size": 96, "mlp_dim": 192, "num_heads": 4}, (32, 32, 32)),
    "swin_unetr": ({"feature_size": 12}, (64, 64, 32)),  # its smallest ROI
    "fcn2d": ({"features": [8, 16, 16, 32, 32]}, (40, 36, 2)),
}


def test_all_four_models_are_registered():
    assert set(list_models()) >= {"vnet", "unetr", "swin_unetr", "fcn2d"}
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
