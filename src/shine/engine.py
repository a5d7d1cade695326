"""Runs one pipeline of rules over a bucket of tensors, on one of three execution paths.

A *pipeline* is one path through the boxes of :mod:`shine.rules`
(estimate -> precondition -> mask -> apply); a *bucket* is the tensors of one
parameter group that take the same pipeline, live on the same device, have the
same dtype, the same step count and the same layout (plain tensors, or DTensors of
one mesh and placement). :func:`pipeline_step` is the only place the
boxes are composed, and every path calls it:

- ``"per_tensor"``: a Python loop, one tensor at a time (the reference);
- ``"foreach"``: once, on :class:`TensorList` s (multi-tensor kernels);
- ``"fused"``: the per-tensor loop traced by ``torch.compile`` into fused kernels,
  a group of tensors per call, with the float hyperparameters packed in one float64
  tensor so that a scheduler never triggers a recompile. This module is the only one that calls
  ``torch.compile``; the rules ask ``torch.compiler.is_compiling()`` only where a
  formula's compiled form differs from its eager one.

Whole-tensor quantities a step needs before its element-wise pass (MARS's clip, caution's
kept fraction, CAME's row statistics) come from :func:`pipeline_prepass`, which only reads;
on the fused path it can run for a whole bucket first (:func:`prepare_bucket`) and then
doubles as the non-finite check of the gradients it read. The other checks are here too:
:func:`grads_finite` and the global norm of ``max_grad_norm`` (:func:`grad_norm`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import types
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from . import rules, tensorlist
from .distributed import is_dtensor, on_device
from .rules.hoist import hoist
from .tensorlist import ROWWISE_MIN_NUMEL, TensorList, has_values, per_tensor, sum_of_squares
from .validation import LOW_PRECISION, warn_once

PATHS = ("per_tensor", "foreach", "fused")


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """One path through the boxes: which preconditioner, with which state and hyperparameters.

    ``state`` and ``hyper`` name, in order, the state tensors and the keyword
    hyperparameters that ``precondition`` takes. ``correction`` prepends the
    MARS gradient estimate (state ``prev_grad``; hyperparameters ``gamma`` and
    ``beta1``); with ``approx`` the current gradient is then copied into
    ``prev_grad`` (a copy, never an alias). ``cautious`` masks the direction.
    ``scalars`` derives further hyperparameters from the others (e.g. bias
    corrections from the step count), once per step, in Python floats.
    ``direction_sign(x, exp_avg, beta1=)`` returns, without writing anything, a
    tensor with the sign of the direction ``precondition`` will return; with it
    the fused path counts caution's kept fraction in a read-only pre-pass
    (:func:`pipeline_prepass`), so the step itself is one element-wise pass.
    ``statistics`` takes ``precondition``'s arguments and returns, without writing anything,
    a whole-tensor statistic of ``x`` that ``precondition`` then takes as ``stats=`` instead of
    computing it (CAME's row means of ``x^2``): the pre-pass computes it.
    """

    precondition: Callable
    state: tuple[str, ...]
    hyper: tuple[str, ...]
    correction: bool = False
    approx: bool = True
    cautious: bool = False
    maximize: bool = False
    scalars: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    direction_sign: Callable | None = None
    statistics: Callable | None = None

    @property
    def elementwise(self) -> bool:
        """Whether each element's step reads only that element of every tensor (AdamW, Lion, without
        caution or the MARS correction, whose means and norms span the tensor): the step of a slice
        of a tensor, or of a shard, is then that slice of the whole tensor's step."""
        return self.shardwise and not self.cautious and not self.correction

    @property
    def shardwise(self) -> bool:
        """Whether the preconditioner is element-wise (AdamW, Lion, MARS-Lion's sign), so that the
        step's only whole-tensor quantities are sums (MARS's clip norm, caution's kept fraction):
        given those sums over the whole tensor (``hyper["shard_sums"]``, a
        :class:`~shine.distributed.ShardSums`), the step of a shard is the shard of the step."""
        return self.precondition in _ELEMENTWISE

    @property
    def factored_shardwise(self) -> bool:
        """Whether, on shards split along the rows of CAME's factored view (dim 0 of a vector or
        matrix, the rows of its ``"flatten"`` view), the columns of a matrix, or both, the step is
        the shard of the step once its sums are completed over the shards: :attr:`shardwise`
        pipelines, and CAME, whose preconditioner then takes the
        :class:`~shine.distributed.ShardSums` as ``across`` for its sums along the split dim."""
        return self.shardwise or self.precondition in _FACTORED

    @property
    def prepass(self) -> bool:
        """Whether the step needs whole-tensor quantities that a read-only pre-pass can compute
        first (MARS's clip, caution's kept fraction with a ``direction_sign``, ``statistics``)."""
        return self.correction or (self.cautious and self.direction_sign is not None) or self.statistics is not None


def pipeline_step(pipe: Pipeline, p, g, state: dict[str, Any], hyper: dict[str, Any],
                  prepared: dict[str, Any] | None = None) -> None:
    """Advance ``p`` (a tensor or TensorList) by one step of ``pipe``; updates ``state`` in place.

    Low-precision parameters are updated through an fp32 copy (their state is fp32
    unless the optimizer was built with ``state_dtype=torch.bfloat16``). Low-precision
    state tensors of the preconditioner are also worked on in fp32 and written back
    once; ``hyper["stochastic_rounding"]`` (default False) rounds those write-backs
    (parameter and state) stochastically instead of to nearest. ``prev_grad`` is a
    plain copy and is always rounded to nearest. ``prepared`` holds what
    :func:`pipeline_prepass` computed beforehand (the step then does not recompute it).
    """
    prepared = prepared or {}
    upcast = _dtype_of(p) in LOW_PRECISION
    work = p.float() if upcast else p
    stored, (g, state, low) = state, _working_copies(pipe, g, state, hyper, upcast)
    x = _estimate(pipe, g, state, hyper, prepared.get("clip"))
    if pipe.correction and pipe.approx:
        state["prev_grad"].copy_(g)
    stats = {"stats": prepared["stats"]} if "stats" in prepared else {}
    u = pipe.precondition(x, *_preconditioner_args(pipe, state), **_preconditioner_kwargs(pipe, hyper), **stats)
    if pipe.cautious:
        u = rules.caution(u, g, prepared.get("kept"), across=hyper.get("shard_sums"))
    rules.apply_update(work, u, lr=hyper["lr"], decay=hyper["decay"])
    stochastic = hyper.get("stochastic_rounding", False)
    if upcast:
        _write_back(p, work, stochastic)
    for name in low:
        _write_back(stored[name], state[name], stochastic)


