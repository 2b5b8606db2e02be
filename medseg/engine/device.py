"""Which device, and which mixed precision on it: one rule for training and inference.

bf16 autocast on GPUs that compute in bf16 natively (Ampere, compute capability 8.0, and newer);
fp16 autocast with a gradient scaler on older GPUs (V100, T4), where bf16 is only emulated and slow;
nothing on the CPU. ``torch.cuda.is_bf16_supported()`` alone counts emulation as support, which
sent every V100/T4 down the bf16 path.
"""

from __future__ import annotations

import contextlib

import torch

from medseg.errors import MedsegError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise MedsegError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MedsegError(f"--device {name}: no CUDA device is available (use --device cpu or auto)")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """bf16 computed natively (not emulated) on this CUDA device."""
    if device.type != "cuda":
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def amp_mode(enabled: bool, device: torch.device) -> str:
    """"bf16", "fp16" or "off"."""
    if not enabled or device.type != "cuda":
        return "off"
    return "bf16" if native_bf16(device) else "fp16"


def autocast(mode: str, device: torch.device):
    """A context manager factory for ``mode`` (from :func:`amp_mode`)."""
    if mode == "off":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


def grad_scaler(mode: str):
    """fp16 needs loss scaling so small gradients do not underflow; bf16 and fp32 do not."""
    return torch.amp.GradScaler("cuda") if mode == "fp16" else None
