"""AdamW's preconditioner: what its eager step allocates."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from shine import rules
from shine.tensorlist import TensorList


class FullSizeAllocations(TorchDispatchMode):
    """Counts the new (not in-place) tensors of ``numel`` elements that the ops under it return."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func._schema.name.endswith("_"):  # in-place ops (add_, ...) return their input
            results = out if isinstance(out, (list, tuple)) else [out]
            self.count += sum(isinstance(t, torch.Tensor) and t.numel() == self.numel for t in results)
        return out


@pytest.mark.parametrize("listed", [False, True], ids=["tensor", "tensorlist"])
def test_eager_step_makes_one_full_size_temporary(listed):
    """The direction is written into the denominator's buffer: one full-size tensor per step and
    parameter (the CPU allocator hands large blocks fresh pages, so each one costs), and the
    result is still ``m_hat / (sqrt(v_hat) + eps)``."""
    gen = torch.Generator().manual_seed(0)
    x, m, v = (torch.randn(4096, generator=gen) for _ in range(3))
    v = v.abs()
    hyper = dict(beta1=0.9, beta2=0.999, eps=1e-8, bias_correction1=0.1, bias_correction2_sqrt=0.0316)
    m_new, v_new = m.lerp(x, 0.1), v.lerp(x * x, 0.001)
    expected = (m_new / 0.1) / (v_new.sqrt() / 0.0316 + 1e-8)
    wrap = (lambda t: TensorList([t])) if listed else (lambda t: t)
    with FullSizeAllocations(4096) as counter:
        u = rules.adamw(wrap(x), wrap(m), wrap(v), **hyper)
    assert counter.count == 1
    u = u.tensors[0] if listed else u
    torch.testing.assert_close(u, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(m, m_new, rtol=0, atol=0)
    torch.testing.assert_close(v, v_new, rtol=2e-7, atol=0)
