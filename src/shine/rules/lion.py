"""Lion (Chen et al., arXiv 2302.06675): the sign of an interpolated momentum."""


def lion(x, exp_avg, *, beta1, beta2):
    """Return ``sign(beta1*m + (1-beta1)*x)``, then move ``m`` towards ``x`` with ``beta2``."""
    direction = exp_avg.lerp(x, 1 - beta1).sign()
    exp_avg.lerp_(x, 1 - beta2)
    return direction
