"""What shine needs to run on DTensor parameters (FSDP2's ``fully_shard``, tensor parallelism).

The update rules are written as whole-tensor torch operations, so on a sharded
DTensor most of them are already right: element-wise math stays local, and a
reduction over a sharded dim (MARS's norm of ``c``, CAME's column means, the
mean of CAME's row statistics, caution's ``mean(mask)``, the RMS clip) becomes
a ``Partial`` result that DTensor all-reduces the first time it meets a
sharded tensor. The rules write means as ``sum / n``: on an unevenly sharded
dim (7 rows on 2 ranks) DTensor's ``mean`` all-gathers the whole input, while
``sum`` all-reduces only the reduced result.

Three things are not left to DTensor:

- :func:`reduced_zeros` creates state that is a reduction of a parameter
  (CAME's factored row/column statistics) with the placements that reduction
  has, so the in-place updates of the rules never need a placement change.
- :func:`whole_tensor` runs a function on the whole tensor: the Newton-Schulz
  iteration of MARS-Shampoo gathers the momentum once (one all-gather), iterates
  locally and keeps this rank's shard of the result; over a bucket's matrices the
  ranks take turns, each iterating on 1/N of them and scattering the results. Run
  directly on a Shard(0) DTensor the 5 iterations cost 21 collectives (6
  all-reduce, 5 all-gather, 10 reduce-scatter) per matrix and are slower at every
  size measured (docs/distributed.md).
- :func:`localise` steps the local shards of a bucket whose step is the shard of the
  whole step once its whole-tensor sums are complete (AdamW, Lion, the MARS
  correction, caution, CAME split along its rows or columns): :class:`ShardSums`
  completes those sums over the mesh in one all-reduce per bucket, where DTensor
  would all-reduce each tensor's and dispatch every operation.

Without torch.distributed every helper is the single-process identity.
"""
from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .validation import warn_once

try:  # torch.distributed is optional (some builds ship without it)
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
except ImportError:  # pragma: no cover - depends on the torch build
    DTensor = None  # type: ignore[assignment,misc]
    Replicate = Shard = None  # type: ignore[assignment,misc]
    distribute_tensor = None  # type: ignore[assignment]
try:  # FSDP2's placement over tensor parallelism's Shard of the same dim (private; absent in older torch)
    from torch.distributed.tensor.placement_types import _StridedShard
