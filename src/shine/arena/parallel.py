"""`shine arena --nproc N`: the same arena with every run trained under FSDP2 on N processes.

Each process holds a shard of every parameter (``fully_shard`` on each transformer block and
on the model, so shine's optimizers step DTensors) and trains on its slice of each global
batch; FSDP2 averages the gradients, so a step sees the same global batch as one process.
Rank 0 alone prints, shows progress and writes the reports.
"""
from __future__ import annotations

import argparse
import signal
import socket
import threading
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn


def world() -> tuple[int, int]:
    """(rank, world size), (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this process reports (rank 0, or the only process)."""
    return world()[0] == 0


def shard(model: nn.Module, blocks: nn.ModuleList) -> nn.Module:
    """Shard ``model`` with FSDP2 over the process group (a no-op for one process)."""
    if world()[1] == 1:
        return model
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block)
    return fully_shard(model)


def local_slice(x: torch.Tensor) -> torch.Tensor:
    """This rank's equal share of a global batch (rows rank, rank + N, ...)."""
    rank, size = world()
    return x[rank::size]


def global_mean(value: torch.Tensor) -> float:
    """The mean of a scalar over the processes (the same float on every rank)."""
    if world()[1] > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= world()[1]
    return value.item()


def global_sum(value: float, device: str | torch.device) -> float:
    """The sum of a number over the processes (itself outside a process group); ``device``: where
    the process group's collectives run (CUDA for nccl)."""
    if world()[1] > 1:
        total = torch.tensor(float(value), dtype=torch.float64, device=device)
        dist.all_reduce(total)
        return total.item()
    return value


def launch(nproc: int, device: str, body: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run ``body(args)`` in ``nproc`` processes joined in a process group on 127.0.0.1; rank 0's status."""
    with socket.socket() as s:  # a free local port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    status = torch.multiprocessing.get_context("spawn").SimpleQueue()
    # Ctrl-C reaches the ranks too, and rank 0 reports what finished: this process waits for them
    # (a handler of its own, not SIG_IGN, which the spawned interpreters would inherit)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, lambda *_: None) if main else None
    try:
        torch.multiprocessing.start_processes(_worker, args=(nproc, port, device, body, args, status), nprocs=nproc,
                                              start_method="spawn")
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
    return status.get()


def _worker(rank: int, nproc: int, port: int, device: str, body, args, status) -> None:
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=nproc)
    try:
        code = body(args)
        if rank == 0:
            status.put(code)
        # tear down together: a rank that destroyed its group while rank 0 still wrote the reports
        # was once killed by gloo ("terminate called without an active exception", SIGABRT)
        dist.barrier()
    finally:
        dist.destroy_process_group()
