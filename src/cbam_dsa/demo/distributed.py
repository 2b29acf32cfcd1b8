"""The demo's process setup: one process, or a ``torchrun`` process group (DDP), and the device it runs on."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

__all__ = ["DistContext", "resolve_device", "setup_distributed", "teardown_distributed"]


@dataclass
class DistContext:
    """Where this process runs: its rank among ``world_size`` processes and its device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """True on the process that evaluates and writes (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when this process belongs to a process group (launched by ``torchrun``, even with one process)."""
        return self.backend is not None


def resolve_device(device: str) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; ``"cpu"`` and ``"cuda"`` are taken as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but torch.cuda.is_available() is False")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be one of 'auto', 'cpu', 'cuda', but got {device!r}")
    return torch.device(device)


def setup_distributed(device: str = "auto") -> DistContext:
    """Join the process group when launched by ``torchrun`` (``RANK`` and ``WORLD_SIZE`` set); else one process.

    The backend is NCCL on CUDA and gloo on CPU; under CUDA each process takes the GPU of its ``LOCAL_RANK``.
    """
    target = resolve_device(device)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:  # not launched by torchrun
        return DistContext(device=target)
    world_size = int(os.environ["WORLD_SIZE"])
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    if target.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        target = torch.device("cuda", local_rank)
    backend = "nccl" if target.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistContext(rank=rank, world_size=world_size, device=target, backend=backend)


def teardown_distributed(ctx: DistContext) -> None:
    """Wait for every process, then leave the process group (nothing to do for a single process)."""
    if ctx.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