def pipeline_prepass(pipe: Pipeline, g, state: dict[str, Any], hyper: dict[str, Any],
                     upcast: bool) -> dict[str, Any]:
    """The whole-tensor quantities the coming step of a ``pipe`` with a :attr:`Pipeline.prepass`
    needs before its element-wise pass, read from ``g`` and the state without writing them: the
    MARS correction's clip (``"clip"``), caution's kept fraction (``"kept"``) and the
    preconditioner's ``statistics`` (``"stats"``). Also ``"probe"``: a 0-d tensor that is finite
    exactly when every element of ``g`` is (the clip norm, else the largest statistic, else the
    largest ``|g|``; the first two can also overflow, which the exact check tells apart), so
    the pre-pass doubles as the non-finite check."""
    g, state, _ = _working_copies(pipe, g, state, hyper, upcast)
    prepared = {}
    if pipe.correction:
        prepared["clip"] = rules.mars_clip(g, state["prev_grad"], gamma=hyper["gamma"], beta1=hyper["beta1"])
    x = _estimate(pipe, g, state, hyper, prepared.get("clip"))
    if pipe.cautious and pipe.direction_sign is not None:
        prepared["kept"] = rules.kept_fraction(pipe.direction_sign(x, state["exp_avg"], beta1=hyper["beta1"]), g)
    if pipe.statistics is not None:
        prepared["stats"] = pipe.statistics(x, *_preconditioner_args(pipe, state), **_preconditioner_kwargs(pipe, hyper))
    # a max, not a sum: inductor picks a summing helper from the reduction's size and guards on
    # it, which compiled CAME's pre-pass twice (over and under 4096 rows)
    prepared["probe"] = (prepared["clip"] if pipe.correction
                         else prepared["stats"].amax() if "stats" in prepared else g.abs().amax())
    return prepared


def _preconditioner_args(pipe: Pipeline, state: dict[str, Any]) -> list:
    return [state[name] for name in pipe.state]


def _preconditioner_kwargs(pipe: Pipeline, hyper: dict[str, Any]) -> dict[str, Any]:
    kwargs = {k: hyper[k] for k in pipe.hyper}
    if "shard_sums" in hyper and pipe.precondition in _FACTORED:
        kwargs["across"] = hyper["shard_sums"]
    return kwargs


def _working_copies(pipe: Pipeline, g, state: dict[str, Any], hyper: dict[str, Any], upcast: bool):
    """The gradient (fp32 for low-precision parameters, times ``hyper["grad_scale"]`` when
    clipped, negated for ``maximize``), the state with the preconditioner's low-precision tensors
    as fp32 copies, and the names of those."""
    g = g.float() if upcast else g
    scale = hyper.get("grad_scale", 1.0)
    if isinstance(scale, Tensor) or scale != 1.0:  # compiled: always (a tensor), so no recompile
        g = g * scale
    if pipe.maximize:
        g = -g
    low = [name for name in pipe.state if _dtype_of(state[name]) in LOW_PRECISION]
    return g, ({**state, **{name: state[name].float() for name in low}} if low else state), low


def _estimate(pipe: Pipeline, g, state: dict[str, Any], hyper: dict[str, Any], clip=None):
    """The gradient estimate the preconditioner takes: MARS's corrected gradient, or ``g``."""
    if pipe.correction:
        return rules.mars_correction(g, state["prev_grad"], gamma=hyper["gamma"], beta1=hyper["beta1"], clip=clip,
                                     across=hyper.get("shard_sums"))
    return g


def _write_back(dst, src, stochastic: bool) -> None:
    """``dst.copy_(src)``: fp32 ``src`` into low-precision ``dst``, rounded to nearest or stochastically."""
    dst.copy_(stochastic_round(src, _dtype_of(dst)) if stochastic and _dtype_of(dst) == torch.bfloat16 else src)


