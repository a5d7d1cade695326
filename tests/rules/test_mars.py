"""MARS specifics: exact mode through stash_grad() and through step(closure, next_closure=...),
its misuse error, and that approx mode keeps a COPY of the previous gradient; for the three MARS
instances and for MARS-CAME (CAME with a ``gamma``)."""

import pytest
import torch

import reference as ref
import shine

from .support import (DTYPES, SHAPES, assert_trajectories_close, drive, fresh_params, problem,
                      reference_trajectories)

FP32 = DTYPES["fp32"]

#: name -> (shine optimizer with lr and the name's hyperparameters, reference step, its hyperparameters)
CORRECTED = {
    **{f"mars-{t}": (lambda ps, t=t, **hp: shine.MARS(ps, lr=0.01, mars_type=t, **hp), ref.mars_step,
                     dict(lr=0.01, mars_type=t)) for t in ("adamw", "lion", "shampoo")},
    "mars-came": (lambda ps, **hp: shine.CAME(ps, **{"lr": 0.01, "gamma": 0.025, **hp}), ref.came_step,
                  dict(lr=0.01, gamma=0.025)),
}


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("hp", [dict(weight_decay=0.1), dict(maximize=True), dict(cautious=True)],
                         ids=["wd", "maximize", "cautious"])
@pytest.mark.parametrize("name", CORRECTED)
def test_exact_mode_with_stash(name, hp, foreach):
    """Exact mode: at iteration t the stashed gradient S[t] becomes g_prev of step t+1 (negated with
    maximize, like the gradient); step 1 uses 0."""
    make, step, step_hp = CORRECTED[name]
    params0, grads = problem(FP32)
    _, stashes = problem(FP32, seed=7)
    params = fresh_params(params0)
    opt = make(params, approx=False, foreach=foreach, **hp)
    actual = [[] for _ in params]
    for step_grads, stash in zip(grads, stashes):
        for p, s in zip(params, stash):
            p.grad = s.clone()
        opt.stash_grad()
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
        for trajectory, p in zip(actual, params):
            trajectory.append(p.detach().double().clone())
    g_prevs = [[torch.zeros_like(s) for s in stashes[0]]] + stashes[:-1]
    ref_hp = {k: v for k, v in hp.items() if k != "maximize"}
    expected = [ref.run(step, p0, [g[i] for g in grads], g_prevs=[s[i] for s in g_prevs],
                        maximize=hp.get("maximize", False), **step_hp, **ref_hp)
                for i, p0 in enumerate(params0)]
    assert_trajectories_close(actual, expected, FP32)


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
def test_exact_mode_closures(foreach):
    """step(closure, next_closure=...) (closures zero the grads, run backward, return the loss) on quadratic losses f_k(p) = sum(A_k*p^2)/2 + sum(b_k*p):
    g_prev of step t is the gradient of batch t at the parameters before step t-1, the reference
    evaluating the same gradients analytically along its own float64 trajectory."""
    gen = torch.Generator().manual_seed(3)
    shape, steps = (3, 7), 10
    batches = [(torch.rand(shape, generator=gen) + 0.5, torch.randn(shape, generator=gen)) for _ in range(steps + 1)]
    p0 = torch.randn(shape, generator=gen)
    p = p0.clone().requires_grad_(True)
    opt = shine.MARS([p], lr=0.05, gamma=0.1, approx=False, foreach=foreach)

    def closure_for(k):
        def closure():
            opt.zero_grad()
            A, b = batches[k]
            loss = (A * p * p).sum() / 2 + (b * p).sum()
            loss.backward()
            return loss
        return closure

    actual = []
    for t in range(steps):
        opt.step(closure_for(t), next_closure=closure_for(t + 1))
        actual.append(p.detach().double().clone())

    def grad(k, x):
        A, b = (v.double() for v in batches[k])
        return A * x + b

    x, x_prev, state, expected = p0.double(), p0.double(), {}, []
    for t in range(steps):
        g_prev = grad(t, x_prev) if t > 0 else torch.zeros_like(x)
        x_prev, x = x, ref.mars_step(x, grad(t, x), state, lr=0.05, gamma=0.1, g_prev=g_prev)
        expected.append(x)
    torch.testing.assert_close(torch.stack(actual), torch.stack(expected), rtol=1e-5, atol=1e-6)


