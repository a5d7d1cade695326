"""Every optimizer, over many steps, against its naive float64 reference: all shapes in one param
group, fp32 / bf16 / mixed-dtype groups, per-tensor (foreach=False) and multi-tensor (foreach=True)
paths, a decaying lr schedule, and several hyperparameter settings each."""

import pytest

import shine

from .cases import CASES, run_reference, run_shine
from .support import DTYPES, assert_fp32_state, assert_trajectories_close, problem


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("dtypes", DTYPES)
@pytest.mark.parametrize("optimizer, step, hp, grad_scale", CASES)
def test_matches_reference(optimizer, step, hp, grad_scale, dtypes, foreach):
    """shine's trajectory equals the reference's; low-precision params keep fp32 state."""
    dtypes = DTYPES[dtypes]
    params0, grads = problem(dtypes, grad_scale=grad_scale)
    opt, actual = run_shine(optimizer, hp, params0, grads, foreach=foreach)
    expected = run_reference(step, hp, params0, grads)
    assert_trajectories_close(actual, expected, dtypes, what="vs reference")
    assert_fp32_state(opt)


@pytest.mark.parametrize("dtypes", DTYPES)
@pytest.mark.parametrize("optimizer, step, hp, grad_scale", CASES)
def test_foreach_matches_single(optimizer, step, hp, grad_scale, dtypes):
    """The multi-tensor path agrees with the per-tensor path, 10x tighter than with the reference."""
    dtypes = DTYPES[dtypes]
    params0, grads = problem(dtypes, grad_scale=grad_scale, seed=1)
    _, single = run_shine(optimizer, hp, params0, grads, foreach=False)
    _, multi = run_shine(optimizer, hp, params0, grads, foreach=True)
    assert_trajectories_close(multi, single, dtypes, fp32=(1e-6, 1e-7), what="foreach vs single")


@pytest.mark.parametrize("limit", [50, 1 << 24], ids=["groups", "whole"])
@pytest.mark.parametrize("dtypes", ["fp32", "mixed"])
@pytest.mark.parametrize("optimizer, step, hp, grad_scale", CASES)
def test_gpu_form_of_the_multi_tensor_path(optimizer, step, hp, grad_scale, dtypes, limit, monkeypatch):
    """The multi-tensor path as GPUs run it, forced on the CPU (``tensorlist.PER_TENSOR_DEVICES``
    empty): caution's mask and kept fraction as multi-tensor kernels, factored CAME's passes over
    groups of matrices of at most ``limit`` elements (the 21-, 21- and 108-element matrices go
    two and one, or all three together). It follows the reference, and the per-tensor path 10x
    tighter. ``mixed``: fp32 and bf16 parameters in one group (a bucket per dtype)."""
    monkeypatch.setattr(shine.tensorlist, "PER_TENSOR_DEVICES", frozenset())
    monkeypatch.setattr(shine.engine, "FACTORED_GROUP_NUMEL", limit)
    dtypes = DTYPES[dtypes]
    params0, grads = problem(dtypes, grad_scale=grad_scale)
    _, multi = run_shine(optimizer, hp, params0, grads, foreach=True)
    _, single = run_shine(optimizer, hp, params0, grads, foreach=False)
    assert_trajectories_close(multi, run_reference(step, hp, params0, grads), dtypes, what="vs reference")
    assert_trajectories_close(multi, single, dtypes, fp32=(1e-6, 1e-7), what="vs per-tensor")
