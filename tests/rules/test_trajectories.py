"""Every optimizer, over many steps, against its naive float64 reference: all shapes in one param
group, fp32 / bf16 / mixed-dtype groups, per-tensor (foreach=False) and multi-tensor (foreach=True)
paths, a decaying lr schedule, and several hyperparameter settings each."""

import pytest
import torch

import reference as ref
import shine

from .support import (DTYPES, assert_fp32_state, assert_trajectories_close, drive, fresh_params,
                      problem, reference_trajectories, schedule)


def _case(name, optimizer, step, hp, grad_scale=1.0):
    return pytest.param(optimizer, step, hp, grad_scale, id=name)


_MARS = [
    ("default", {}),
    ("wd-gamma-betas", dict(weight_decay=0.1, gamma=0.1, betas=(0.9, 0.95))),
    ("optimize_1d", dict(optimize_1d=True, weight_decay=0.05)),
    ("1d-hparams-eps", dict(lr_1d=0.02, betas_1d=(0.8, 0.9), weight_decay_1d=0.0, eps=1e-3)),
    ("maximize", dict(maximize=True, weight_decay=0.1)),
    ("cautious", dict(cautious=True, weight_decay=0.1)),
]

CASES = [
    _case("adamw-default", shine.AdamW, ref.adamw_step, dict(lr=0.02)),
    _case("adamw-wd-betas", shine.AdamW, ref.adamw_step, dict(lr=0.02, weight_decay=0.1, betas=(0.8, 0.99))),
    _case("adamw-eps-nowd", shine.AdamW, ref.adamw_step, dict(lr=0.02, eps=1e-2, weight_decay=0.0)),
    _case("adamw-maximize", shine.AdamW, ref.adamw_step, dict(lr=0.02, maximize=True)),
    _case("adamw-cautious", shine.AdamW, ref.adamw_step, dict(lr=0.02, weight_decay=0.1, cautious=True)),
    _case("lion-default", shine.Lion, ref.lion_step, dict(lr=0.01)),
    _case("lion-wd-betas", shine.Lion, ref.lion_step, dict(lr=0.01, weight_decay=0.5, betas=(0.95, 0.98))),
    _case("lion-maximize", shine.Lion, ref.lion_step, dict(lr=0.01, maximize=True)),
    _case("lion-cautious", shine.Lion, ref.lion_step, dict(lr=0.01, weight_decay=0.3, cautious=True)),
    *[_case(f"mars-{t}-{name}", shine.MARS, ref.mars_step, dict(lr=0.01, mars_type=t, **hp))
      for t in ("adamw", "lion", "shampoo") for name, hp in _MARS],
    # Gradients small enough that the correction is never clipped (the clip is active elsewhere).
    *[_case(f"mars-{t}-noclip", shine.MARS, ref.mars_step, dict(lr=0.01, mars_type=t, gamma=0.1), 1e-2)
      for t in ("adamw", "lion", "shampoo")],
    _case("mars-shampoo-ns3", shine.MARS, ref.mars_step, dict(lr=0.01, mars_type="shampoo", ns_steps=3)),
    _case("came-default", shine.CAME, ref.came_step, dict(lr=0.01)),
    _case("came-wd", shine.CAME, ref.came_step, dict(lr=0.01, weight_decay=0.1)),
    _case("came-last2", shine.CAME, ref.came_step, dict(lr=0.01, factor_conv="last2")),
    _case("came-betas-clip", shine.CAME, ref.came_step, dict(lr=0.01, betas=(0.8, 0.99, 0.999), clip_threshold=0.5)),
    _case("came-eps", shine.CAME, ref.came_step, dict(lr=0.01, eps=(1e-3, 1e-2))),
    _case("came-maximize", shine.CAME, ref.came_step, dict(lr=0.01, maximize=True, weight_decay=0.1)),
    _case("came-cautious", shine.CAME, ref.came_step, dict(lr=0.01, cautious=True, weight_decay=0.1)),
]


def _run_shine(optimizer, hp, params0, grads, foreach):
    params = fresh_params(params0)
    opt = optimizer(params, foreach=foreach, **hp)
    return opt, drive(opt, params, grads, lrs=schedule(hp["lr"], len(grads)))


def _run_reference(step, hp, params0, grads):
    ref_hp = {k: v for k, v in hp.items() if k != "maximize"}
    if step is ref.mars_step:
        ref_hp["lr_initial"] = hp["lr"]
    return reference_trajectories(step, params0, grads, maximize=hp.get("maximize", False),
                                  lrs=schedule(hp["lr"], len(grads)), **ref_hp)


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("dtypes", DTYPES)
@pytest.mark.parametrize("optimizer, step, hp, grad_scale", CASES)
def test_matches_reference(optimizer, step, hp, grad_scale, dtypes, foreach):
    """shine's trajectory equals the reference's; low-precision params keep fp32 state."""
    dtypes = DTYPES[dtypes]
    params0, grads = problem(dtypes, grad_scale=grad_scale)
    opt, actual = _run_shine(optimizer, hp, params0, grads, foreach)
    expected = _run_reference(step, hp, params0, grads)
    assert_trajectories_close(actual, expected, dtypes, what="vs reference")
    assert_fp32_state(opt)


@pytest.mark.parametrize("dtypes", DTYPES)
@pytest.mark.parametrize("optimizer, step, hp, grad_scale", CASES)
def test_foreach_matches_single(optimizer, step, hp, grad_scale, dtypes):
    """The multi-tensor path agrees with the per-tensor path, 10x tighter than with the reference."""
    dtypes = DTYPES[dtypes]
    params0, grads = problem(dtypes, grad_scale=grad_scale, seed=1)
    _, single = _run_shine(optimizer, hp, params0, grads, False)
    _, multi = _run_shine(optimizer, hp, params0, grads, True)
    assert_trajectories_close(multi, single, dtypes, fp32=(1e-6, 1e-7), what="foreach vs single")
