"""Shared helpers: random problems, driving an optimizer with given gradients, and comparisons."""

import torch

import reference as ref

# 0-d, 1-D, 2-D wide and tall, 4-D conv kernel.
SHAPES = [(), (5,), (3, 7), (7, 3), (4, 3, 3, 3)]
STEPS = 12
# Parameter dtypes of a problem: all fp32, all bf16, or alternating in the same param group.
DTYPES = {
    "fp32": [torch.float32] * len(SHAPES),
    "bf16": [torch.bfloat16] * len(SHAPES),
    "mixed": [torch.float32, torch.bfloat16] * (len(SHAPES) // 2) + [torch.float32] * (len(SHAPES) % 2),
}


def problem(dtypes, *, shapes=SHAPES, steps=STEPS, seed=0, grad_scale=1.0):
    """Random initial parameters and ``steps`` gradients per parameter, each in its param's dtype."""
    gen = torch.Generator().manual_seed(seed)
    params0 = [torch.randn(s, generator=gen).to(d) for s, d in zip(shapes, dtypes)]
    grads = [[(grad_scale * torch.randn(s, generator=gen)).to(d) for s, d in zip(shapes, dtypes)]
             for _ in range(steps)]
    return params0, grads


def schedule(lr, steps=STEPS):
    """A decaying per-step lr, lr at step 1: checks that the rules read the group lr every step."""
    return [lr * (1 - 0.5 * t / steps) for t in range(steps)]


def fresh_params(params0):
    return [p.clone().requires_grad_(True) for p in params0]


def drive(opt, params, grads, lrs=None):
    """Set p.grad to the given gradient (a fresh tensor) and step, for every step; optional per-step
    group lr. Returns one float64 trajectory [p_1, ..., p_N] per parameter."""
    trajectories = [[] for _ in params]
    for t, step_grads in enumerate(grads):
        if lrs is not None:
            for group in opt.param_groups:
                group["lr"] = lrs[t]
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
        for trajectory, p in zip(trajectories, params):
            trajectory.append(p.detach().double().clone())
    return trajectories


def reference_trajectories(step, params0, grads, **kw):
    """ref.run for every parameter, rounding to the parameter's dtype after each step when it is not fp32."""
    return [ref.run(step, p0, [g[i] for g in grads],
                    round_to=None if p0.dtype == torch.float32 else p0.dtype, **kw)
            for i, p0 in enumerate(params0)]


def tolerances(dtype, fp32=(1e-5, 1e-6)):
    """fp32: (rtol, atol), by default fp32 vs float64. bf16 (reference rounds identically, fp32 state):
    one bf16 ulp (relative spacing <= 2**-7), for a rare rounding flip where the two computations
    land on opposite sides of a rounding midpoint."""
    rtol, atol = fp32 if dtype == torch.float32 else (2**-7, 1e-6)
    return dict(rtol=rtol, atol=atol)


def assert_trajectories_close(actual, expected, dtypes, fp32=(1e-5, 1e-6), what=""):
    """Compare per-parameter trajectories with ``tolerances``."""
    for i, (a, e, d) in enumerate(zip(actual, expected, dtypes)):
        torch.testing.assert_close(torch.stack(a), torch.stack(e), **tolerances(d, fp32),
                                   msg=lambda m, i=i, a=a: f"{what} param {i} shape {tuple(a[0].shape)}: {m}")


def assert_fp32_state(opt):
    """Every floating-point state tensor is fp32, whatever the parameter dtype."""
    for p, state in opt.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.is_floating_point():
                assert value.dtype == torch.float32, (key, value.dtype, p.dtype)


def generated_code(fn, *args) -> str:
    """The code that calling the compiled ``fn`` generates, with inductor's cache off (a hit
    generates none)."""
    from torch._inductor.utils import run_and_get_code

    with torch._inductor.config.patch(fx_graph_cache=False):
        _, code = run_and_get_code(fn, *args)
    return "\n".join(code)


def bf16_spacing(x):
    """The distance from each element of ``x`` (bf16 values) to the next bf16 value away from 0."""
    return torch.ldexp(torch.ones_like(x), torch.frexp(x.abs().clamp_min(torch.finfo(torch.bfloat16).tiny))[1] - 8)
