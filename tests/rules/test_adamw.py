"""AdamW's preconditioner: what its eager step allocates."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from shine import rules
from shine.tensorlist import TensorList


class FullSizeAllocations(TorchDispatchMode):
    """Counts the new (not in-place) tensors of ``numel`` elements that the ops under it return,
    and the ops (``passes``; every tensor here has ``numel`` elements)."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.count, self.passes = numel, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.passes += func._schema.name != "aten::lift_fresh"  # a number made a 0-d tensor: no pass
        if not func._schema.name.endswith("_"):  # in-place ops (add_, ...) return their input
            results = out if isinstance(out, (list, tuple)) else [out]
            self.count += sum(isinstance(t, torch.Tensor) and t.numel() == self.numel for t in results)
        return out


@pytest.mark.parametrize("listed", [False, True], ids=["tensor", "tensorlist"])
def test_eager_step_makes_one_full_size_temporary_and_seven_passes(listed):
    """AdamW's direction is a quotient that ``apply_update`` adds in one ``addcdiv_``: the eager
    step (rule, then apply) makes one full-size tensor per parameter (the CPU allocator hands
    large blocks fresh pages, so each one costs) and passes over memory seven times (on the
    multi-tensor path: seven kernels), and the parameter moves by ``lr * m_hat / (sqrt(v_hat) + eps)``."""
    gen = torch.Generator().manual_seed(0)
    x, m, v, p = (torch.randn(4096, generator=gen) for _ in range(4))
    v = v.abs()
    hyper = dict(beta1=0.9, beta2=0.999, eps=1e-8, bias_correction1=0.1, bias_correction2_sqrt=0.0316)
    m_new, v_new = m.lerp(x, 0.1), v.lerp(x * x, 0.001)
    expected = p * 0.99 - 0.01 * (m_new / 0.1) / (v_new.sqrt() / 0.0316 + 1e-8)
    wrap = (lambda t: TensorList([t])) if listed else (lambda t: t)
    with FullSizeAllocations(4096) as counter:
        u = rules.adamw(wrap(x), wrap(m), wrap(v), **hyper)
        rules.apply_update(wrap(p), u, lr=0.01, decay=0.99)
    assert counter.count == 1
    assert counter.passes == 7
    torch.testing.assert_close(p, expected, rtol=0, atol=1e-6)  # p moves by about 0.1
    torch.testing.assert_close(m, m_new, rtol=0, atol=0)
    torch.testing.assert_close(v, v_new, rtol=2e-7, atol=0)


def test_formed_direction_is_the_quotient():
    gen = torch.Generator().manual_seed(1)
    x, m, v = (torch.randn(300, generator=gen) for _ in range(3))
    v = v.abs()
    m_new, v_new = m.lerp(x, 0.1), v.lerp(x * x, 0.001)
    u = rules.adamw(x, m, v, beta1=0.9, beta2=0.999, eps=1e-3, bias_correction1=0.1, bias_correction2_sqrt=0.0316)
    torch.testing.assert_close(rules.formed(u), (m_new / 0.1) / (v_new.sqrt() / 0.0316 + 1e-3), rtol=1e-6, atol=0)
    assert rules.formed(x) is x
