"""CAME (Luo et al., arXiv 2307.02047): Adafactor's factored second moment plus a factored confidence term.

The factoring is read off the state shapes: a row state of shape ``[..., n]`` and
a column state of shape ``[..., m]`` mean the gradient is viewed as
``[..., n, m]``. :func:`factored_shapes` chooses them when state is created.
"""
import math

import torch

from ..distributed import is_dtensor, placed_like
from .apply import Quotient
from .ema import ema_
from .hoist import hoist
from ..tensorlist import TensorList, as_dtype_of, l2_norm, multi_tensor_preferred, per_tensor, size_of


def factored_shapes(shape: torch.Size, mode: str) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Row and column state shapes for a parameter, or ``None`` for the unfactored path.

    ``mode="flatten"`` views an N-d tensor (N > 2) as ``(shape[0], prod(shape[1:]))``,
    so a conv kernel ``[out, in, kh, kw]`` is factored as ``(out, in*kh*kw)``.
    ``mode="last2"`` is the reference: factor over the last two dims (which makes
    the state of 1x1 and 3x3 convs larger than Adam's).
    """
    if len(shape) < 2:
        return None
    if len(shape) > 2 and mode == "flatten":
        shape = (shape[0], math.prod(shape[1:]))
    return tuple(shape[:-1]), tuple(shape[:-2]) + (shape[-1],)


def _rms(t, across=None):
    """``sqrt(mean(t^2))``; ``math.sqrt`` of the size is host arithmetic (a ``** 0.5`` of a
    symbolic size would be recomputed with ``pow`` inside every block of a compiled kernel).
    ``across``: ``t`` is a shard, and a :class:`~shine.distributed.ShardSums` completes the mean."""
    sizes = size_of(t)
    if across is not None:
        total, size = across(l2_norm(t).square(), sizes)
        return (total / size).sqrt()
    return l2_norm(t) / ([math.sqrt(n) for n in sizes] if isinstance(sizes, list) else math.sqrt(sizes))


def _row_mean(t, across=None):
    """``t.mean(-1)``, written as ``sum / n`` (bitwise the same on one device; on a DTensor split
    along the columns the sum is a ``Partial``, one all-reduce of the small result, where ``mean``
    over an unevenly split dim makes DTensor all-gather the whole tensor first); ``across``: see
    :func:`_over_shards`."""
    total, columns = _over_shards(across, -1, size_of(t, -1), t.sum(-1))
    return total / columns


def _over_shards(across, dim, count, *sums):
    """``sums`` (each along ``dim`` of the factored view, -2 or -1, over this shard's part of it:
    a tensor, or a TensorList with one per matrix) and the ``count`` of elements they are over,
    summed over the shards in one all-reduce by ``across`` (a
    :class:`~shine.distributed.ShardSums`) where its shards split ``dim``; as they are otherwise."""
    if across is None or not across.splits(dim):
        return (*sums, count)
    if not isinstance(sums[0], TensorList):
        joined, (count,) = across(TensorList(list(sums)), [count], along=dim)
        return (*joined, count)
    joined, count = across(TensorList([t for total in sums for t in total]), count, along=dim)
    n = len(sums[0])
    return (*(TensorList(joined.tensors[i * n:(i + 1) * n]) for i in range(len(sums))), count)


#: Rows per block of :func:`_column_sum` under the compiler, for a column pass that reads one
#: full-size tensor (16 measured best of 4-32) and for one that reads two (8: 20 GB/s against 14-17
#: at 16, which reads 32 rows side by side, on 4096x4096 and 50257x768).
_COLUMN_BLOCK = {1: 16, 2: 8}


def _column_sum(t, reads=1):
    """``t.sum(-2)``; ``reads``: how many full-size tensors the compiled expression of ``t``
    reads (it sets the block size).

    Under ``torch.compile`` the sum runs over blocks of rows, then over the blocks, in float64.
    Inductor walks a plain column sum down each column, one whole row's stride per element (0.45
    ns per element of a 50257x768 matrix on the 2-core CPU); the blocked form reads the rows of a
    block side by side (0.22 ns). Only the order of the additions differs from the plain sum. The
    sum over the blocks is in float64: inductor sums more than 4096 float32 values with a cascade
    and guards on the count, which gave matrices of over and under 4096 blocks a graph each. The
    last 2 to ``block + 1`` rows are summed plainly: a remainder of 0 or 1 rows is a size the
    compiler specialises, which gave matrices whose rows divide by the block and those with one
    row over (GPT-2's embedding) a graph each. Matrices of fewer than ``block + 2`` rows take the
    plain sum (a size guard, so a graph of their own): inductor fails to lower the blocked form
    when the compile's example has no whole block.
    """
    if not torch.compiler.is_compiling() or t.shape[-2] < _COLUMN_BLOCK[reads] + 2:
        return t.sum(-2)
    n, block = t.shape[-2], _COLUMN_BLOCK[reads]
    whole = (n - 2) // block * block
    blocks = t[..., :whole, :].unflatten(-2, (whole // block, block)).sum(-2).sum(-2, dtype=torch.float64)
    return blocks + t[..., whole:, :].sum(-2)


def _column_mean(t, across=None):
    """``t.mean(-2)``, as ``sum / n`` (:func:`_column_sum`); ``across``: see :func:`_over_shards`
    (eager only: the compiled path never steps shards)."""
    total, rows = _over_shards(across, -2, size_of(t, -2), _column_sum(t))
    return as_dtype_of(total / rows, t)


def _row_sum(row):
    """The sum of a row state along its last dim, in float64 (see :func:`_relative`); where
    launches cost host time and the row states are vectors, their L1 norms (they are positive)
    in one multi-tensor kernel."""
    if multi_tensor_preferred(row) and all(t.ndim == 1 for t in row):
        return row.norm(1, dtype=torch.float64)
    return row.sum(-1, keepdim=True, dtype=torch.float64)


def _relative(row, total, rows):
    """``row / mean(row)``, given the row state's sum (:func:`_row_sum`) and length: Adafactor's
    normalised row statistic (its rank-1 root is this row's root times the column's).

    The mean is summed in float64: inductor sums more than 4096 float32 values with a cascade
    and guards on the count, which gave matrices of over and under 4096 rows a graph each.
    """
    return row / as_dtype_of(total / rows, row)


@per_tensor
def _factored_view(x, exp_avg_sq_row, exp_avg_sq_col):
    """``x`` as the ``[..., n, m]`` matrices its row and column states factor."""
    return x.reshape(*exp_avg_sq_row.shape, exp_avg_sq_col.shape[-1])


@per_tensor
def _view_as(t, like):
    return t.view(like.shape)


def _mean_of_all(t, across=None, stacked=False):
    """The mean of a column vector's elements; ``across``: see :func:`_over_shards`. ``stacked``:
    ``t`` (or each tensor of a TensorList) is the column vectors of a stack of matrices along
    dim 0, and the mean is each one's, shaped to broadcast against ``t``."""
    if stacked:
        return _stacked_mean(t)
    total, size = _over_shards(across, -1, size_of(t), t.sum())
    return total / size


@per_tensor
def _stacked_mean(t):
    return (t.flatten(1).sum(-1) / t[0].numel()).view(-1, *[1] * (t.ndim - 1))


def came_row_statistics(x, exp_avg, exp_avg_sq_row, exp_avg_sq_col, *_, eps1, **__):
    """The row means of ``x^2``, plus ``eps1``, in the factored view, which :func:`came_factored` folds
    into its row state first: read-only, so the fused path computes them in its pre-pass (where
    they also serve as the non-finite check) and hands them to the step as ``stats``."""
    x = _factored_view(x, exp_avg_sq_row, exp_avg_sq_col)
    return _row_statistics(x * x, eps1)


def _row_statistics(squares, eps1, across=None):
    return _row_mean(squares, across) + eps1


def came_factored(x, *state, **hyper):
    """One CAME step for a matrix (or a stack of them); returns the update direction, the
    momentum over the confidence's rank-1 root (a :class:`~shine.rules.apply.Quotient`).
    Arguments: those of :func:`_came_factored`.

    On TensorLists (the multi-tensor path) where launches cost host time (GPUs), the matrices of
    one shape go as one stack (:func:`_came_factored_stacked`, :data:`STACKED`): the element-wise
    passes between tensors of one shape are multi-tensor kernels over the stacks; the reductions,
    reshapes and broadcasting passes (a stack against its row or column statistics: torch's
    multi-tensor kernels take those tensor by tensor) go stack by stack. On the CPU the whole
    step goes matrix by matrix, every pass over a matrix while its temporaries are in cache: measured on the 2-core CPU against whole groups
    of matrices in each kernel (pair-ratio medians, one process), the arena's tiny model took
    1.06-1.25 times as long in groups, GPT-2 small 0.99, and only tiny matrices (GPT-2 shapes of
    width 8) less (0.86-0.91). Shards (``across``) take the multi-tensor form everywhere: its sums
    over rows then take three all-reduces for all the matrices (:func:`_over_shards`), where
    matrix by matrix they took five per matrix (a 2-rank gloo step of 64 matrices spent most of
    its time waiting in them)."""
    if isinstance(x, TensorList) and hyper.get("across") is None:
        if not multi_tensor_preferred(x):
            return _came_factored_by_matrix(x, *state, **hyper)
        shapes = {(row.shape, col.shape[-1]) for row, col in zip(state[1], state[2])}
        if STACKED and len(x) >= STACK_AVERAGE * len(shapes) and not is_dtensor(x.tensors[0]):
            return _came_factored_stacked(x, *state, **hyper)
    return _came_factored(x, *state, **hyper)


#: Whether, where launches cost host time, the matrices of one factored shape step as one stack
#: (:func:`_came_factored_stacked`). Counted on GPT-2 small's parameters (``benchmarks/passes.py``'s
#: counter): 325 launches a step with the stacks (and ``engine.FACTORED_GROUP_NUMEL`` = 2^26), 695
#: before (2^24, no stacks), for 30.4 words of memory traffic per parameter against 27.0: the
#: copies into and out of the stacks. Not timed on a GPU yet.
STACKED = True
#: :func:`_came_factored_stacked` stacks where its TensorLists hold at least this many matrices per
#: shape on average; else the matrices go one by one in :func:`_came_factored`'s reductions. A stack
#: costs about ten launches of copies and two of sums more than a matrix alone, and saves about
#: five per matrix it takes in. Counted with ``benchmarks/passes.py``'s counter: a 2-layer GPT-2
#: (ten matrices of five shapes) took 134 launches a step one by one, 152 stacked; a 6-layer one
#: (26 of five) 278 and 152.
STACK_AVERAGE = 3


def _came_factored(x, exp_avg, exp_avg_sq_row, exp_avg_sq_col, exp_avg_res_row, exp_avg_res_col, *,
                   beta1, beta2, beta3, eps1, eps2, clip_threshold, stats=None, across=None, stacked=False):
    """:func:`came_factored` on tensors or TensorLists. ``stats``: :func:`came_row_statistics`
    of ``x``, when already computed. ``across``: the matrices are shards, and a
    :class:`~shine.distributed.ShardSums` completes the sums along the dim they split: split
    along their rows (their row states split alike, their column states whole), the column
    means and the mean of each row state; along their columns (row states whole, column states
    split alike), the row means and the RMS, a mean over the column vector; along both, each
    sum over the shards that split its dim. ``stacked``: each tensor is a stack of matrices along
    dim 0 (:func:`_came_factored_stacked`), each with its own RMS clip."""
    x = _factored_view(x, exp_avg_sq_row, exp_avg_sq_col)
    m = _view_as(exp_avg, x)
    # Full-size temporaries are written in place once made (same numbers): on the eager paths each
    # new one costs an allocation, and on the compiled path in-place ops on them change nothing.
    # The epsilons are added to the means, not to every element (the means of x^2 + eps1 and of
    # res + eps2 up to rounding), and the clip scales the column factor, not u: three passes
    # fewer over the matrix on the eager paths.
    xx = x * x
    ema_(exp_avg_sq_row, _row_statistics(xx, eps1, across) if stats is None else stats, 1 - beta2)
    # On shards each sum along the split dim is summed over them by ``across``; where the rows are
    # split, the independent ones together: the column sums with the row state's, and the
    # residual's likewise.
    col_total, row_total, rows = _over_shards(across, -2, size_of(xx, -2), _column_sum(xx), _row_sum(exp_avg_sq_row))
    squares_col = as_dtype_of(col_total / rows, xx) + eps1
    row = hoist(_relative(exp_avg_sq_row, row_total, rows).rsqrt())
    # u = x * row_i * col_j, so mean(u^2) = mean_j(col_j^2 * mean_i(x^2 * row_i^2)): the column
    # pass that updates the column state also yields the RMS, and no pass over u is needed.
    weighted = _column_mean(xx.mul_(_placed_like((row * row).unsqueeze(-1), xx)), across=across)
    ema_(exp_avg_sq_col, squares_col, 1 - beta2)
    col = hoist(exp_avg_sq_col.rsqrt())
    rms = _mean_of_all(col * col * weighted, across, stacked).sqrt()
    col = hoist(col / (rms / clip_threshold).clamp_min(1.0))
    # placed like m (identity unless DTensor) before the in-place product with x
    u = _placed_like(row.unsqueeze(-1) * col.unsqueeze(-2), m).mul_(x)
    ema_(m, u, 1 - beta1)
    res = u.sub_(m).pow_(2)
    ema_(exp_avg_res_row, _row_mean(res, across) + eps2, 1 - beta3)
    res_total, res_row_total, rows = _over_shards(across, -2, size_of(res, -2), _column_sum(res, reads=2),
                                                  _row_sum(exp_avg_res_row))
    ema_(exp_avg_res_col, as_dtype_of(res_total / rows, res) + eps2, 1 - beta3)
    root = (hoist(_relative(exp_avg_res_row, res_row_total, rows).sqrt()).unsqueeze(-1)
            * hoist(exp_avg_res_col.sqrt()).unsqueeze(-2))
    return Quotient(exp_avg, _view_as(_placed_like(root, m), exp_avg), 1.0)


def came_unfactored(x, exp_avg, exp_avg_sq, *, beta1, beta2, eps1, clip_threshold, across=None):
    """CAME for vectors and scalars: RMS-clipped Adafactor step, then momentum; no confidence term.

    Returns the momentum itself: :func:`shine.rules.apply_update` never writes to
    the direction (the reference once scaled ``m`` in place by lr, a bug). ``across``: the
    tensors are shards, and a :class:`~shine.distributed.ShardSums` completes the RMS.
    """
    ema_(exp_avg_sq, (x * x).add_(eps1), 1 - beta2)
    u = exp_avg_sq.rsqrt().mul_(x)
    u.div_(hoist((_rms(u, across) / clip_threshold).clamp_min(1.0)))
    ema_(exp_avg, u, 1 - beta1)
    return exp_avg


def _came_factored_stacked(x, *state, **hyper):
    """:func:`_came_factored` on TensorLists, where launches cost host time: the matrices of one
    factored shape (and dtype) go as one stack along a new dim 0, so each reduction or broadcast,
    which has no multi-tensor kernel, is a launch per stack instead of per matrix (GPT-2 has six
    shapes for 50 matrices), and the element-wise passes stay multi-tensor kernels over the
    stacks. A stack of several matrices is a copy: the gradient's and the state's in, the
    state's back out; a matrix alone of its shape goes as a stack of one, a view of itself (its
    state written in place). Plain tensors only: DTensors, which reach here where their local
    shards cannot be stepped alone, stay matrices."""
    x, *state = (seq.tensors for seq in (x, *state))
    views = [(*row.shape, col.shape[-1]) for row, col in zip(state[1], state[2])]
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(x):
        groups.setdefault((views[i], t.dtype, state[0][i].dtype), []).append(i)
    copied = [index for index in groups.values() if len(index) > 1]
    alone = [index for index in groups.values() if len(index) == 1]
    order = copied + alone

    def stacks(seq, shaped=False):
        def part(i):
            return seq[i].reshape(views[i]) if shaped else seq[i]
        return TensorList([torch.stack([part(i) for i in index]) for index in copied]
                          + [part(i).unsqueeze(0) for (i,) in alone])
    stacked_state = [stacks(state[0], shaped=True), *(stacks(seq) for seq in state[1:])]
    q = _came_factored(stacks(x, shaped=True), *stacked_state, **hyper, stacked=True)
    for seq, stack in zip(state, stacked_state):
        parts = [(seq[i], part) for index, whole in zip(copied, stack) for i, part in zip(index, whole)]
        parts += [(seq[i], whole[0]) for (i,), whole in zip(alone, stack.tensors[len(copied):])
                  if whole.data_ptr() != seq[i].data_ptr()]  # a reshape that had to copy (not contiguous)
        if parts:
            TensorList(t for t, _ in parts).copy_(TensorList(new.view(t.shape) for t, new in parts))
    root = [None] * len(x)
    for index, whole in zip(order, q.denominator):
        for i, part in zip(index, whole):
            root[i] = part.view(state[0][i].shape)
    return Quotient(TensorList(state[0]), TensorList(root), q.scale)


def _came_factored_by_matrix(x, *state, **hyper):
    """:func:`_came_factored` on TensorLists, matrix by matrix; its quotients joined into one."""
    quotients = [_came_factored(*tensors, **hyper) for tensors in zip(x, *state)]
    return Quotient(TensorList(q.numerator for q in quotients), TensorList(q.denominator for q in quotients), 1.0)


_placed_like = per_tensor(placed_like)
