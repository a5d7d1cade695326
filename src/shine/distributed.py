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
import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .validation import warn_once

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


def check_layout(p: Tensor, optimizer: str, whole_tensor_math: bool) -> None:
    """Refuse parameters flattened by FSDP1 (``FullyShardedDataParallel``) where the math needs shapes.

    FSDP1 hands the optimizer 1-D flat shards (with or without ``use_orig_params``), so
    a per-tensor norm or mean, CAME's factoring or Newton-Schulz would silently compute
    something else. Element-wise optimizers (AdamW, Lion without caution) are unaffected.
    """
    if whole_tensor_math and getattr(p, "_fsdp_flattened", False):
        raise ValueError(
            f"{optimizer} needs each parameter whole or as a DTensor, but got a parameter flattened by FSDP1 "
            f"(FullyShardedDataParallel; shape {tuple(p.shape)}): its per-tensor norms, means, factoring and "
            "Newton-Schulz would be computed over flat shards. Shard the model with FSDP2 "
            "(torch.distributed.fsdp.fully_shard) instead; see docs/distributed.md.")


def grads_finite(grads: list[Tensor], check: Callable[[list[Tensor]], bool]) -> bool:
    """``check`` (a finite test of plain tensors) over ``grads``, DTensor gradients included.

    Each rank checks its local shards (empty shards skipped: an inf-norm of an empty
    tensor is an error) and one all-reduce per mesh makes the verdict the same on
    every rank, so that all of them skip (or raise) together.
    """
    plain = [g for g in grads if not is_dtensor(g) and g.numel()]
    finite = check(plain) if plain else True
    meshes: dict[Any, list[Tensor]] = {}
    for g in grads:
        if is_dtensor(g):
            meshes.setdefault(g.device_mesh, []).append(g.to_local())
    for mesh, local in meshes.items():
        local = [t for t in local if t.numel()]
        bad = torch.zeros(1, device=local[0].device if local else mesh.device_type)
        if local and not check(local):
            bad += 1
        for dim in range(mesh.ndim):
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX, group=mesh.get_group(dim))
        finite = finite and not bool(bad)
    return finite


def grad_norm(grads: list[Tensor], norm: Callable[[list[Tensor]], float]) -> float:
    """The global Euclidean norm of ``grads`` (``norm`` computes it for plain tensors), DTensor
    gradients included: the squared norm of each rank's local shards is summed over the mesh
    dimensions the tensor is sharded on (replicated dimensions hold copies and are not summed),
    so every rank gets the norm of the whole tensors, as one process would."""
    plain = [g for g in grads if not is_dtensor(g) and g.numel()]
    total = norm(plain) ** 2 if plain else 0.0
    layouts: dict[tuple, list[Tensor]] = {}
    for g in grads:
        if is_dtensor(g):
            layouts.setdefault((g.device_mesh, tuple(g.placements)), []).append(g.to_local())
    for (mesh, placements), local in layouts.items():
        local = [t for t in local if t.numel()]
        device = local[0].device if local else mesh.device_type
        square = torch.tensor([norm(local) ** 2 if local else 0.0], dtype=torch.float64, device=device)
        for dim, placement in enumerate(placements):
            if placement.is_shard():
                torch.distributed.all_reduce(square, group=mesh.get_group(dim))
        total += square.item()
    return math.sqrt(total)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if is_dtensor(t) else t


def localise(path: str, fused_flag: bool | None, pipe: Any, params: list[Tensor], grads: list[Tensor],
             states: list[dict[str, Any]]) -> tuple[str, list[Tensor], list[Tensor], list[dict[str, Any]]]:
    """The execution path and tensors for a bucket of DTensor parameters (plain buckets unchanged).

    - An element-wise pipeline (AdamW, Lion without caution or MARS correction) gives the same
      numbers on every shard as on the whole tensor, so it runs on the local shards
      (``to_local()`` views, updated in place) on whichever path was chosen, fused included:
      no DTensor dispatch, no communication.
    - Any other pipeline needs whole-tensor reductions and runs on the DTensors; the fused
      path cannot trace those (uneven shards cannot be flattened), so it falls back to the
      multi-tensor path (one warning when ``fused=True`` was asked for).
    """
    if not params or not is_dtensor(params[0]):
        return path, params, grads, states
    placements = params[0].placements
    same = all(is_dtensor(t) and t.placements == placements
               for t in (*params, *grads, *(v for s in states for v in s.values() if isinstance(v, Tensor)
                                           and v.ndim)))
    if same and pipe.elementwise:
        return (path, [_local(p) for p in params], [_local(g) for g in grads],
                [{k: _local(v) for k, v in s.items()} for s in states])
    if path == "fused":
        if fused_flag:
            what = ("cautious " if pipe.cautious else "") + ("MARS-corrected " if pipe.correction else "")
            message = (f"shine: fused=True is not available for {what}{pipe.precondition.__name__} on DTensor "
                       "parameters (whole-tensor reductions over shards); using the multi-tensor path")
            warn_once(message)
        path = "foreach"
    return path, params, grads, states
