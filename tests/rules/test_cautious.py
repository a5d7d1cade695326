"""The Cautious(inner) wrapper against its documented formula: d = p_before - p_after(inner step),
p = p_before - d*mask/max(mean(mask), 1e-3), mask = d*g > 0 (weight decay inside d, so masked too),
g negated for maximize groups, inner state never masked."""

import pytest
import torch

import reference as ref
import shine

from .cases import run_reference, run_shine
from .support import DTYPES, assert_trajectories_close, drive, fresh_params, problem

FP32 = DTYPES["fp32"]

INNERS = [
    pytest.param(lambda ps, **hp: torch.optim.AdamW(ps, foreach=False, **hp), ref.adamw_step,
                 dict(lr=0.02, weight_decay=0.5), id="torch-adamw"),
    pytest.param(lambda ps, **hp: torch.optim.AdamW(ps, foreach=True, **hp), ref.adamw_step,
                 dict(lr=0.02, weight_decay=0.5, maximize=True), id="torch-adamw-maximize"),
    pytest.param(shine.Lion, ref.lion_step, dict(lr=0.01, weight_decay=3.0), id="shine-lion"),
    pytest.param(shine.CAME, ref.came_step, dict(lr=0.01, weight_decay=0.5), id="shine-came"),
    pytest.param(shine.MARS, ref.mars_step, dict(lr=0.01, weight_decay=0.5, weight_decay_1d=0.5), id="shine-mars"),
]


@pytest.mark.parametrize("make_inner, inner_step, hp", INNERS)
def test_wrapper_matches_reference(make_inner, inner_step, hp):
    """Cautious(inner) follows ref.cautious_wrapper_step over a decaying lr schedule; the weight
    decays are large enough that the decay alone flips some coordinates' mask."""
    params0, grads = problem(FP32)
    _, actual = run_shine(lambda ps, **kw: shine.Cautious(make_inner(ps, **kw)), hp, params0, grads)
    expected = run_reference(ref.cautious_wrapper_step, hp, params0, grads, inner_step=inner_step)
    assert_trajectories_close(actual, expected, FP32, what="Cautious wrapper")


@pytest.mark.parametrize("optimizer, hp", [
    (shine.AdamW, dict(lr=0.02, weight_decay=0.0)),
    (shine.Lion, dict(lr=0.01)),
    (shine.CAME, dict(lr=0.01)),
    (shine.MARS, dict(lr=0.01, weight_decay_1d=0.0, mars_type="shampoo")),
], ids=["adamw", "lion", "came", "mars-shampoo"])
def test_wrapper_without_decay_equals_builtin(optimizer, hp):
    """Without weight decay the wrapper is exact: Cautious(opt) == opt(cautious=True)."""
    params0, grads = problem(FP32)
    wrapped_params, builtin_params = fresh_params(params0), fresh_params(params0)
    wrapped = drive(shine.Cautious(optimizer(wrapped_params, **hp)), wrapped_params, grads)
    builtin = drive(optimizer(builtin_params, cautious=True, **hp), builtin_params, grads)
    assert_trajectories_close(wrapped, builtin, FP32, what="wrapper vs cautious=True")
