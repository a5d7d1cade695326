"""The exponential moving average every rule keeps: ``average + weight * (x - average)``."""
import torch


def ema_(average, x, weight):
    """Move ``average`` towards ``x`` by ``weight`` in place; returns ``average``.

    Eagerly this is ``lerp_`` (one pass). Under ``torch.compile`` it is written
    ``average * (1 - weight) + x * weight``: inductor lowers a ``lerp`` whose weight is a
    tensor (the fused path's packed hyperparameters) to both of its formulas and a select
    between them in every vector block. A compiled AdamW-like step on 16M elements took
    1.01-1.14 times as long with ``lerp`` (four runs, 2-core CPU); whole fused GPT-2 steps moved
    within that machine's noise (AdamW 0.94-1.01, Lion 0.89-1.01). The forms differ by rounding.
    """
    if torch.compiler.is_compiling():
        return average.mul_(1 - weight).add_(x * weight)
    return average.lerp_(x, weight)


def ema_square_(average, x, weight):
    """:func:`ema_` towards ``x * x``, without a temporary for the square.

    Eagerly ``average * (1 - weight) + weight * x * x`` in two in-place passes (``mul_``, then
    ``addcmul_``): an ``x * x`` temporary is a fresh allocation every step, and on the CPU the
    allocator hands large blocks back to the system and takes them again, page by page (the
    multi-tensor AdamW step of a 5M-parameter model took 1.5 times as long with its three
    temporaries as with one). Compiled, no temporary is stored either way.
    """
    if torch.compiler.is_compiling():
        return average.mul_(1 - weight).add_(x * x * weight)
    return average.mul_(1 - weight).addcmul_(x, x, value=weight)


def ema(average, x, weight):
    """:func:`ema_` without writing ``average``: the average it would move to."""
    if torch.compiler.is_compiling():
        return average * (1 - weight) + x * weight
    return average.lerp(x, weight)
