"""The last box of every pipeline: decoupled weight decay, then the step."""


def apply_update(p, u, *, lr, decay):
    """``p = p * decay - lr * u`` with ``decay = 1 - lr * weight_decay`` (skipped when it is exactly 1).

    A number ``lr`` (the eager paths) enters as ``add_``'s ``alpha``: one pass and no
    temporary ``lr * u``. A tensor ``lr`` (the compiled path, where the kernel is fused
    anyway) cannot be an ``alpha``.
    """
    if not (isinstance(decay, float) and decay == 1.0):
        p.mul_(decay)
    if isinstance(lr, (int, float)):
        p.add_(u, alpha=-lr)
    else:
        p.sub_(u * lr)
