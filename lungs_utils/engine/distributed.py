"""torch.distributed from inside a process that torchrun started: joining and leaving the group, this
process's rank, and sums across ranks. Starting the processes is :mod:`lungs_utils.runs.torchrun`.

``torchrun --nproc_per_node=N -m lungs_utils train PARAMS.yaml`` sets RANK / WORLD_SIZE / LOCAL_RANK; the
training loop wraps the model in DistributedDataParallel and sums metrics across ranks, and only rank 0
writes the run folder.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def launched_by_torchrun() -> bool:
    """True inside a torchrun worker with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_process_group() -> tuple[int, int]:
    """Join the group torchrun set up; returns (rank, world size). A no-op outside torchrun."""
    if not launched_by_torchrun():
        return 0, 1
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def leave_process_group() -> None:
    """Wait for every rank, then leave the group (a no-op outside torchrun)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 outside torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """True outside torchrun and on its rank 0: the one process that writes the run folder."""
    return rank_and_world()[0] == 0


def broadcast_from_first(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``t`` on every rank (itself outside torchrun)."""
    if rank_and_world()[1] > 1:
        dist.broadcast(t, src=0)
    return t


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over every process, in place (itself outside torchrun)."""
    if rank_and_world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
