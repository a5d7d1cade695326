"""The table of (optimizer, reference, hyperparameters) cases shared by the trajectory tests."""

import pytest

import reference as ref
import shine

from .support import drive, fresh_params, reference_trajectories, schedule


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
    _case("mars-came-default", shine.CAME, ref.came_step, dict(lr=0.01, gamma=0.025)),
    _case("mars-came-maximize", shine.CAME, ref.came_step, dict(lr=0.01, gamma=0.025, maximize=True)),
    _case("mars-came-cautious", shine.CAME, ref.came_step, dict(lr=0.01, gamma=0.1, cautious=True, weight_decay=0.1)),
    _case("mars-came-noclip", shine.CAME, ref.came_step, dict(lr=0.01, gamma=0.1), 1e-2),
]


def run_shine(optimizer, hp, params0, grads, on_first_step=None, **options):
    """Run ``optimizer(**hp, **options)`` (options: foreach, fused) over the decaying lr schedule;
    ``on_first_step(optimizer)``, when given, runs between the first step and the others.
    Returns (optimizer, trajectories)."""
    params = fresh_params(params0)
    opt = optimizer(params, **hp, **options)
    lrs = schedule(hp["lr"], len(grads))
    if on_first_step is None:
        return opt, drive(opt, params, grads, lrs=lrs)
    first = drive(opt, params, grads[:1], lrs[:1])
    on_first_step(opt)
    rest = drive(opt, params, grads[1:], lrs[1:])
    return opt, [a + b for a, b in zip(first, rest)]


def run_reference(step, hp, params0, grads, **extra):
    """The reference trajectories matching ``run_shine(.., hp, ..)``; ``extra`` goes to the step only."""
    ref_hp = {k: v for k, v in hp.items() if k != "maximize"}
    if ref.mars_step in (step, extra.get("inner_step")):
        ref_hp["lr_initial"] = hp["lr"]
    return reference_trajectories(step, params0, grads, maximize=hp.get("maximize", False),
                                  lrs=schedule(hp["lr"], len(grads)), **ref_hp, **extra)
