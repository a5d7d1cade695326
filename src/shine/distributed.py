"""What shine needs to run on DTensor parameters (FSDP2's ``fully_shard``, tensor parallelism).

The update rules are written as whole-tensor torch operations, so on a sharded
DTensor most of them are already right: element-wise math stays local, and a
reduction over a sharded dim (MARS's norm of ``c``, CAME's column means, the
mean of CAME's row statistics, caution's ``mean(mask)``, the RMS clip) becomes
a ``Partial`` result that DTensor all-reduces the first time it meets a
sharded tensor. The rules write means as ``sum / n``: on an unevenly sharded
dim (7 rows on 2 ranks) DTensor's ``mean`` all-gathers the whole input, while
``sum`` all-reduces only the reduced result.

Two things are not left to DTensor:

- :func:`reduced_zeros` creates state that is a reduction of a parameter
  (CAME's factored row/column statistics) with the placements that reduction
  has, so the in-place updates of the rules never need a placement change.
- :func:`whole_tensor` runs a function on the whole tensor: the Newton-Schulz
  iteration of MARS-Shampoo gathers the momentum once (one all-gather), iterates
  locally and keeps this rank's shard of the result. Run directly on a Shard(0)
  DTensor the 5 iterations cost 21 collectives (6 all-reduce, 5 all-gather,
  10 reduce-scatter) per matrix and are slower at every size measured
  (docs/distributed.md).

Without torch.distributed every helper is the single-process identity.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

try:  # torch.distributed is optional (some builds ship without it)
    from torch.distributed.tensor import DTensor, Replicate
except ImportError:  # pragma: no cover - depends on the torch build
    DTensor = None  # type: ignore[assignment,misc]
    Replicate = None  # type: ignore[assignment,misc]


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``."""
    return DTensor is not None and isinstance(t, DTensor)


def mesh_of(t: Tensor) -> Any:
    """The device mesh of a DTensor, ``None`` for a plain tensor (tensors of different meshes never share a kernel)."""
    return t.device_mesh if is_dtensor(t) else None


def reduced_zeros(p: Tensor, view_shape: Sequence[int], dim: int, dtype: torch.dtype) -> Tensor:
    """Zeros shaped like ``p.reshape(view_shape).sum(dim)``.

    For a DTensor ``p`` the result is a DTensor placed as that reduction is, with
    ``Partial`` replaced by ``Replicate``: a ``[n, m]`` parameter sharded on rows
    gets a row statistic ``[n]`` sharded like the rows and a replicated column
    statistic ``[m]``. No communication (the zeros are the same on every rank).
    """
    if not is_dtensor(p):
        shape = list(view_shape)
        del shape[dim]
        return torch.zeros(tuple(shape), dtype=dtype, device=p.device)
    probe = torch.zeros_like(p, dtype=dtype).reshape(tuple(view_shape)).sum(dim=dim)
    placements = [Replicate() if pl.is_partial() else pl for pl in probe.placements]
    return DTensor.from_local(probe.to_local(), probe.device_mesh, placements, run_check=False,
                              shape=probe.shape, stride=probe.stride())


def placed_like(t: Tensor, like: Tensor) -> Tensor:
    """``t`` redistributed to the placements of ``like`` when both are DTensors that differ (else ``t``).

    DTensor's sharding propagation replicates the result of a broadcast against a
    sharded dim of size 1 (a ``[1, n]`` matrix on 2 ranks); an in-place update of
    sharded state by such a result would need a placement change, which DTensor
    refuses. Replicate -> Shard is a local slice (no communication).
    """
    if is_dtensor(t) and is_dtensor(like) and t.placements != like.placements:
        return t.redistribute(like.device_mesh, like.placements)
    return t


def whole_tensor(fn: Callable) -> Callable:
    """Run ``fn(x, **kw)`` on the whole of a DTensor ``x``; return a DTensor placed as ``x``.

    Every rank gathers ``x`` (one all-gather), computes ``fn`` on it and keeps its
    own shard of the result (a local slice). Plain tensors go straight to ``fn``.
    """

    @functools.wraps(fn)
    def wrapper(x, *args, **kwargs):
        if not is_dtensor(x):
            return fn(x, *args, **kwargs)
        out = fn(x.full_tensor(), *args, **kwargs)
        mesh = x.device_mesh
        return DTensor.from_local(out, mesh, [Replicate()] * mesh.ndim, run_check=False).redistribute(
            mesh, x.placements)

    return wrapper
