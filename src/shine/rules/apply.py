"""The last box of every pipeline: decoupled weight decay, then the step."""
from typing import Any, NamedTuple


class Quotient(NamedTuple):
    """The direction ``numerator / denominator * scale``, not yet divided out.

    A rule whose direction is a quotient (Adam's ``m / (sqrt(v) + eps)``) returns it in this
    form, so that :func:`apply_update` adds it to the parameter in one ``addcdiv_`` pass where
    forming it first takes two more passes over memory (invert the denominator, multiply by
    the numerator) on the eager paths: fewer passes and kernel launches on the multi-tensor
    path, which is what ``fused=None`` takes on GPUs. ``denominator`` is positive and a
    temporary of the step (:func:`formed` writes the direction into it, so a quotient is formed
    or applied once); ``numerator`` may be state and is never written; ``scale`` is positive.
    """

    numerator: Any
    denominator: Any
    scale: Any


def formed(u):
    """The direction ``u`` as a tensor (or TensorList): a :class:`Quotient` divided out, into
    its denominator's buffer; anything else as it is."""
    if not isinstance(u, Quotient):
        return u
    return u.denominator.reciprocal_().mul_(u.numerator).mul_(u.scale)


def decay_factor(lr: float, weight_decay: float) -> float:
    """The multiplicative form of decoupled weight decay, ``1 - lr * wd``: :func:`apply_update`'s
    ``decay``, computed once per step on the host."""
    return 1.0 - lr * weight_decay


def apply_update(p, u, *, lr, decay):
    """``p = p * decay - lr * u`` with ``decay`` from :func:`decay_factor` (skipped when it is exactly 1).

    A number ``lr`` (the eager paths) enters as ``add_``'s ``alpha``, or for a
    :class:`Quotient` with a number ``scale`` as ``addcdiv_``'s ``value``: one pass, and no
    temporary ``lr * u``. A tensor ``lr`` (the compiled path, where the kernel is fused
    anyway) cannot be either.
    """
    if not (isinstance(decay, float) and decay == 1.0):
        p.mul_(decay)
    if not isinstance(lr, (int, float)):
        p.sub_(formed(u) * lr)
    elif isinstance(u, Quotient) and isinstance(u.scale, (int, float)):
        p.addcdiv_(u.numerator, u.denominator, value=-lr * u.scale)
    else:
        p.add_(formed(u), alpha=-lr)
