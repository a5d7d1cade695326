"""The quintic Newton–Schulz iteration that maps a matrix close to its orthogonal factor."""
import contextlib

import torch

from ..tensorlist import l2_norm

_A, _B, _C = 3.4445, -4.7750, 2.0315


def newton_schulz5(m: torch.Tensor, *, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximate ``U V^T`` of ``m = U S V^T`` with ``steps`` quintic iterations.

    ``X = M / (||M||_F + eps)``, worked on in its wide orientation (transposed
    when rows > cols), iterated as ``X <- a X + b (X X^T) X + c (X X^T)^2 X``.
    ``dtype`` selects the arithmetic (the MARS reference uses bfloat16; the
    default keeps the input's dtype, i.e. float32, for exactness).
    """
    x = (m / (l2_norm(m) + eps)).to(dtype or m.dtype)
    transpose = m.shape[-2] > m.shape[-1]
    if transpose:
        x = x.mT
    # in ``dtype`` even where the caller steps inside torch.autocast (which would run the
    # products in bf16 or fp16); devices without autocast (meta) need no guard
    device = m.device.type
    with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else contextlib.nullcontext():
        for _ in range(steps):
            a = x @ x.mT
            b = a @ x
            x = _A * x + _B * b + _C * (a @ b)
    if transpose:
        x = x.mT
    return x.to(m.dtype)
