"""medseg: 3D CT organ segmentation on MONAI and PyTorch.

Heavy libraries (torch, monai, mlflow) are imported inside the functions that need them, so
``import medseg`` and ``medseg --help`` stay fast.
"""

__version__ = "0.1.0"

# Run directories carry this number. 2: one checkpoint.pt with the whole training state (no
# model_last.pt), a lock file and heartbeat. Inference still reads format 1; resume needs 2.
RUN_FORMAT_VERSION = 2
READABLE_RUN_FORMATS = (1, 2)