@per_tensor
def stochastic_round(x: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """fp32 ``x`` rounded to bfloat16 stochastically: up with probability equal to the distance
    to the lower neighbour (in units of the bf16 spacing), so the rounding is unbiased in
    expectation. Adds 16 random bits below the bf16 mantissa and truncates; inf stays inf.
    """
    bits = x.view(torch.int32)
    rounded = ((bits + _random_bits16(bits)) & -65536).view(torch.float32)
    return torch.where(x != x, x, rounded).to(dtype)  # x != x: NaN; inductor vectorises it, not isnan()


def _random_bits16(like: Tensor) -> Tensor:
    """Uniform random integers in [0, 2**16), one per element of ``like`` (int32).

    Eager, and compiled for GPUs (where inductor generates its random numbers inside the kernel):
    ``torch.randint_like``. Compiled for the CPU: a hash of (element index + a random per-call
    offset), which inductor fuses into the kernel; its CPU random-number kernels made a rounded
    write-back 5x slower. The hash is a bijection of the 32-bit integers (multiply by an odd
    number, fold the high half into the low, multiply again) and the offset is uniform over all
    of them, so each element's 16 bits are exactly uniform over the offset's draw: the rounding
    is unbiased. The fold and the second multiplication decorrelate neighbours: a multiplication
    alone (Knuth's hash) gave elements 1, 8, 55, 987 and 4096 apart correlations of -0.53, 0.78,
    0.97, 1.00 and -0.87 between their rounding decisions at probability 1/2 (0.00 now; 4000
    draws of 16384 elements). (The hash's int32 index arithmetic also failed to compile in
    Triton, for 2-D tiled kernels: torch 2.11 on an H200 typed the index int64.)
    """
    if not torch.compiler.is_compiling() or like.device.type != "cpu":
        return torch.randint_like(like, 0, 1 << 16)
    offset = hoist(torch.randint(-(1 << 31), 1 << 31, (), device=like.device, dtype=torch.int32))  # once per call
    index = torch.arange(like.numel(), device=like.device).view(like.shape).to(torch.int32)  # modulo 2**32
    h = (index + offset) * _HASH_MULTIPLIERS[0]
    h = (h ^ ((h >> 16) & 0xFFFF)) * _HASH_MULTIPLIERS[1]  # >> is arithmetic: & keeps the logical shift's bits
    return (h >> 16) & 0xFFFF


#: Knuth's multiplicative constant 0x9E3779B1 and MurmurHash3's 0x85EBCA6B as int32s (minus
#: 2**32). int32 arithmetic wraps modulo 2**32, so bits 16-31 of the products are those of the
#: int64 forms, and the kernel works on 16 int32 lanes at a time instead of 8 int64 ones. With
#: the offset drawn once per call (it had been drawn in every vector block) and NaN found by
#: ``x != x``, a bf16-state AdamW step on GPT-2 small took 0.45 of the time it took before.
_HASH_MULTIPLIERS = (0x9E3779B1 - (1 << 32), 0x85EBCA6B - (1 << 32))


def _dtype_of(p) -> torch.dtype:
    return p.tensors[0].dtype if isinstance(p, TensorList) else p.dtype


def run_bucket(path: str, pipe: Pipeline, params: list[Tensor], grads: list[Tensor],
               states: list[dict[str, Tensor]], hyper: dict[str, Any],
               prepared: PreparedBucket | None = None) -> None:
    """Apply one step of ``pipe`` to every tensor of a bucket on the chosen execution path;
    ``prepared`` is what :func:`prepare_bucket` returned for it."""
    hyper = _with_scalars(pipe, hyper)
    if path == "per_tensor":
        for p, g, s in zip(params, grads, states):
            pipeline_step(pipe, p, g, s, hyper)
    elif path == "foreach":
        _run_foreach(pipe, params, grads, states, hyper)
    elif path == "fused":
        _run_fused(pipe, params, grads, states, hyper, prepared)
    else:
        raise ValueError(f"unknown execution path {path!r}; expected one of {PATHS}")


def prepare_bucket(path: str, pipe: Pipeline, params: list[Tensor], grads: list[Tensor],
                   states: list[dict[str, Tensor]], hyper: dict[str, Any]) -> PreparedBucket | None:
    """Run the read-only pre-pass (:func:`pipeline_prepass`) of a fused bucket, before any tensor
    of any bucket is stepped, so that it doubles as the non-finite check of the gradients it
    reads; ``None`` where there is none (other paths, pipelines without one, devices not in
    :data:`PREPASS_CHECK_DEVICES`: there the step computes it in its own graph). The result goes
    to :func:`run_bucket`, which then reuses its groups instead of building them again.
    """
    if (path != "fused" or not pipe.prepass or not _fusable(pipe, params[0].device)
            or params[0].device.type not in PREPASS_CHECK_DEVICES):
        return None
    hyper = _with_scalars(pipe, hyper)
    packed = _packed(hyper, params[0].device)
    upcast = _dtype_of(params[0]) in LOW_PRECISION
    calls, probes = [], []
    _, (params, grads, states) = _large(params, grads, states)
    for group in _fused_groups(pipe, params, grads, states):
        try:
            results = _call_compiled(fused_prepass, group.key, pipe, group.grads, group.states, *packed, upcast,
                                     group_size=len(group.params))
        except _CompileFailed:
            return None
        found = [r.pop("probe") for r in results]  # the step takes the rest; the fillers' probes go unread
        probes += [(grads[i], probe) for i, probe in zip(group.members, found)]
        calls.append((group, results))
    return PreparedBucket(packed, calls, probes)


@dataclasses.dataclass(frozen=True)
class PreparedBucket:
    """What :func:`prepare_bucket` computed for a fused bucket: the packed hyperparameters; for
    each group of tensors that compiles (:func:`_fused_groups`, in order), the group and its
    pre-pass results; and ``probes``, ``(gradient, probe)`` pairs, each probe a 0-d tensor that
    is finite exactly when that gradient is (see :func:`pipeline_prepass`)."""

    packed: tuple[Tensor, tuple[str, ...], dict[str, Any]]
    calls: list[tuple[FusedGroup, list[dict[str, Any]]]]
    probes: list[tuple[Tensor, Tensor]]


#: Devices on which a fused bucket's pre-pass runs as a compiled call of its own, before any step,
#: and serves as the non-finite check. That trades one read of every gradient (the check) for a
#: second compiled call per group (tens of microseconds of host time on the 2-core CPU): a gain where
#: memory bandwidth bounds the step (CPU). On CUDA the host time of the calls already exceeds the
#: kernels' for GPT-2-sized models (an H200, GPT-2 small: fused AdamW 12.1 ms of wall time for 1.2 ms
#: of kernels), so the pre-pass stays inside the step's graph there.
PREPASS_CHECK_DEVICES = frozenset({"cpu"})


def _with_scalars(pipe: Pipeline, hyper: dict[str, Any]) -> dict[str, Any]:
    return {**hyper, **pipe.scalars(hyper)} if pipe.scalars is not None else hyper


# ---- choosing the path ------------------------------------------------------------------
#: ``fused=None`` fuses a bucket on these device types once it holds at least this many
#: elements. On CPU a compile costs seconds (about 5-25 s per pipeline on 2 cores, much less
#: with a warm on-disk cache) and saves a few ns per element and step, so only large buckets
#: repay it within a run; small models and the unit tests stay on the multi-tensor path.
#: Devices not listed are never fused automatically. CUDA is not listed: on an H200 (GPT-2 small,
#: torch 2.11) the fused path's one compiled call per tensor (before :data:`FUSED_GROUP_SIZE`;
#: groups have not run on a GPU yet) made the step host-bound (AdamW
#: 11.8 ms of wall time for 1.2 ms of kernels), and the multi-tensor path was the faster one for
#: every rule but MARS-Shampoo: AdamW 2.60 against 4.23 times torch's fused AdamW, Lion 2.29 /
#: 4.56, MARS-AdamW 3.39 / 6.99, CAME 15.3 / 19.0; C-AdamW 3.96 / 186 before its count of kept
#: elements went by rows (``tensorlist._by_rows``), after which its fused step took 13.7 ms of
#: wall time (foreach, in an earlier process: 6.8 ms).
AUTO_FUSE_MIN_NUMEL: dict[str, int] = {"cpu": 4_000_000}

#: Devices on which ``fused=True`` measured slower than the multi-tensor path: the warning it gives there.
SLOWER_FUSED: dict[str, str] = {
    "cuda": "shine: fused=True on CUDA measured slower than the multi-tensor path that fused=None takes "
            "(H200, GPT-2 small: AdamW 4.2 against 2.6 times torch's fused AdamW; one compiled call per "
            "tensor cost more host time than its kernels take); see benchmarks/README.md"}


def choose_path(fused: bool | None, foreach: bool | None, device: torch.device, numel: int) -> str:
    """The execution path for a bucket of ``numel`` elements, from the user's ``fused``/``foreach`` flags.

    ``fused=True``: fused unless the compiler is known not to work on the device (then one
    warning, multi-tensor); ``fused=None``: the same, where the bucket is large enough for the
    device (:data:`AUTO_FUSE_MIN_NUMEL`), unless ``foreach=False`` asks for the reference loop;
    ``fused=False``: never. Otherwise ``foreach=False`` picks the per-tensor loop, else multi-tensor.

    Whether the compiler works is learnt from the first compile that fails
    (:func:`_call_compiled`), not probed up front: the probe's own compile took 1-2 s of the
    first step on the 2-core CPU (CAME, empty inductor cache: 17.8 s with it, 16.4 without).
    """
    if fused:
        if _compiles_on(device):
            if device.type in SLOWER_FUSED:
                warn_once(SLOWER_FUSED[device.type])
            return "fused"
        warn_once(_no_compiler(device.type))
    elif fused is None and foreach is not False:
        threshold = AUTO_FUSE_MIN_NUMEL.get(device.type)
        if threshold is not None and numel >= threshold and _compiles_on(device):
            return "fused"
    return "per_tensor" if foreach is False else "foreach"


def _run_foreach(pipe: Pipeline, params, grads, states, hyper) -> None:
    if pipe.elementwise and params:
        params, grads, states = _in_slices(pipe, params, grads, states, FOREACH_GROUP_NUMEL.get(params[0].device.type))
    # shards: one group, as every rank must make the same ShardSums calls (uneven shards group unevenly)
    groups = [(0, len(params))] if "shard_sums" in hyper else _foreach_groups(pipe, params)
    for start, stop in groups:
        state = {name: TensorList(s[name] for s in states[start:stop]) for name in state_names(pipe)}
        pipeline_step(pipe, TensorList(params[start:stop]), TensorList(grads[start:stop]), state, hyper)


def _in_slices(pipe: Pipeline, params, grads, states, limit: int | None):
    """The bucket with each tensor of more than ``limit`` elements (``None``: none) cut into
    consecutive 1-D slices of at most ``limit``, parameter, gradient and state alike; for
    :attr:`Pipeline.elementwise` pipelines, whose step of a slice is that slice of the step.

    The multi-tensor path then steps a large tensor group by group (:data:`FOREACH_GROUP_NUMEL`)
    like the small ones: each of the rule's passes over a slice finds it in cache, and a slice's
    temporaries are small blocks the allocator reuses, where a whole tensor's are fresh pages
    from the system every step. Measured on the 2-core CPU, GPT-2 small, multi-tensor path (one
    process, pair-ratio medians, the same bits): AdamW's step took 0.63 and Lion's 0.81 of the
    time they took whole; slices of 2^16 and 2^17 elements measured slower than 2^18, and 2^20
    the same. Tensors that are not contiguous, and DTensors, stay whole.
    """
    if limit is None or all(p.numel() <= limit for p in params):
        return params, grads, states
    names = state_names(pipe)
    out: tuple[list, list, list] = ([], [], [])
    for p, g, s in zip(params, grads, states):
        tensors = [p.detach(), g, *(s[n] for n in names)]
        if p.numel() <= limit or is_dtensor(p) or not all(t.is_contiguous() for t in tensors):
            pieces = [(p, g, s)]
        else:
            flat = [t.view(-1) for t in tensors]
            cuts = ([t[start:start + limit] for t in flat] for start in range(0, p.numel(), limit))
            pieces = [(cut[0], cut[1], dict(zip(names, cut[2:]))) for cut in cuts]
        for piece in pieces:
            for seq, item in zip(out, piece):
                seq.append(item)
    return out


#: On these devices the multi-tensor path steps a bucket of a shape-free rule in groups of
#: consecutive tensors of at most this many elements (a larger tensor forms a group of its own),
#: not all at once. Each of the rule's kernels then passes over a group while the group's state and
#: temporaries are still in cache, and the temporaries of a group (a few full-size tensors) are
#: freed before the next group makes its own, so the allocator reuses the same memory instead of
#: fetching fresh pages: the peak of the temporaries is that of the largest group, not of the
#: whole model. Every tensor's numbers are unchanged (the rules are per tensor). Measured on the
#: 2-core CPU, grouped/whole step time, one process: a 5.3M-parameter GPT-2 (fused=False) AdamW
#: 0.75, C-AdamW 0.71-0.79, Lion 0.61, MARS-AdamW 0.87; the arena's ``tiny`` model 0.73-1.02.
#: Newton-Schulz works tensor by tensor anyway: whole.
FOREACH_GROUP_NUMEL: dict[str, int] = {"cpu": 262_144}

#: Where factored CAME's element-wise passes are multi-tensor kernels (devices not in
#: ``tensorlist.PER_TENSOR_DEVICES``), its full-size temporaries (the stacks of the gradient and
#: the momentum that :func:`shine.rules.came._came_factored_stacked` makes, the squares, the
#: update) would otherwise exist for all of a bucket's matrices at once: there it steps groups of at
#: most this many elements (a larger matrix forms a group of its own), so its transient memory is
#: about four times its largest matrix or this many elements (1 GiB in fp32), whichever is more.
#: The matrices of one shape stack within a group, so fewer groups make fewer launches: counted
#: on GPT-2 small's parameters (``benchmarks/passes.py``'s counter), 166 launches a step at 2^27
#: elements (2 GiB of temporaries), 325 at 2^26, 448 at 2^25 and 695 at 2^24, the limit before,
#: where the groups are too small to stack (not timed on a GPU yet). (CAME had gone matrix by
#: matrix, kernel by kernel, everywhere: on an H200 that step was host-bound, 43 ms of wall time for
#: 9.6 ms of kernels on GPT-2 small, where pytorch-optimizer's multi-tensor CAME took half the time.)
FACTORED_GROUP_NUMEL = 1 << 26


def _foreach_groups(pipe: Pipeline, params: list[Tensor]) -> list[tuple[int, int]]:
    """The ``(start, stop)`` index ranges of :func:`_run_foreach`'s groups (:data:`FOREACH_GROUP_NUMEL`,
    :data:`FACTORED_GROUP_NUMEL`)."""
    device = params[0].device.type if params else None
    if pipe.precondition in _SHAPE_FREE:
        limit = FOREACH_GROUP_NUMEL.get(device)
    elif pipe.precondition is rules.came_factored and device not in tensorlist.PER_TENSOR_DEVICES:
        limit = FACTORED_GROUP_NUMEL
    else:
        limit = None
    if limit is None:
        return [(0, len(params))]
    groups, start, total = [], 0, 0
    for i, p in enumerate(params):
        if i > start and total + p.numel() > limit:
            groups.append((start, i))
            start, total = i, 0
        total += p.numel()
    return groups + [(start, len(params))]


def state_names(pipe: Pipeline) -> tuple[str, ...]:
    """The per-element state tensors a step of ``pipe`` reads and writes."""
    return pipe.state + (("prev_grad",) if pipe.correction else ())


# ---- the fused path -----------------------------------------------------------------------
#: Preconditioners that are element-wise (:attr:`Pipeline.shardwise`).
_ELEMENTWISE = (rules.adamw, rules.lion, rules.sign_momentum)
#: Preconditioners that are element-wise up to whole-tensor reductions (norms, means over the
#: whole tensor): on those, a tensor and its flat view give the same numbers, so the fused
#: path hands the compiler 1-D views and one graph serves every shape. The others
#: (factored CAME, Newton-Schulz) read the shape and get one graph per rank.
_SHAPE_FREE = _ELEMENTWISE + (rules.came_unfactored,)
#: Preconditioners whose sums along a split dim a ShardSums completes (:attr:`Pipeline.factored_shardwise`).
_FACTORED = (rules.came_factored, rules.came_unfactored)
_BROKEN: set[Pipeline] = set()

#: In a fused bucket, tensors of fewer elements than this take the multi-tensor path instead.
#: A compiled call costs tens of microseconds of host time whatever the tensor's size (guards,
#: wrappers), while the multi-tensor path shares each kernel launch among all the small tensors.
#: Measured per tensor on the 2-core CPU (AdamW / C-AdamW), before :func:`_call_cached`: 768
#: elements 85 / 118 us fused against 47 / 64 us multi-tensor; 4096: 100 / 163 against 77 / 124;
#: 16384: 106 / 162 against 240 / 377. With it, 768 elements still took 70 us fused against 45
#: multi-tensor (AdamW). Biases and norm weights are the usual small tensors (98 of GPT-2 small's 148).
FUSED_MIN_TENSOR_NUMEL = 8192


def _run_fused(pipe: Pipeline, params, grads, states, hyper, prepared: PreparedBucket | None = None) -> None:
    """The bucket's tensors in groups (:func:`_fused_groups`), one compiled call of
    :func:`fused_step` per group, traced with dynamic shapes, so one graph per (pipeline, device,
    dtypes, rank) serves every group; tensors under :data:`FUSED_MIN_TENSOR_NUMEL` elements take
    the multi-tensor path (the same math), and so never cost a graph of their own (sizes 0 and 1
    would each be specialised). The float hyperparameters (lr, betas, step, ...) enter as one
    float64 tensor, so a scheduler changing lr or the step count never recompiles. ``prepared``:
    :func:`prepare_bucket`'s result for the bucket."""
    if not _fusable(pipe, params[0].device):
        return _run_foreach(pipe, params, grads, states, hyper)
    small, (params, grads, states) = _large(params, grads, states)
    if small[0]:
        _run_foreach(pipe, *small, hyper)
    if not params:
        return
    if prepared is None:
        packed = _packed(hyper, params[0].device)
        calls = [(group, None) for group in _fused_groups(pipe, params, grads, states)]
    else:
        packed, calls = prepared.packed, prepared.calls
    for i, (group, results) in enumerate(calls):
        try:
            _call_compiled(fused_step, group.key, pipe, group.params, group.grads, group.states, *packed, results,
                           bit_casts=hyper.get("stochastic_rounding", False), group_size=len(group.params))
        except _CompileFailed:
            rest = sorted(j for later, _ in calls[i:] for j in later.members)
            return _run_foreach(pipe, *([seq[j] for j in rest] for seq in (params, grads, states)), hyper)


def _large(params: list, grads: list, states: list) -> tuple[tuple[list, list, list], tuple[list, list, list]]:
    """The bucket split into the tensors under :data:`FUSED_MIN_TENSOR_NUMEL` elements and the rest,
    each as (parameters, gradients, states)."""
    small: tuple[list, list, list] = ([], [], [])
    large: tuple[list, list, list] = ([], [], [])
    for item in zip(params, grads, states):
        for seq, value in zip(small if item[0].numel() < FUSED_MIN_TENSOR_NUMEL else large, item):
            seq.append(value)
    return small, large


#: The fused path steps the tensors of a shape-free rule (:data:`_SHAPE_FREE`: AdamW, Lion, MARS
#: on them, caution, unfactored CAME) this many per compiled call; the others one by one. A call
#: costs host time whatever its tensors' sizes (guards, wrappers), and after a large tensor's
#: kernel has streamed through the caches, that host code runs from memory: in a GPT-2 small step
#: on the 2-core CPU, 280 us per call (``Optimizer.step``'s own time over 50 calls, profiled),
#: against 50 us for a call between small tensors. A group's kernels also share one parallel
#: region. Measured there, GPT-2 small, fp32, one optimizer stepping alternately with groups of 8
#: and of 1 (21 pairs, pair-ratio medians): AdamW 0.96 (also with ``nonfinite="ignore"``), Lion
#: 0.96, C-AdamW 0.95, MARS-AdamW 0.95, CAME 1.00 (its matrices go one per call); in a prototype,
#: 16 gained no more (0.93 against 0.94) and compiled a graph of twice the size.
FUSED_GROUP_SIZE = 8


class FusedGroup(NamedTuple):
    """The arguments of one compiled call: parameters, gradients and states as the compiled step
    takes them (:func:`_fused_args`), padded to the group size with scratch tensors
    (:func:`_fillers`), so every group of a graph key has the same structure; ``members``: the
    bucket's positions of the real ones; ``key``: the graph's key, with the group size."""

    params: list[Tensor]
    grads: list[Tensor]
    states: list[dict[str, Tensor]]
    members: list[int]
    key: tuple


def _fused_groups(pipe: Pipeline, params: list, grads: list, states: list) -> list[FusedGroup]:
    """The bucket's compiled calls: tensors of one graph key in groups of up to
    :data:`FUSED_GROUP_SIZE`, in bucket order, a short group filled up with scratch tensors whose
    updates nothing reads. Tensors whose memory overlaps go to different groups (one's update could
    change what another reads, and dynamo guards on which inputs overlap); views of disjoint parts
    of one buffer (flat parameters, DDP's gradient buckets, FSDP2's reduce-scatter output) share
    groups. One tensor per call for rules that read the shape, and for tensors that keep a
    non-contiguous layout, which contiguous scratch tensors would not match (a graph guards its
    inputs' strides)."""
    open_groups: dict[tuple, list[tuple[list[int], list[FusedArgs], dict[int, list[Tensor]]]]] = {}
    groups = []
    for i, (p, g, s) in enumerate(zip(params, grads, states)):
        args = _fused_args(pipe, p, g, s)
        tensors = [(t.untyped_storage().data_ptr(), t) for t in (args.p, args.g, *args.state.values())]
        size = (FUSED_GROUP_SIZE if pipe.precondition in _SHAPE_FREE and all(t.is_contiguous() for _, t in tensors)
                else 1)
        candidates = open_groups.setdefault(args.key + (size,), [])
        group = next((group for group in candidates if not _overlaps(tensors, group[2])), None)
        if group is None:
            group = ([], [], {})
            candidates.append(group)
            groups.append((group, size))
        members, items, memory = group
        members.append(i)
        items.append(args)
        for storage, t in tensors:
            memory.setdefault(storage, []).append(t)
        if len(items) == size:
            candidates.remove(group)
    return [_grouped(members, items + _fillers(items[0], size - len(items)), size)
            for (members, items, _), size in groups]


def _overlaps(tensors: list[tuple[int, Tensor]], memory: dict[int, list[Tensor]]) -> bool:
    """Whether any of ``tensors`` (``(storage, tensor)`` pairs) spans memory that one of a group's
    tensors (``memory``: by storage) spans."""
    return any(_spans_overlap(t, other) for storage, t in tensors for other in memory.get(storage, ()))


def _spans_overlap(a: Tensor, b: Tensor) -> bool:
    """Whether the bytes from the first to the last element of ``a`` and of ``b`` (in one storage) overlap."""
    (a0, a1), (b0, b1) = _span(a), _span(b)
    return a0 < b1 and b0 < a1


def _span(t: Tensor) -> tuple[int, int]:
    last = sum((n - 1) * stride for n, stride in zip(t.shape, t.stride())) if t.numel() else -1
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def _grouped(members: list[int], items: list[FusedArgs], size: int) -> FusedGroup:
    return FusedGroup([a.p for a in items], [a.g for a in items], [a.state for a in items], members,
                      items[0].key + (size,))


def _fillers(like: FusedArgs, count: int) -> list[FusedArgs]:
    """``count`` sets of scratch tensors that pad a group of ``like``'s key: zeros of
    :data:`FILLER_NUMEL` elements in ``like``'s rank, dtypes and device (a shape-free rule's state
    has the parameter's shape), kept for later steps."""
    if count == 0:
        return []
    kept = _FILLERS.setdefault((like.key, like.p.device), [])
    shape = (2,) * (like.p.ndim - 1) + (FILLER_NUMEL >> (like.p.ndim - 1),)
    while len(kept) < count:
        def zeros(t: Tensor) -> Tensor:
            return torch.zeros(shape, dtype=t.dtype, device=t.device)
        kept.append(FusedArgs(zeros(like.p), zeros(like.g), {n: zeros(t) for n, t in like.state.items()}, like.key))
    return kept[:count]


_FILLERS: dict[tuple, list[FusedArgs]] = {}

#: The size of a group's scratch tensors. Where a filler's size is the one a graph is compiled
#: with, inductor plans that loop for it: with 2 elements, bf16 kernels were vectorised by float's
#: width (16 lanes), not bf16's (32), and loops compiled for a size are reused for every other.
#: As large as the smallest tensor the fused path takes (:data:`FUSED_MIN_TENSOR_NUMEL`), and cheap.
FILLER_NUMEL = 8192


def _fusable(pipe: Pipeline, device: torch.device) -> bool:
    """Whether ``pipe`` on ``device`` still compiles: no compile of it, nor the device's, failed."""
    return pipe not in _BROKEN and _compiles_on(device)


def _compiles_on(device: torch.device) -> bool:
    """Whether the compiler is not known to fail on ``device`` (:func:`compiler_available` records failures)."""
    return device.type not in _COMPILER_ERRORS


def _packed(hyper: dict[str, Any], device: torch.device) -> tuple[Tensor, tuple[str, ...], dict[str, Any]]:
    """The float hyperparameters as one float64 tensor, their names, and the other (flag) entries."""
    # float64, not float32: ``1 - beta`` of a float32 beta3 = 0.9999 is off by 2e-4 relative,
    # which CAME's confidence term amplifies; in float64 the constants round as Python's do.
    floats = tuple(k for k, v in hyper.items() if isinstance(v, float))
    # built on the host and copied without waiting for the device's queue (a plain copy to CUDA waits)
    packed = on_device(torch.tensor([hyper[k] for k in floats], dtype=torch.float64), device)
    return packed, floats, {k: v for k, v in hyper.items() if k not in floats}


class FusedArgs(NamedTuple):
    """A tensor's parameter, gradient and state as the compiled step takes them, and the key of
    its compiled graph: (pipeline, device type, rank, dtypes)."""

    p: Tensor
    g: Tensor
    state: dict[str, Tensor]
    key: tuple


def _fused_args(pipe: Pipeline, p: Tensor, g: Tensor, s: dict[str, Any]) -> FusedArgs:
    """The compiled step's arguments for one tensor: 1-D views for the shape-free preconditioners.
    Each goes in detached, its storage without its autograd attributes: the compiler copies a
    parameter's ``.grad`` into its stand-in, which fails where ``p.grad_dtype`` lets the gradient's
    dtype differ from the parameter's (fp32 gradients of bf16 weights); and it guards a view on
    the size of the tensor it views (``_base``), which would compile the graph again for each rank
    of that tensor (a bias, a matrix, a conv kernel), and for views (the gradients in DDP's buckets)
    against tensors that are none (a group's scratch tensors)."""
    tensors = [p, g, *(s[n] for n in state_names(pipe))]
    if pipe.precondition in _SHAPE_FREE and all(t.is_contiguous() for t in tensors):
        tensors = [t.view(-1) for t in tensors]
    p, g, *rest = (t.detach() for t in tensors)
    state = dict(zip(state_names(pipe), rest))
    return FusedArgs(p, g, state, (pipe, p.device.type, p.ndim, p.dtype, g.dtype,
                                   tuple(t.dtype for t in state.values())))


class _CompileFailed(Exception):
    """Compiling a pipeline's step failed (nothing was written): it now takes the multi-tensor path."""


def _call_compiled(fn: Callable, key: tuple, *args: Any, bit_casts: bool = False, group_size: int = 1) -> Any:
    """``_compiled(fn, key)(*args)``, compiled (where it compiles) under :func:`_cpu_codegen`
    (``bit_casts``: the step bit-casts floats, as stochastic rounding does). A failure of the first
    call of a key is a compile failure,
    and raises :class:`_CompileFailed` after one warning: where the compiler works at all on the
    key's device (``key[1]``; :func:`compiler_available`, probed only now), the key's pipeline
    (``key[0]``) takes the multi-tensor path from then on; where it does not, every pipeline on
    that device does."""
    compiled = _compiled(fn, key)
    out = _call_cached(compiled, args)
    if out is not _MISS:
        return out
    try:
        with _cpu_codegen(bit_casts), _sizes_apart(group_size):
            out = compiled(*args)
    except Exception as err:  # compiling failed (before any tensor of this call was touched)
        if (fn, key) in _COMPILED_OK:
            raise
        pipe, device_type = key[:2]
        if compiler_available(device_type):
            _BROKEN.add(pipe)
            warn_once(f"shine: torch.compile failed for {pipe.precondition.__name__} "
                       f"({type(err).__name__}: {err}); this pipeline uses the multi-tensor path")
        else:
            warn_once(_no_compiler(device_type))
        raise _CompileFailed from err
    _COMPILED_OK.add((fn, key))
    return out


_MISS = object()


def _sizes_apart(group_size: int):
    """While a fused step of ``group_size`` tensors compiles, a symbol for each size, even where two
    inputs' sizes are equal. By default (duck sizing) equal sizes share one symbol, and the graph
    is guarded on their equality: a group of two 768x768 matrices would then compile again for a
    768x768 and a 768x3072. The sizes within a tensor's own step still unify, through the shapes
    it combines. A single tensor's graph compiles as before."""
    from torch.fx.experimental import _config

    return _config.patch(use_duck_shape=False) if group_size > 1 else contextlib.nullcontext()


def _call_cached(compiled: Callable, args: tuple) -> Any:
    """Run ``compiled(*args)`` through the graph dynamo already compiled for such arguments, as
    dynamo itself would (the first cached graph whose guards pass), minus dynamo's frame
    handling, which cost 12-35 us per call on the 2-core CPU (a call of a small tensor's step:
    30 us through dynamo, 16 us here), paid once per group and step. :data:`_MISS` when no
    cached graph fits (dynamo then compiles one), under an enclosing ``torch.compile``, under a
    stance other than the default (``force_eager``, ...), or where this torch lacks the cache
    API (the plain call does the same work, slower).

    Each cache entry holds the guards of one graph and the code dynamo runs when they pass: the
    original function's code, rewritten to call the graph. That code is run here as a plain
    function over the same globals, so graph breaks would still run correctly (eagerly).
    """
    original = getattr(compiled, "_torchdynamo_orig_callable", None)
    if (original is None or _CACHE_ENTRIES is None or torch.compiler.is_compiling() or _stance_not_default()
            or original.__code__.co_argcount != len(args)):  # the frame's locals are then just the arguments
        return _MISS
    entries = _CACHE_ENTRIES(original.__code__)
    if not entries:
        return _MISS
    frame_locals = dict(zip(original.__code__.co_varnames, args))
    for entry in entries:
        guards = getattr(entry, "guard_manager", None)  # older torch releases keep them otherwise: no shortcut
        if guards is None:
            return _MISS
        if guards.check(frame_locals):
            run = _ENTRY_FUNCTIONS.get(entry.code)
            if run is None:
                run = _ENTRY_FUNCTIONS[entry.code] = types.FunctionType(entry.code, original.__globals__)
            return run(*args)
    return _MISS


def _stance_not_default() -> bool:
    stance = getattr(torch._dynamo.eval_frame, "_stance", None)
    return stance is None or stance.stance != "default" or stance.skip_guard_eval_unsafe


_CACHE_ENTRIES: Callable | None = getattr(torch._C._dynamo.eval_frame, "_debug_get_cache_entry_list", None)
_ENTRY_FUNCTIONS: dict = {}


def fused_step(pipe: Pipeline, params: list, grads: list, states: list[dict[str, Any]], packed: Tensor,
               floats: tuple[str, ...], flags: dict[str, Any], prepared: list[dict[str, Any]] | None) -> None:
    """What the fused path compiles for a group of tensors: ``pipeline_step`` for each, after its
    pre-pass (one graph, one call) unless :func:`prepare_bucket` ran those already (``prepared``,
    one dict per tensor). The float hyperparameters come packed in one tensor (named by
    ``floats``): one graph input, and one guard, instead of one per value."""
    hyper = _unpacked(packed, floats, flags)
    for i, (p, g, state) in enumerate(zip(params, grads, states)):
        ready = prepared[i] if prepared is not None else None
        if ready is None and pipe.prepass:
            ready = pipeline_prepass(pipe, g, state, hyper, _dtype_of(p) in LOW_PRECISION)
        pipeline_step(pipe, p, g, state, hyper, ready)


def fused_prepass(pipe: Pipeline, grads: list, states: list[dict[str, Any]], packed: Tensor,
                  floats: tuple[str, ...], flags: dict[str, Any], upcast: bool) -> list[dict[str, Any]]:
    """What the fused path compiles for a group's pre-passes: :func:`pipeline_prepass` for each tensor."""
    hyper = _unpacked(packed, floats, flags)
    return [pipeline_prepass(pipe, g, state, hyper, upcast) for g, state in zip(grads, states)]


def _unpacked(packed: Tensor, floats: tuple[str, ...], flags: dict[str, Any]) -> dict[str, Any]:
    return {**flags, **{name: packed[i] for i, name in enumerate(floats)}}


_COMPILED_OK: set[tuple] = set()

#: Inductor settings for the fused step.
#:
#: - Recompute element-wise values in every pass that reads them instead of storing them. A step
#:   is memory-bound, and a stored intermediate (the cautious direction, CAME's clipped update) is
#:   a fresh full-size buffer: allocated, written and read again each step, which made C-AdamW 4x
#:   and CAME 8x the time of fused AdamW. Inductor's default stores any value read by several
#:   loops once its expression reads more than 4 buffers, and the 0-d hyperparameter tensors alone
#:   exceed that. Small values that every element needs are computed once by the rules themselves
#:   (:func:`shine.rules.hoist.hoist`).
#: - Always emit an OpenMP parallel loop (``cpp.dynamic_threads``). One graph serves every tensor
#:   size, and inductor otherwise decides serial or parallel from the size of the tensor that
#:   happened to trigger the compile (and its on-disk cache keeps that choice for later runs):
#:   a first tensor of under 1024 elements, such as a bias, made every tensor's step serial.
#: - Trust the C++ compiler with the CPU's vector instructions (``cpp.vec_isa_ok``). Otherwise the
#:   first compile on a machine (an empty inductor cache) builds and loads a test program for
#:   each instruction set, one after another: 9-10 s of AdamW's 23 s first step here, against
#:   14.4 s without them. A compiler too old for them fails the step's compile instead, and the
#:   pipeline falls back to the multi-tensor path with one warning. The test results are cached
#:   per process by inductor, so this also holds for other compiles after shine's first.
INDUCTOR_OPTIONS = {"realize_reads_threshold": 1000, "realize_opcount_threshold": 1000,
                    "cpp.dynamic_threads": True, "cpp.vec_isa_ok": True}


@contextlib.contextmanager
def _cpu_codegen(bit_casts: bool = False):
    """While a fused step compiles, two changes to inductor's CPU code generator, so that kernels
    that move bf16 are vectorised by bf16's width (:func:`_bf16_tiling`) and bit casts between
    float32 and int32 are vector casts (:func:`_vector_bit_casts`). Each applies only where this
    torch has the function it replaces. A step that ``bit_casts`` (stochastic rounding) is tiled by
    bf16's width only where its casts are vector casts: element by element, at 32 lanes, it took
    1.76 times as long on GPT-2 small. :func:`_cache_marker` puts both into inductor's cache key,
    so kernels cached without them are not reused. Scoped to shine's own compiles (though
    process-wide while they run: another thread compiling then would see them too)."""
    from torch._inductor.codegen import cpp  # imported here: torch._inductor takes seconds

    with contextlib.ExitStack() as stack:
        vector_casts = stack.enter_context(_vector_bit_casts(cpp))
        if vector_casts or not bit_casts:
            stack.enter_context(_bf16_tiling(cpp))
        yield


@contextlib.contextmanager
def _bf16_tiling(cpp):
    """A kernel's loop body that only moves data (a load and a store, no arithmetic) no longer keeps
    inductor's CPU code generator (module ``cpp``) from vectorising the kernel by bf16's width.

    Inductor tiles a kernel by 32 elements (bf16 lanes) only where every loop body holds a bf16
    value, else by 16 (float lanes), and then loads and stores bf16 as masked half vectors. A step
    on fp32 parameters with bf16 state has one body without: the store of the new parameter into
    ``p``. On one 16M-element tensor, AdamW's fused step with bf16 state took 1.43-1.56 times
    torch's fp32 fused AdamW tiled by 16, and 0.62-0.68 tiled by 32, with the same bits. Only a
    body that would have blocked bf16 tiling answers bf16 now, so a kernel without bf16 values
    tiles as before (all its other bodies still answer none), unless it only moves fp32 data.
    """
    original = getattr(cpp, "get_loop_body_lowp_fp", None)
    if original is None:
        yield
        return

    def lowp_fp(body):
        dtype, use_fp32 = original(body)
        return (torch.bfloat16 if dtype is None and _only_moves(body) else dtype), use_fp32

    cpp.get_loop_body_lowp_fp = lowp_fp
    try:
        yield
    finally:
        cpp.get_loop_body_lowp_fp = original


@contextlib.contextmanager
def _vector_bit_casts(cpp):
    """Bit casts between float32 and int32 vectors (:func:`stochastic_round`'s) become vector casts
    (``at::vec::cast``) in inductor's CPU code generator (module ``cpp``); yields whether they do.

    Inductor has no vector form of a bit cast: it stores the vector, casts element by element and
    loads the result back, which also kept stochastic rounding from being tiled by bf16's width
    (:func:`_bf16_tiling`). Other bit casts are generated as before.
    """
    from torch._inductor.virtualized import V

    overrides = getattr(cpp, "CppVecOverrides", None)
    original = vars(overrides).get("to_dtype_bitcast") if overrides is not None else None
    if not isinstance(original, staticmethod) or not hasattr(cpp, "DTYPE_TO_CPP"):
        yield False
        return

    def bit_cast(x, dtype, src_dtype):
        vectors = getattr(V.kernel, "_get_num_vectors", None)
        if {dtype, src_dtype} != {torch.float32, torch.int32} or vectors is None:
            return original.__func__(x, dtype, src_dtype)
        target, n = cpp.DTYPE_TO_CPP[dtype], vectors(src_dtype)
        if n == 1:
            return f"at::vec::cast<{target}>({x})"
        parts = ", ".join(f"at::vec::cast<{target}>({x}[{i}])" for i in range(n))
        return f"at::vec::VectorizedN<{target},{n}>({parts})"

    overrides.to_dtype_bitcast = staticmethod(bit_cast)
    try:
        yield True
    finally:
        overrides.to_dtype_bitcast = original


def _only_moves(body) -> bool:
    """Whether an inductor loop body only loads and stores."""
    blocks = [body.root_block, *body.subblocks.values()]
    ops = [node.target for block in blocks for node in block.graph.nodes if node.op == "call_method"]
    return bool(ops) and all(op in ("load", "store") for op in ops)


@functools.cache
def _compiled(fn: Callable, key: tuple) -> Callable:
    """The compiled ``fn`` (:func:`fused_step`) for one (pipeline, rank, dtypes) key. Dynamo keeps
    one cache (and recompile limit) per code object, so each key gets its own copy of the code."""
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, f"_fused_{fn.__name__}")
    return torch.compile(copy, dynamic=True, options={**INDUCTOR_OPTIONS, **_cache_marker()})