except ImportError:  # pragma: no cover - depends on the torch build
    _StridedShard = None  # type: ignore[assignment,misc]


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``."""
    return DTensor is not None and isinstance(t, DTensor)


def layout_of(t: Tensor) -> Any:
    """The device mesh and placements of a DTensor, ``None`` for a plain tensor: tensors of
    different meshes never share a kernel, and a bucket of one placement can step its local
    shards (:func:`localise`) where tensor parallelism's mix of ``Shard(0)`` and ``Shard(1)``
    would keep the whole bucket on the DTensors."""
    return (t.device_mesh, tuple(t.placements)) if is_dtensor(t) else None


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
    """Run ``fn(x, **kw)`` on the whole of a DTensor ``x``; return a DTensor placed as ``x``
    (``fn`` returns a tensor shaped like its input, in its dtype).

    Every rank gathers ``x`` (one all-gather), computes ``fn`` on it and keeps its own shard of
    the result (a local slice). A list-like of DTensors (a TensorList of one mesh) is shared out
    instead where :func:`_turn_taking_mesh` finds a mesh dimension to share it over
    (:func:`_round_robin`): each tensor's ``fn`` is computed by one rank of that dimension.
    Plain tensors go straight to ``fn``, a list-like of them tensor by tensor.
    """

    @functools.wraps(fn)
    def wrapper(x, **kwargs):
        if isinstance(x, Tensor) and not is_dtensor(x):
            return fn(x, **kwargs)
        if isinstance(x, Tensor):
            out = fn(x.full_tensor(), **kwargs)
            mesh = x.device_mesh
            return DTensor.from_local(out, mesh, [Replicate()] * mesh.ndim, run_check=False).redistribute(
                mesh, x.placements)
        tensors = list(x)
        turns = {_turn_taking_mesh(t) if is_dtensor(t) else None for t in tensors}
        if len(turns) == 1 and None not in turns:
            return type(x)(_round_robin(functools.partial(fn, **kwargs), tensors, *turns.pop()))
        return type(x)(wrapper(t, **kwargs) for t in tensors)

    return wrapper


#: Whether ``distribute_tensor`` can scatter from a chosen rank (``src_data_rank``, torch 2.6).
_SCATTERS = DTensor is not None and "src_data_rank" in inspect.signature(distribute_tensor).parameters


def _turn_taking_mesh(t: Tensor) -> tuple[Any, int] | None:
    """The 1-D mesh whose ranks take turns over tensors placed like ``t``, and its dimension in
    ``t``'s mesh: the mesh dimension ``t`` is sharded on (on its other dimensions ``t`` is
    replicated, and each replica group takes its own turns, as HSDP's do). Tensors sharded along
    other tensor dims (tensor parallelism's ``Shard(0)`` and ``Shard(1)``) share the same turns.
    ``None`` where there is none to take: ``t`` sharded on several dimensions, or on an unnamed
    dimension of a mesh of several (a submesh is taken by name), a ``Partial`` placement, or no
    ``src_data_rank`` in this torch."""
    mesh = t.device_mesh
    sharded = [dim for dim, pl in enumerate(t.placements) if pl.is_shard()]
    if (not _SCATTERS or len(sharded) != 1 or not all(pl.is_shard() or pl.is_replicate() for pl in t.placements)
            or (mesh.ndim > 1 and not mesh.mesh_dim_names)):
        return None
    dim = sharded[0]
    return (mesh if mesh.ndim == 1 else mesh[mesh.mesh_dim_names[dim]]), dim


def _round_robin(fn: Callable[[Tensor], Tensor], tensors: list[Tensor], turns: Any, dim: int) -> list[Tensor]:
    """``fn`` of each of ``tensors`` (DTensors of one mesh, each sharded on its dimension ``dim``
    only), each computed by one rank of the 1-D mesh ``turns`` over that dimension: the i-th by
    its ``i mod N``-th rank. In waves of one tensor per rank: each tensor of the wave is gathered
    (an all-gather, as :func:`whole_tensor` does; the ranks that do not own it drop it at once, so
    a rank holds one whole tensor besides its own), every rank computes its own tensor's ``fn``,
    and each result is scattered from its rank as the tensor is placed. Every rank thus computes
    1/N of the results, where each computed all of them (as Distributed Shampoo shares out its
    preconditioners)."""
    size, me = turns.size(), turns.get_local_rank()
    out: list[Tensor] = []
    for start in range(0, len(tensors), size):
        wave = tensors[start:start + size]
        mine = None
        for owner, t in enumerate(wave):
            whole = t.full_tensor()
            if owner == me:
                mine = whole
        result = fn(mine) if mine is not None else None
        for owner, t in enumerate(wave):
            data = result if owner == me else torch.empty(t.shape, dtype=t.dtype, device=t.to_local().device)
            local = distribute_tensor(data, turns, [t.placements[dim]], src_data_rank=owner).to_local()
            out.append(DTensor.from_local(local, t.device_mesh, t.placements, run_check=False,
                                          shape=t.shape, stride=t.stride()))
    return out


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
    layouts: dict[Any, list[Tensor]] = {}
    for g in grads:
        if is_dtensor(g):
            layouts.setdefault(layout_of(g), []).append(g)
    for dtensors in layouts.values():
        local = [t.to_local() for t in dtensors if t.to_local().numel()]
        device = local[0].device if local else dtensors[0].device_mesh.device_type
        square = torch.tensor(norm(local) ** 2 if local else 0.0, dtype=torch.float64, device=device)
        total += ShardSums(dtensors[0])(square).item()
    return math.sqrt(total)


def _splits(placement: Any) -> bool:
    """Whether ``placement`` splits a tensor dim over its mesh dim, each rank holding a part:
    ``Shard``, or the ``_StridedShard`` that FSDP2 places over tensor parallelism's ``Shard`` of
    the same dim (which torch does not count as a ``Shard``: summed as one, the global gradient
    norm of FSDP2 over tensor parallelism left out the other ranks' parts, 0.785 for 0.791)."""
    return placement.is_shard() or (_StridedShard is not None and isinstance(placement, _StridedShard))


def _splits_or_copies(placements: Sequence[Any]) -> bool:
    """Whether every mesh dim either splits the tensor (:func:`_splits`) or holds a copy of it:
    no ``Partial``, so each rank's local values are its part of the whole tensor."""
    return all(_splits(pl) or pl.is_replicate() for pl in placements)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if is_dtensor(t) else t


class ShardSums:
    """Sums per-tensor values over the shards of DTensors placed like ``like`` (Shard or Replicate
    placements): for every tensor of a call at once, one all-reduce per sharded mesh dimension
    (replicated dimensions hold copies and are not summed). What lets a step whose whole-tensor
    quantities are sums (MARS's clip norm, caution's kept fraction, CAME's means over rows) run on
    the local shards: a shard's sum, summed over the shards, is the whole tensor's.

    For CAME's sums along one dim of its factored view, each sharded mesh dimension splits the
    view's rows (a tensor dim 0: -2) or its columns (a matrix's dim 1: -1); such a sum is
    completed over the mesh dimensions that split its dim only (:meth:`splits`, ``along``)."""

    def __init__(self, like: Tensor):
        mesh = like.device_mesh
        self.groups = [(mesh.get_group(dim), -2 if pl.dim == 0 else -1)
                       for dim, pl in enumerate(like.placements) if _splits(pl)]

    def splits(self, dim: int) -> bool:
        """Whether sums along ``dim`` of the factored view cover only a shard (and so need this)."""
        return any(along == dim for _, along in self.groups)

    def __call__(self, values: Any, *sizes: Any, along: int | None = None) -> Any:
        """``values`` (a tensor, or a TensorList, one per tensor: sums of this rank's shards)
        summed over the shards (over those that split ``along``, a dim of the factored view,
        where given); with ``sizes`` (each an int, or with a TensorList a list of ints: how many
        elements those sums are over), the tuple of ``values`` and the sizes, summed too, as 0-d
        tensors in the dtype of ``values``. In float64. Every rank must make the same calls in
        the same order."""
        single = isinstance(values, Tensor)
        tensors = [values] if single else list(values)
        numbers = [x for column in sizes for x in ([column] if single else column)]
        buffer = torch.cat([t.reshape(-1) for t in tensors]).to(torch.float64)
        if numbers:
            buffer = torch.cat([buffer, on_device(torch.tensor(numbers, dtype=torch.float64), buffer.device)])
        for group, splits in self.groups:
            if along is None or splits == along:
                torch.distributed.all_reduce(buffer, group=group)
        parts = buffer.to(tensors[0].dtype).split([t.numel() for t in tensors] + [1 if single else len(c) for c in sizes])
        columns = [[part.view(t.shape) for part, t in zip(parts, tensors)]]
        columns += [list(part.unbind()) for part in parts[len(tensors):]]
        columns = [c[0] if single else type(values)(c) for c in columns]
        return tuple(columns) if sizes else columns[0]


def on_device(t: Tensor, device: torch.device) -> Tensor:
    """``t`` (on the host) copied to ``device`` without waiting for the device: a copy from
    pageable memory to a CUDA device synchronises with its stream, one from pinned memory does not."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def localise(path: str, fused_flag: bool | None, pipe: Any, params: list[Tensor], grads: list[Tensor],
             states: list[dict[str, Any]]
             ) -> tuple[str, list[Tensor], list[Tensor], list[dict[str, Any]], ShardSums | None]:
    """The execution path and tensors for a bucket of DTensor parameters (plain buckets unchanged),
    and the :class:`ShardSums` its step completes its sums with (``None``: none needed).

    - A pipeline with an element-wise preconditioner (:attr:`~shine.engine.Pipeline.shardwise`:
      AdamW, Lion, MARS-Lion's sign, with or without caution and the MARS correction) runs on
      the local shards (``to_local()`` views, updated in place): no DTensor dispatch. Without
      caution or the correction (:attr:`~shine.engine.Pipeline.elementwise`) a shard's step is
      the shard of the whole step, on whichever path was chosen, fused included. With them, the
      clip norm and the kept fraction are sums that a :class:`ShardSums` completes, one
      all-reduce for all the bucket's tensors; the compiled path cannot call it mid-graph, so
      those take the multi-tensor path.
    - CAME (:attr:`~shine.engine.Pipeline.factored_shardwise`) does the same where the shards
      split the rows of its factored view (FSDP2's ``Shard(0)``), the columns of a matrix
      (tensor parallelism's row-wise ``Shard(1)``), or both (:func:`_factored_split`), its sums
      along a split dim completed by a :class:`ShardSums`.
    - Any other bucket (MARS-Shampoo; CAME split otherwise) runs on the DTensors, whose
      reductions DTensor completes tensor by tensor, on the multi-tensor path.

    Falling back from ``fused=True`` warns once.
    """
    if not params or not is_dtensor(params[0]):
        return path, params, grads, states, None
    placements = params[0].placements
    same = all(is_dtensor(t) and t.placements == placements
               for t in (*params, *grads, *(v for s in states for v in s.values() if isinstance(v, Tensor)
                                           and v.ndim)))
    if same and pipe.shardwise and _splits_or_copies(placements):
        sums = None if pipe.elementwise else ShardSums(params[0])
    elif pipe.factored_shardwise and _factored_split(params, grads, states):
        sums = ShardSums(params[0])
    else:
        return _unfused(path, fused_flag, pipe), params, grads, states, None
    return (path if sums is None else _unfused(path, fused_flag, pipe), [_local(p) for p in params],
            [_local(g) for g in grads], [{k: _local(v) for k, v in s.items()} for s in states], sums)


def _factored_split(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]]) -> bool:
    """Whether CAME can step the bucket's local shards: every parameter split along dim 0 (the
    rows of its factored view), along dim 1 of a matrix (its columns), or both (FSDP2 over
    tensor parallelism's row-wise layers), over mesh dims that are otherwise replicated; its
    gradient and full-size state placed alike; its row statistics split as the rows are and its
    column statistics as the columns are. Not so for CAME's "last2" factoring of a conv kernel,
    whose higher-rank statistics are split along a batch dim."""
    placements = params[0].placements
    dims = {pl.dim for pl in placements if _splits(pl)}
    if (not _splits_or_copies(placements) or not dims <= {0, 1}
            or (1 in dims and any(p.ndim != 2 for p in params))):
        return False
    rows = tuple(pl if _splits(pl) and pl.dim == 0 else Replicate() for pl in placements)
    columns = tuple(Shard(0) if _splits(pl) and pl.dim == 1 else Replicate() for pl in placements)
    for p, g, state in zip(params, grads, states):
        if not (is_dtensor(p) and is_dtensor(g) and p.placements == g.placements == placements):
            return False
        for t in state.values():
            if not isinstance(t, Tensor) or t.ndim == 0:
                continue
            if not is_dtensor(t):
                return False
            full = t.shape == p.shape and t.placements == placements
            if not (full or (t.ndim == 1 and t.placements in (rows, columns))):
                return False
    return True


def _unfused(path: str, fused_flag: bool | None, pipe: Any) -> str:
    """``path``, with the fused path replaced by the multi-tensor path (one warning where
    ``fused=True`` asked for it)."""
    if path != "fused":
        return path
    if fused_flag:
        what = ("cautious " if pipe.cautious else "") + ("MARS-corrected " if pipe.correction else "")
        warn_once(f"shine: fused=True is not available for {what}{pipe.precondition.__name__} on DTensor "
                  "parameters (whole-tensor reductions over shards); using the multi-tensor path")
    return "foreach"
