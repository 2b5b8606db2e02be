"""medseg: 3D CT organ segmentation on MONAI and PyTorch.

Heavy libraries (torch, monai, mlflow) are imported inside the functions that need them, so
``import medseg`` and ``medseg --help`` stay fast.
"""

__version__ = "0.1.0"

# Run directories carry this number; inference refuses a run written with a different one.
RUN_FORMAT_VERSION = 1
