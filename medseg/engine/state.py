"""What a checkpoint must hold for a resume to be a continuation, not a restart.

- The learning rate is a pure function of the global step and a list of schedule *segments* saved in
  the checkpoint, so a resume with the same length reproduces it exactly, and a resume with a new
  length continues smoothly from the current rate instead of restoring a stale ``T_max`` (cosine
  climbing back up) or jumping (poly).
- RNG states (python, numpy, torch, CUDA) in a form ``torch.load(weights_only=True)`` accepts.
- The data stream of epoch ``e`` is seeded from (seed, e) alone, so a resume mid-epoch replays the
  epoch's first batches to reach the same position (see ``engine/train.py``).
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import torch


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919) % 2**31


# -- learning-rate schedule ---------------------------------------------------------------------


def _factor(kind: str, t: int, length: int) -> float:
    if kind == "none":
        return 1.0
    x = min(max(t, 0), length) / max(1, length)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * x))
    if kind == "poly":  # nnU-Net's (1 - t/T)^0.9
        return (1.0 - x) ** 0.9
    raise ValueError(f"unknown schedule {kind!r}")  # the bundle schema rules this out


def new_schedule(kind: str, lr: float, total_steps: int, warmup: int = 0) -> list[dict[str, Any]]:
    """Linear warm-up over ``warmup`` steps (from lr/warmup to lr), then ``kind``'s decay over the rest."""
    return [{"start": 0, "end": int(total_steps), "lr0": float(lr), "base_lr": float(lr), "kind": kind, "warmup": int(warmup)}]


def lr_at(segments: list[dict[str, Any]], step: int) -> float:
    """The learning rate of optimiser step ``step`` (0-based)."""
    seg = next((s for s in reversed(segments) if s["start"] <= step), segments[0])
    t, warmup = step - seg["start"], min(seg.get("warmup", 0), seg["end"] - seg["start"])
    if t < warmup:  # linear from lr_start (0 at the start of training; the current rate on a resume)
        start = seg.get("lr_start", 0.0)
        return start + (seg["lr0"] - start) * (t + 1) / warmup
    return seg["lr0"] * _factor(seg["kind"], t - warmup, seg["end"] - seg["start"] - warmup)


def continue_schedule(segments: list[dict[str, Any]], step: int, kind: str, lr: float, total_steps: int) -> tuple[list[dict[str, Any]], str | None]:
    """The schedule for a resume at ``step`` with the (possibly changed) bundle values; a note when
    it changed. Unchanged length, kind and rate: the saved schedule, bit for bit. Otherwise a new
    segment from ``step`` to the new end starts at the current rate (after a finished schedule, the
    last rate used), so nothing jumps or climbs back; a changed ``train.lr`` starts it at that value."""
    last = segments[-1]
    if last["end"] == total_steps and last["kind"] == kind and last["base_lr"] == lr:
        return segments, None
    quiet = kind == "none" and last["kind"] == "none" and last["base_lr"] == lr  # a constant rate, only the length changed
    warm_left = last.get("warmup", 0) - (step - last["start"])
    if last["base_lr"] != lr:
        start, how = float(lr), f"lr set to {lr:g}"
    elif warm_left > 0:  # stopped during the warm-up: finish it, then decay from the peak
        start, how = float(lr), f"finishing the warm-up to {lr:g} over {warm_left} steps"
    else:
        start = lr_at(segments, min(step, max(last["start"], last["end"] - 1)))
        how = f"continuing from the current lr {start:.3g} (give a new train.lr to restart higher)"
    seg = {"start": int(step), "end": int(total_steps), "lr0": start, "base_lr": float(lr), "kind": kind,
           "warmup": max(0, warm_left) if last["base_lr"] == lr else 0, "lr_start": lr_at(segments, max(0, step - 1)) if step else 0.0}
    shape = "constant" if kind == "none" else f"{kind} decay to 0 at step {total_steps}"
    return [*segments, seg], None if quiet else f"learning rate: {how}, then {shape}"


# -- random number generators -------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
