"""medseg: 3D CT organ segmentation on MONAI and PyTorch.

Heavy libraries (torch, monai, mlflow) are imported inside the functions that need them, so
``import medseg`` and ``medseg --help`` stay fast.
"""

__version__ = "0.1.0"

# Run directories carry this number. 2: one checkpoint.pt with the whole training state (no
# model_last.pt), a lock file and heartbeat. 3: augmentation presets (format 2's `"augment": true`
# flipped left and right, which "light" no longer does for sided classes, so a format-2 run cannot
# continue bit for bit), warm-up and train.iterations in the checkpoint. Inference reads 1-3; resume needs 3.
RUN_FORMAT_VERSION = 3
READABLE_RUN_FORMATS = (1, 2, 3)
