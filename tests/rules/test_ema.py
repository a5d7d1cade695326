"""The moving average every rule keeps, eagerly and compiled."""

import pytest
import torch

import shine
from shine.rules.ema import ema, ema_, ema_square_
from shine.tensorlist import TensorList

from .support import generated_code


def test_eager_ema_is_lerp_in_place():
    gen = torch.Generator().manual_seed(0)
    average, x = torch.randn(1000, generator=gen), torch.randn(1000, generator=gen)
    expected = average.lerp(x, 0.1)
    assert torch.equal(ema(average, x, 0.1), expected)
    out = ema_(average, x, 0.1)
    assert out is average and torch.equal(average, expected)


def test_ema_square_moves_towards_the_square_in_place():
    """``ema_square_`` is ``ema_`` towards ``x * x`` to rounding, on a tensor and on a TensorList
    (where ``addcmul_`` is one multi-tensor kernel), and writes the average in place."""
    gen = torch.Generator().manual_seed(0)
    averages = [torch.rand(n, generator=gen) for n in (1000, 7)]
    xs = [torch.randn(n, generator=gen) for n in (1000, 7)]
    expected = [a.lerp(x * x, 0.001) for a, x in zip(averages, xs)]
    single = averages[0].clone()
    assert ema_square_(single, xs[0], 0.001) is single
    torch.testing.assert_close(single, expected[0], rtol=2e-7, atol=0)
    listed = TensorList(a.clone() for a in averages)
    ema_square_(listed, TensorList(xs), 0.001)
    for got, want in zip(listed, expected):
        torch.testing.assert_close(got, want, rtol=2e-7, atol=0)
    assert torch.equal(listed.tensors[0], single)


def test_compiled_ema_matches_lerp_with_a_tensor_weight():
    """Under the compiler the weight is a 0-d float64 tensor (the fused path's packed
    hyperparameters) and the average is written as a multiply-add: the same values to rounding,
    written in place, and no select between lerp's two formulas left in the kernel."""
    if not shine.engine.compiler_available("cpu"):
        pytest.skip("torch.compile unavailable")
    gen = torch.Generator().manual_seed(0)
    average, x = torch.randn(4099, generator=gen), torch.randn(4099, generator=gen)
    moved = torch.compile(ema, dynamic=True)
    in_place = torch.compile(ema_, dynamic=True)
    for beta in (0.9, 0.999, 0.3):
        weight = torch.tensor(1 - beta, dtype=torch.float64)
        expected = average.lerp(x, 1 - beta)
        torch.testing.assert_close(moved(average, x, weight), expected, rtol=2e-7, atol=1e-7)
        target = average.clone()
        in_place(target, x, weight)
        torch.testing.assert_close(target, expected, rtol=2e-7, atol=1e-7)
    torch._dynamo.reset()
    code = generated_code(torch.compile(ema_, dynamic=True), average.clone(), x, weight)
    assert "kernel" in code
    assert "blendv" not in code, "the compiled average selects between two formulas"
