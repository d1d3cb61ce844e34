"""Data-parallel training from torchrun's environment (NCCL on GPUs, gloo on CPUs).

The same code runs as one plain process (no RANK/WORLD_SIZE in the environment) or under
``torchrun --nproc_per_node=N``. The reference MAE code uses the same scheme (torch DDP,
per-GPU batch, lr scaled by the global batch); unlike it, this module gives a timeout so a
rank that dies makes the others fail fast instead of hanging, and never needs device ids on a
CPU (ecosystem.md, "DDP on a CPU").

Only rank 0 writes files and logs to MLflow (``pipeline.tracking.is_rank0`` reads ``RANK``).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank, world size, local rank, device and backend."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None when running as one process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer; "
                         "launch with torchrun, or unset it for a single process") from None


def init_distributed(timeout_s: float = 1800.0, device: str | None = None) -> DistInfo:
    """Join the process group described by torchrun's RANK, WORLD_SIZE and LOCAL_RANK.

    Args:
        timeout_s: collective timeout; a crashed peer turns into an error after this long.
        device: force "cpu" or "cuda"; default: CUDA when available.
    Returns:
        A :class:`DistInfo`. With WORLD_SIZE unset or 1 nothing is initialised.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", 0)
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA device")
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} "
                               "CUDA devices; lower --nproc_per_node")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world <= 1:
        return DistInfo(0, 1, 0, dev, None)
    if not 0 <= rank < world:
        raise ValueError(f"RANK {rank} is outside WORLD_SIZE {world}")
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(seconds=timeout_s),
                                  "rank": rank, "world_size": world}
        if use_cuda:
            kwargs["device_id"] = dev  # binds NCCL to this GPU at once (no lazy guess)
        dist.init_process_group(**kwargs)
    log.info("distributed: rank %d/%d (local %d) on %s, backend %s", rank, world, local, dev,
             backend)
    return DistInfo(rank, world, local, dev, backend)


def cleanup_distributed() -> None:
    """Leave the process group (safe to call when none was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """Wrap in DistributedDataParallel when running on several processes.

    DDP broadcasts rank 0's parameters and buffers at construction, so every replica starts
    identical. On CPU no device ids are passed (gloo works on host tensors).
    """
    if not info.distributed:
        return model
    if info.device.type == "cuda":
        return nn.parallel.DistributedDataParallel(model, device_ids=[info.device.index])
    return nn.parallel.DistributedDataParallel(model)


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks (a copy; identity for a single process)."""
    t = t.detach().clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` for a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def single_process_info() -> DistInfo:
    """The :class:`DistInfo` of a plain run: rank 0 of 1, CUDA when available."""
    return DistInfo(0, 1, 0, torch.device("cuda" if torch.cuda.is_available() else "cpu"), None)


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (a copy; identity for a single process)."""
    t = t.detach().clone()
    if _initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def lockstep(batches: Iterable[Any], device: torch.device) -> Iterator[Any]:
    """Yield ``batches`` while every rank still has one, so all ranks run the same steps.

    Ranks of a data-parallel run read slightly different numbers of batches (samples split
    round-robin, DataLoader workers each dropping a partial batch); a rank that ran out while
    another went on would leave the other blocked in DDP's gradient all-reduce. Before each
    step the ranks agree (an all-reduce MIN of one flag) and all stop at the first step some
    rank cannot fill. A single process gets ``batches`` unchanged.

    Args:
        batches: this rank's iterable (a DataLoader).
        device: where the flag lives (the rank's CUDA device under NCCL, CPU under gloo).
    """
    if not _initialized():
        yield from batches
        return
    end = object()
    it = iter(batches)
    while True:
        item = next(it, end)
        flag = torch.tensor([0 if item is end else 1], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if int(flag.item()) == 0:
            return
        yield item


def gather_objects_to_main(obj: Any, dst: int = 0) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on rank ``dst``, None on the others.

    ``[obj]`` for a single process. Use it for large results that only the writer needs.
    """
    if not _initialized():
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out
