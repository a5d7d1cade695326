"""MARS (Yuan et al., arXiv 2411.10438): variance-reduced gradient estimate.

The correction turns the gradient into ``c``; the preconditioners that follow it
are Adam's (:func:`shine.rules.adamw`), the sign of the momentum (MARS-Lion) and
the orthogonalised momentum (MARS-Shampoo).
"""
from .ema import ema, ema_
from .hoist import hoist
from .newton_schulz import newton_schulz5
from ..distributed import whole_tensor
from ..tensorlist import as_dtype_of, l2_norm


def mars_correction(g, prev_grad, *, gamma, beta1, clip=None, across=None):
    """Return ``c = g + gamma*beta1/(1-beta1)*(g - g_prev)``, clipped to Euclidean norm <= 1.

    The clip is written as ``c / max(||c||, 1)``: the same numbers as the
    paper's if-branch without a host synchronisation per tensor. The norm is a
    whole-tensor reduction, so a sharded DTensor gets the global norm; on local shards,
    ``across`` (a :class:`~shine.distributed.ShardSums`) sums the squared norm over them.
    ``clip`` is ``max(||c||, 1)`` when already computed (:func:`mars_clip`).
    """
    c = _uncorrected(g, prev_grad, gamma, beta1)
    return c.div_(_clip_of(c, across) if clip is None else clip)


def mars_clip(g, prev_grad, *, gamma, beta1):
    """``max(||c||, 1)``, the denominator :func:`mars_correction` divides ``c`` by."""
    return _clip_of(_uncorrected(g, prev_grad, gamma, beta1))


def _uncorrected(g, prev_grad, gamma, beta1):
    # g + k (g - prev) is the moving average from prev towards g with weight 1 + k (past g):
    # one pass on the eager paths (lerp) where (g - prev) * k + g took three; bf16 prev_grad
    # (bf16 state) is read in g's dtype, as the subtraction had promoted it
    return ema(as_dtype_of(prev_grad, g), g, 1 + gamma * beta1 / (1 - beta1))


def _clip_of(c, across=None):
    norm = l2_norm(c) if across is None else across(l2_norm(c).square()).sqrt()
    return hoist(norm.clamp_min(1.0))


def sign_momentum(x, exp_avg, *, beta1):
    """MARS-Lion: ``m = beta1*m + (1-beta1)*x``; return ``sign(m)``."""
    ema_(exp_avg, x, 1 - beta1)
    return exp_avg.sign()


def orthogonal_momentum(x, exp_avg, *, beta1, ns_steps, ns_dtype=None):
    """MARS-Shampoo: ``m = beta1*m + (1-beta1)*x``; return the orthogonalised ``m/(1-beta1)``.

    The Newton–Schulz result is scaled by ``sqrt(max(1, rows/cols))`` as in the
    reference, so tall matrices take steps of comparable RMS.
    """
    ema_(exp_avg, x, 1 - beta1)
    return _scaled_orthogonalisation(exp_avg / (1 - beta1), ns_steps=ns_steps, ns_dtype=ns_dtype)


@whole_tensor  # a sharded DTensor is gathered once, not iterated on shard by shard (see shine.distributed)
def _scaled_orthogonalisation(m, *, ns_steps, ns_dtype):
    rows, cols = m.shape[-2], m.shape[-1]
    return newton_schulz5(m, steps=ns_steps, dtype=ns_dtype) * max(1.0, rows / cols) ** 0.5
