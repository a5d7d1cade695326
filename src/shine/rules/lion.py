"""Lion (Chen et al., arXiv 2302.06675): the sign of an interpolated momentum."""
from .ema import ema, ema_


def lion(x, exp_avg, *, beta1, beta2):
    """Return ``sign(beta1*m + (1-beta1)*x)``, then move ``m`` towards ``x`` with ``beta2``."""
    direction = next_momentum(x, exp_avg, beta1=beta1).sign_()
    ema_(exp_avg, x, 1 - beta2)
    return direction


def next_momentum(x, exp_avg, *, beta1):
    """``m + (1 - beta1) (x - m)``, without writing ``m``: Lion's interpolation.

    AdamW's direction is the next momentum divided by positive numbers, and Lion's
    and MARS-Lion's is its sign, so caution's kept fraction can be counted from it
    (and the gradient) in a read-only pass before the step.
    """
    return ema(exp_avg, x, 1 - beta1)
