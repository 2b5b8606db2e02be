"""Networks behind one registry: ``create_model("swin_unetr", out_channels=5, roi=(96, 96, 96))``.

Importing this package registers the built-in models (MONAI VNet, UNETR, SwinUNETR and medseg's 2D
slice-by-slice FCN).
"""

from medseg.models import nets as _nets  # noqa: F401,E402  (registers the built-ins)
from medseg.models.registry import (
    ModelSpec,
    check_before_data,
    check_head_lr,
    check_model_args,
    check_roi,
    check_window,
    create_model,
    get_spec,
    list_models,
    param_groups,
    register_model,
)

__all__ = ["ModelSpec", "check_before_data", "check_head_lr", "check_model_args", "check_roi", "check_window", "create_model",
           "get_spec", "list_models", "param_groups", "register_model"]