@functools.cache
def _cache_marker() -> dict[str, Any]:
    """The inductor option that puts :func:`_cpu_codegen` into the cache key of every compiled
    step: a post-grad pass that changes nothing and whose ``uuid`` names it. Empty where this
    torch lacks the hook. (Imported here, not at module level: ``torch._inductor`` takes seconds.)"""
    try:
        from torch._inductor.custom_graph_pass import CustomGraphPass
    except ImportError:
        return {}

    class CodegenMarker(CustomGraphPass):
        def __call__(self, graph) -> None:
            pass

        def uuid(self) -> str:
            return "shine: bf16 tiling despite data-only loop bodies, 1; vector bit casts, 1"

    return {"post_grad_custom_post_pass": CodegenMarker()}


_COMPILER_ERRORS: dict[str, str] = {}


@functools.cache
def compiler_available(device_type: str) -> bool:
    """Whether ``torch.compile`` can build kernels for ``device_type`` here (tried once, cached;
    a failure is kept in ``_COMPILER_ERRORS``, which then keeps the device off the fused path)."""
    try:
        fn = torch.compile(lambda t: t * 2 + 1, dynamic=False, options=INDUCTOR_OPTIONS)
        return bool(torch.equal(fn(torch.ones(3, device=device_type)), torch.full((3,), 3.0, device=device_type)))
    except Exception as err:  # any failure to build or run means: no compiler here
        _COMPILER_ERRORS[device_type] = f"{type(err).__name__}: {err}"
        return False


