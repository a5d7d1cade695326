"""Caution (Liang et al., arXiv 2411.16085): keep only the coordinates that agree with the gradient."""
from ..tensorlist import multi_tensor_preferred, size_of, total
from .apply import Quotient
from .hoist import hoist


def caution(u, g, kept=None, across=None):
    """Zero ``u`` where ``u * g <= 0``; rescale by ``1 / max(mean(mask), 1e-3)``.

    The mean is over the whole tensor (a global reduction for DTensors), as in
    the official C-AdamW code and timm. The official C-Lion code, like other
    libraries, divides by ``numel/(kept+1)``, which differs on small tensors. ``kept`` is that floored mean when it was
    already computed (:func:`kept_fraction` of a tensor with the sign of ``u``). ``across``: on
    shards, a :class:`~shine.distributed.ShardSums` that completes the count and the size.
    Returns a new tensor, or for a :class:`~shine.rules.apply.Quotient` a quotient still
    unformed (the masked numerator over the denominator times the kept fraction: two passes
    fewer than forming it first); the caller's momentum state is never masked.
    """
    mask = _agrees(_sign_of(u), g)
    kept = _floored_mean(mask, across) if kept is None else kept
    if isinstance(u, Quotient):
        return Quotient(mask.mul_(u.numerator), u.denominator.mul_(kept), u.scale)
    return mask.mul_(u).div_(kept)


def kept_fraction(direction, g):
    """``max(mean(direction * g > 0), 1e-3)``: what :func:`caution` divides by, for any
    ``direction`` with the sign of the update (see :func:`shine.rules.next_momentum`)."""
    return _floored_mean(_agrees(_sign_of(direction), g))


def _sign_of(u):
    """A tensor with the sign of the direction ``u``: a :class:`~shine.rules.apply.Quotient`'s
    numerator (its denominator and scale are positive), left unformed."""
    return u.numerator if isinstance(u, Quotient) else u


def _agrees(u, g):
    """``(u * g > 0)`` as 1.0/0.0 in ``u``'s dtype, written into the one temporary ``u * g``.
    Where launches cost host time, TensorLists take two multi-tensor passes (sign, then clamp
    at 0) rather than a comparison kernel per tensor."""
    product = u * g
    if multi_tensor_preferred(product):
        return product.sign_().clamp_min_(0)
    return product.gt_(0)


def _floored_mean(mask, across=None):
    # sum/numel rather than mean(): the same numbers, but on an unevenly sharded DTensor
    # a sum is one all-reduce of a scalar where mean() all-gathers the whole mask.
    # A mask's L1 norm is its sum: where launches cost host time, one multi-tensor kernel.
    kept, size = mask.norm(1) if multi_tensor_preferred(mask) else total(mask), size_of(mask)
    if across is not None:  # a shard's count and size, summed over the shards
        kept, size = across(kept, size)
    return hoist((kept / size).clamp_min(1e-3))
