"""The built-in models. MONAI's networks are used as they are; medseg only fixes the arguments it
owns (channels, ROI, checkpointing)."""

from __future__ import annotations

from monai.networks.nets import UNETR, SwinUNETR, VNet

from medseg.models.checkpointing import checkpoint_children
from medseg.models.fcn2d import FCN2D, SliceWise
from medseg.models.registry import register_model
from medseg.models.triplanar import TriPlanar


@register_model("vnet", display="VNet", network=VNet, roi_multiple=(16, 16, 16), min_roi=(32, 32, 32), head="out_tr",
                description="MONAI V-Net (Milletari 2016): residual 3D encoder-decoder, 5x5x5 convolutions")
def vnet(in_channels, out_channels, roi, grad_checkpointing=False, **args):
    model = VNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, **args)
    if grad_checkpointing:
        checkpoint_children(model, ["down_tr32", "down_tr64", "down_tr128", "down_tr256", "up_tr256", "up_tr128", "up_tr64", "up_tr32"])
    return model


@register_model("unetr", display="UNETR", network=UNETR, roi_multiple=(16, 16, 16), fixed_roi=True, head="out",
                description="MONAI UNETR (Hatamizadeh 2022): ViT encoder on 16^3 patches, CNN decoder")
def unetr(in_channels, out_channels, roi, grad_checkpointing=False, **args):
    model = UNETR(in_channels=in_channels, out_channels=out_channels, img_size=roi, spatial_dims=3, **args)
    if grad_checkpointing:
        checkpoint_children(model.vit, ["blocks"])
    return model


@register_model("swin_unetr", display="SwinUNETR", network=SwinUNETR, roi_multiple=(32, 32, 32), min_roi=(64, 64, 32), head="out",
                description="MONAI Swin UNETR (Hatamizadeh 2022): shifted-window transformer encoder, 2^3 patches")
def swin_unetr(in_channels, out_channels, roi, grad_checkpointing=False, **args):
    return SwinUNETR(in_channels=in_channels, out_channels=out_channels, spatial_dims=3, use_checkpoint=grad_checkpointing, **args)


@register_model("fcn2d", display="FCN2D", network=FCN2D, roi_multiple=(1, 1, 1), min_roi=(32, 32, 1), axial_slices=True,
                description="2D FCN-8s baseline applied slice by slice along the axial axis (train with ROI depth 1)")
def fcn2d(in_channels, out_channels, roi, grad_checkpointing=False, **args):
    net = FCN2D(in_channels=in_channels, out_channels=out_channels, **args)
    if grad_checkpointing:
        checkpoint_children(net, ["stages"])
    return SliceWise(net)


@register_model("fcn_triplanar", display="FCNTriPlanar", network=TriPlanar, roi_multiple=(1, 1, 1), min_roi=(32, 32, 32),
                description="three 2D FCN-8s (axial, coronal, sagittal), per-voxel probabilities fused (Zhou 2017); 3D windows")
def fcn_triplanar(in_channels, out_channels, roi, grad_checkpointing=False, **args):
    model = TriPlanar(in_channels=in_channels, out_channels=out_channels, **args)
    if grad_checkpointing:
        for net in model.nets.values():
            checkpoint_children(net, ["stages"])
    return model
