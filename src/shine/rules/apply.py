"""The last box of every pipeline: decoupled weight decay, then the step."""


def apply_update(p, u, *, lr, decay):
    """``p = p * decay - lr * u`` with ``decay = 1 - lr * weight_decay`` (skipped when it is exactly 1)."""
    if not (isinstance(decay, float) and decay == 1.0):
        p.mul_(decay)
    p.sub_(u * lr)