def test_exact_mode_without_stash_raises():
    """In exact mode a step() with no stash_grad() since the previous step raises RuntimeError."""
    p = torch.zeros(3, 4, requires_grad=True)
    opt = shine.MARS([p], approx=False)
    p.grad = torch.ones(3, 4)
    opt.stash_grad()
    opt.step()
    with pytest.raises(RuntimeError):
        opt.step()


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("accumulate", ["copy_", "zero_add_"])
@pytest.mark.parametrize("name", CORRECTED)
def test_previous_gradient_is_a_copy(name, accumulate, foreach):
    """With the SAME p.grad tensor overwritten in place every step (as zero_grad(set_to_none=False)
    and accumulation do), approx MARS still matches the reference; aliasing p.grad as g_prev would
    give c = g every step, i.e. the gamma = 0 trajectory, which differs."""
    make, step, hp = CORRECTED[name]
    hp = {**hp, "gamma": 0.1}
    params0, grads = problem(FP32)
    params = fresh_params(params0)
    for p in params:
        p.grad = torch.zeros_like(p)
    grad_objects = [p.grad for p in params]
    opt = make(params, foreach=foreach, gamma=0.1)
    actual = [[] for _ in params]
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            if accumulate == "copy_":
                p.grad.copy_(g)
            else:
                p.grad.zero_()
                p.grad.add_(g)
        opt.step()
        for trajectory, p in zip(actual, params):
            trajectory.append(p.detach().double().clone())
    assert all(p.grad is g for p, g in zip(params, grad_objects))
    expected = reference_trajectories(step, params0, grads, **hp)
    assert_trajectories_close(actual, expected, FP32)
    aliased = reference_trajectories(step, params0, grads, **{**hp, "gamma": 0.0})
    two_d = [i for i, s in enumerate(SHAPES) if len(s) == 2]
    for i in two_d:
        assert (torch.stack(expected[i]) - torch.stack(aliased[i])).abs().max() > 1e-3


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
def test_approx_differs_from_adamw_on_2d(foreach):
    """Sanity: the MARS path (2-D) is not plain AdamW on the same gradients; the 1-D path is AdamW with lr_1d."""
    params0, grads = problem(FP32)
    params = fresh_params(params0)
    opt = shine.MARS(params, lr=0.01, lr_1d=0.01, betas=(0.9, 0.95), betas_1d=(0.9, 0.95),
                     weight_decay=0.0, weight_decay_1d=0.0, foreach=foreach)
    actual = drive(opt, params, grads)
    adamw = reference_trajectories(ref.adamw_step, params0, grads, lr=0.01, betas=(0.9, 0.95), weight_decay=0.0)
    for i, shape in enumerate(SHAPES):
        diff = (torch.stack(actual[i]) - torch.stack(adamw[i])).abs().max().item()
        assert diff > 1e-3 if len(shape) == 2 else diff < 1e-6, (shape, diff)


def test_precomputed_clip_gives_the_same_correction():
    """The fused pre-pass computes ``mars_clip`` once and hands it to ``mars_correction``;
    both the clipped (norm > 1) and the unclipped case give the numbers of the one-call form."""
    from shine import rules

    gen = torch.Generator().manual_seed(0)
    for scale in (1.0, 1e-3):  # norm of c well above 1, then well below
        g, prev = scale * torch.randn(40, 30, generator=gen), scale * torch.randn(40, 30, generator=gen)
        hp = dict(gamma=0.025, beta1=0.95)
        clip = rules.mars_clip(g, prev, **hp)
        assert (clip.item() > 1.0) == (scale == 1.0)
        assert torch.equal(rules.mars_correction(g, prev, **hp, clip=clip), rules.mars_correction(g, prev, **hp))


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
def test_clip_of_a_large_tensor_is_accurate(foreach):
    """On a 2000x1000 matrix, torch's float32 CPU norm is off by about 3e-5 relative; the clip
    (and so the step) of both eager paths is within float32 rounding of the float64 value, as the
    compiled path's is."""
    from shine import rules
    from shine.tensorlist import TensorList

    gen = torch.Generator().manual_seed(0)
    g, prev = torch.randn(2000, 1000, generator=gen), torch.randn(2000, 1000, generator=gen)
    hp = dict(gamma=0.025, beta1=0.95)
    exact = rules.mars_clip(g.double(), prev.double(), **hp).item()
    if foreach:
        clip = rules.mars_clip(TensorList([g]), TensorList([prev]), **hp).tensors[0]
    else:
        clip = rules.mars_clip(g, prev, **hp)
    assert clip.dtype == torch.float32
    assert abs(clip.item() - exact) / exact < 2e-7