def _no_compiler(device_type: str) -> str:
    return (f"shine: torch.compile does not work on {device_type} ({_COMPILER_ERRORS[device_type]}); "
            f"the fused path falls back to the multi-tensor path")


# ---- the gradient checks: finiteness and the global norm ----------------------------------
def grads_finite(grads: list[Tensor]) -> bool:
    """Whether every element of every gradient is finite, with one host synchronisation per device.

    A sum is non-finite whenever an element is; it is the cheapest reduction that reads the
    gradients once (on CPU, per-tensor sums beat ``torch._foreach_norm`` by about 25%; on other
    devices one multi-tensor norm kernel saves a launch per tensor). A non-finite sum or norm can
    also come from overflow of finite values, so that rare case is settled by the exact
    (inf-norm) check.
    """
    by_device: dict[torch.device, list[Tensor]] = {}
    for g in grads:
        by_device.setdefault(g.device, []).append(g)
    for device, gs in by_device.items():
        if not has_values(gs[0]):  # meta and fake tensors (memory estimates, traces) have no values to check
            continue
        totals = [g.sum() for g in gs] if device.type == "cpu" else torch._foreach_norm(gs, 2)
        if not bool(torch.stack(totals).isfinite().all()):
            if not bool(torch.stack(torch._foreach_norm(gs, math.inf)).isfinite().all()):
                return False
    return True


