"""Several processes, one training: PyTorch's torchrun + DistributedDataParallel, nothing home-made.

``torchrun --nproc_per_node N -m medseg train BUNDLE`` (or ``medseg train BUNDLE --nproc N``, which
starts torchrun) runs N ranks; torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``...) tells each which it is. :class:`Dist` is what the trainer needs of it: the rank,
the collectives it uses (a sum, a broadcast, a gather) and the CUDA device of the local rank. With
one process every collective is the identity, so the single-process trainer runs the same code.

Rules the trainer keeps (see ``medseg.engine.train``): every rank makes the same decisions at the
same step (stop, time limit, checkpoint due are agreed through :meth:`Dist.any`), only rank 0
writes the run directory and MLflow, and each rank trains on its own disjoint shard of the cases.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from medseg.errors import MedsegError

T = TypeVar("T")

__all__ = ["Dist", "launch_torchrun", "shard", "under_torchrun"]


def under_torchrun() -> bool:
    """True when this process is one rank of several started by torchrun (or another launcher
    that sets the same variables)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None  # "nccl" or "gloo"; None with one process

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str) -> tuple[Dist, torch.device]:
        """Join torchrun's process group (NCCL on CUDA, gloo on the CPU) and pick this rank's device:
        ``cuda:LOCAL_RANK`` on CUDA. One process (no torchrun): ``Dist()`` and the device asked for."""
        from medseg.engine.device import resolve_device

        if not under_torchrun():
            return cls(), resolve_device(device)
        import torch.distributed as td

        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))
        die_with_parent()  # torchrun's agent killed (SIGKILL): stop and checkpoint, do not train on as an orphan
        dev = resolve_device(device)
        if dev.type == "cuda":
            if device.startswith("cuda:"):
                raise MedsegError(f"--device {device}: under torchrun each rank uses cuda:LOCAL_RANK; use --device cuda or auto")
            if local >= torch.cuda.device_count():
                raise MedsegError(f"local rank {local} has no GPU ({torch.cuda.device_count()} visible): use --nproc_per_node "
                                  f"{torch.cuda.device_count()} or fewer")
            dev = torch.device("cuda", local)
            torch.cuda.set_device(dev)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if not td.is_initialized():
            td.init_process_group(backend=backend)
        return cls(rank, world, local, backend), dev

    # -- collectives (identities with one process) -------------------------------------------------
    def any(self, *flags: bool) -> list[bool]:
        """Each flag, true if it is true on any rank: how all ranks agree to stop, end or checkpoint."""
        if not self.enabled:
            return [bool(f) for f in flags]
        t = self._tensor([float(bool(f)) for f in flags])
        torch.distributed.all_reduce(t)
        return [bool(v > 0) for v in t.tolist()]

    def mean(self, value: float) -> float:
        if not self.enabled:
            return float(value)
        t = self._tensor([float(value)])
        torch.distributed.all_reduce(t)
        return float(t.item()) / self.world

    def sum_array(self, values: np.ndarray) -> np.ndarray:
        """Element-wise sum over ranks (validation's per-class score sums and case counts)."""
        if not self.enabled:
            return values
        t = self._tensor(np.asarray(values, dtype=np.float64).ravel().tolist(), torch.float64)
        torch.distributed.all_reduce(t)
        return t.cpu().numpy().reshape(np.shape(values))

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, device=self._device())
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (on every rank)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def main_first(self, fn, *args, **kwargs):
        """Run ``fn`` on rank 0, then on the others, which raise rank 0's error instead of repeating
        work that would fail the same way (or race it: writing the phantom cache). A user error on
        rank 0 reaches every rank, so none waits forever at the next collective."""
        if not self.enabled:
            return fn(*args, **kwargs)
        error = None
        if self.is_main:
            try:
                result = fn(*args, **kwargs)
            except MedsegError as e:
                error = str(e)
            self.broadcast(error)
            if error is not None:
                raise MedsegError(error)
            return result
        error = self.broadcast(None)
        if error is not None:
            raise MedsegError(error)
        return fn(*args, **kwargs)

    def from_main(self, fn, *args, **kwargs):
        """``fn``'s result on rank 0, given to every rank (it must pickle); rank 0's user error
        (:class:`MedsegError`) is raised on every rank. What only rank 0 may do (create the run
        directory) or what every rank must agree on (the plan: each rank's GPU would size its own)."""
        if not self.enabled:
            return fn(*args, **kwargs)
        if self.is_main:
            try:
                result = fn(*args, **kwargs)
            except MedsegError as e:
                self.broadcast(("error", str(e)))
                raise
            self.broadcast(("ok", result))
            return result
        status, value = self.broadcast(None)
        if status == "error":
            raise MedsegError(value)
        return value

    def sync_buffers(self, model: torch.nn.Module) -> None:
        """Rank 0's buffers (batch-norm statistics) on every rank: DDP sends them at the next forward,
        so after an epoch's last step each rank's differ; validation must score one model."""
        if self.enabled:
            for b in model.buffers():
                torch.distributed.broadcast(b, src=0)

    def close(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def _tensor(self, values: list[float], dtype=torch.float64) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self._device())


def die_with_parent(signum: int | None = None) -> None:
    """Linux: have the kernel send ``signum`` (SIGTERM) to this process when its parent dies, so a
    rank or worker whose launcher was SIGKILLed stops (SIGTERM: training checkpoints first) instead
    of running on as an orphan holding the run's lock. Elsewhere: nothing."""
    import ctypes
    import signal

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signum or signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before we asked
        os.kill(os.getpid(), int(signum or signal.SIGTERM))


def shard(items: list[T], rank: int, world: int) -> list[T]:
    """Rank ``rank``'s part of ``items``: every ``world``-th item from position ``rank``. The parts
    are disjoint, cover every item, and differ in size by at most one."""
    return list(items[rank::world])


def launch_torchrun(nproc: int, args: list[str], torchrun_args: list[str] | None = None) -> int:
    """``torchrun --standalone --nproc_per_node nproc -m medseg ARGS``, its agent in this process;
    returns an exit status for the whole training: 0, the first failed rank's, or 128 + a signal
    that stopped it (SIGTERM or Ctrl-C: torchrun passes SIGTERM to every rank, which checkpoints
    and stops; it waits 30 s for them). For several machines run torchrun yourself with its
    rendezvous flags (README, "Training on several GPUs or machines")."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if nproc < 1:
        raise MedsegError(f"--nproc must be 1 or more, got {nproc}")
    if under_torchrun():
        raise MedsegError("--nproc starts torchrun; this process already runs under torchrun: leave out --nproc")
    # torchrun would set 1 thread per rank; share this machine's cores between the ranks instead
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    import logging

    # the ranks say what went wrong (rank 0 speaks); torchrun's agent would add its own warnings and a traceback summary
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(parse_args(["--standalone", f"--nproc_per_node={nproc}", *(torchrun_args or []), "-m", "medseg", *args]))
    except SignalException as e:
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        return exit_status(e.get_first_failure()[1].exitcode)
    return 0


def exit_status(code: int) -> int:
    """A child's exit code as a shell reports it: a death by signal N (``-N`` from Python) is 128 + N."""
    if code < 0:
        return 128 - code
    return code if code < 256 else 1