def grad_norm(grads: list[Tensor], dtype: torch.dtype = torch.float32) -> float:
    """The Euclidean norm of all of ``grads`` together (one host synchronisation per device), each
    tensor's sum of squares computed in ``dtype`` (float64 where float32 squares would overflow), or
    in the tensor's own dtype where that is wider (float64 gradients), and the sums combined in
    float64.

    On CPU a large tensor is reduced in rows (:func:`shine.tensorlist.sum_of_squares`: as fast
    as a plain sum there, and accurate, where the whole-tensor float32 norm that ``_foreach_norm``
    and ``clip_grad_norm_`` compute on CPU is off by 2.7e-3 relative on a random 50257x768 matrix).
    Small tensors (under :data:`~shine.tensorlist.ROWWISE_MIN_NUMEL` elements) share one
    multi-tensor norm: their per-call cost, not their bytes, is what counts (98 of GPT-2 small's
    148 tensors). Not BLAS ``dot``, as fast but dependent on the data's memory alignment (two
    values over 16 offsets of one vector): the clip then differed in its last bits between
    processes. Other devices get one multi-tensor norm kernel.
    """
    by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}  # device, dtype of the sums
    for g in grads:
        if g.numel():
            by_kind.setdefault((g.device, torch.promote_types(g.dtype, dtype)), []).append(g)
    totals: dict[torch.device, list[Tensor]] = {}
    for (device, wide), gs in by_kind.items():
        if device.type != "cpu":
            squares = [torch.stack(torch._foreach_norm(gs, 2, dtype=wide)).double().square().sum()]  # 3 launches
        else:
            squares = [sum_of_squares(g, wide) for g in gs if g.numel() >= ROWWISE_MIN_NUMEL]
            small = [g for g in gs if g.numel() < ROWWISE_MIN_NUMEL]
            if small:
                squares.append(torch.stack(torch._foreach_norm(small, 2, dtype=wide)).double().square().sum())
        totals.setdefault(device, []).extend(squares)
    return math.sqrt(sum(torch.stack(squares).sum().item() for squares in totals.values()))
