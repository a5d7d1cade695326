"""Validates the naive references themselves (against torch, came_pytorch and hand computations),
so that a disagreement between shine and a reference points at shine."""

import pytest
import torch

import reference as ref

from rules.support import SHAPES, problem


@pytest.mark.parametrize("hp", [
    dict(lr=0.02),
    dict(lr=0.02, betas=(0.8, 0.99), eps=1e-2, weight_decay=0.1),
    dict(lr=0.02, weight_decay=0.0, maximize=True),
], ids=["default", "betas-eps-wd", "maximize"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_adamw_reference_matches_torch(hp, shape):
    """ref.adamw_step equals torch.optim.AdamW in float64 over many steps."""
    (p0,), grads = problem([torch.float64], shapes=[shape])
    p = p0.clone().requires_grad_(True)
    opt = torch.optim.AdamW([p], foreach=False, **hp)
    expected = []
    for (g,) in grads:
        p.grad = g.clone()
        opt.step()
        expected.append(p.detach().clone())
    actual = ref.run(ref.adamw_step, p0, [g for (g,) in grads], **hp)
    torch.testing.assert_close(torch.stack(actual), torch.stack(expected), rtol=1e-12, atol=1e-14)


def test_adamw_step1_is_sign():
    """Step 1 of AdamW moves every coordinate by lr*sign(g)*|g|/(|g|+eps) (about lr)."""
    p0, g = torch.zeros(6, dtype=torch.float64), torch.tensor([3.0, -2.0, 0.5, -1e-3, 7.0, -9.0], dtype=torch.float64)
    (p1,) = ref.run(ref.adamw_step, p0, [g], lr=0.1, eps=0.0, weight_decay=0.0)
    torch.testing.assert_close(p1, -0.1 * torch.sign(g), rtol=1e-12, atol=0)


def test_lion_reference_by_hand():
    """Lion steps 1 and 2 by hand: sign((1-b1)g1), then sign(b1*(1-b2)*g1 + (1-b1)*g2), decoupled wd."""
    lr, wd, (b1, b2) = 0.1, 0.5, (0.9, 0.99)
    p0 = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)
    g1 = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    g2 = torch.tensor([-1.0, -1.0, -100.0], dtype=torch.float64)
    p1, p2 = ref.run(ref.lion_step, p0, [g1, g2], lr=lr, betas=(b1, b2), weight_decay=wd)
    torch.testing.assert_close(p1, p0 * (1 - lr * wd) - lr * torch.sign(g1))
    interp = b1 * (1 - b2) * g1 + (1 - b1) * g2  # = [-0.091, -0.109, -9.991]
    torch.testing.assert_close(p2, p1 * (1 - lr * wd) - lr * torch.sign(interp))
    assert torch.equal(torch.sign(interp), torch.tensor([-1.0, -1.0, -1.0], dtype=torch.float64))


@pytest.mark.parametrize("scale", [1e-2, 10.0], ids=["no-clip", "clip"])
def test_mars_correction_and_clip_by_hand(scale):
    """MARS steps 1-2 by hand: c = g + gamma*b1/(1-b1)*(g - g_prev) with g_prev = 0 at t = 1,
    clipped to norm 1, m = b1*m + (1-b1)*c (read back from the reference's state)."""
    gamma, b1 = 0.025, 0.95
    (p0,), grads = problem([torch.float64], shapes=[(3, 7)], steps=2, grad_scale=scale)
    g1, g2 = grads[0][0], grads[1][0]
    state = {}
    p1 = ref.mars_step(p0, g1, state, lr=0.1, gamma=gamma)
    k = gamma * b1 / (1 - b1)

    def clip(c):
        return c / max(1.0, torch.linalg.norm(c).item())

    c1 = clip((1 + k) * g1)
    torch.testing.assert_close(state["m"], (1 - b1) * c1, rtol=1e-12, atol=0)
    # Step 1 of MARS-AdamW: sqrt(v)/sqrt(1-b2) = |c|, so u = c/(|c| + eps) ~ sign(g).
    torch.testing.assert_close(p1, p0 - 0.1 * c1 / (c1.abs() + 1e-8), rtol=1e-12, atol=0)
    ref.mars_step(p1, g2, state, lr=0.1, gamma=gamma)
    c2 = clip(g2 + k * (g2 - g1))
    torch.testing.assert_close(state["m"], b1 * (1 - b1) * c1 + (1 - b1) * c2, rtol=1e-12, atol=0)
    assert (torch.linalg.norm((1 + k) * g1) > 1) == (scale > 1)


def test_mars_gamma0_small_grads_is_adamw():
    """MARS-AdamW with gamma = 0 and gradients too small to be clipped is AdamW (wd included)."""
    (p0,), grads = problem([torch.float64], shapes=[(3, 7)], grad_scale=1e-2)
    grads = [g for (g,) in grads]
    hp = dict(lr=0.05, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    mars = ref.run(ref.mars_step, p0, grads, gamma=0.0, **hp)
    adamw = ref.run(ref.adamw_step, p0, grads, **hp)
    torch.testing.assert_close(torch.stack(mars), torch.stack(adamw), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("mars_type", ["adamw", "lion", "shampoo"])
@pytest.mark.parametrize("shape", [(), (5,), (4, 3, 3, 3)], ids=str)
def test_mars_non2d_path_is_adamw_1d(mars_type, shape):
    """Non-2-D tensors take AdamW with lr_1d * lr/lr_initial, betas_1d, weight_decay_1d, group eps."""
    (p0,), grads = problem([torch.float64], shapes=[shape])
    grads = [g for (g,) in grads]
    lrs = [0.02, 0.01, 0.005] * 4
    mars = ref.run(ref.mars_step, p0, grads, lrs=lrs, mars_type=mars_type, lr_initial=0.02,
                   lr_1d=0.04, betas_1d=(0.8, 0.9), weight_decay_1d=0.3, eps=1e-3)
    adamw = ref.run(ref.adamw_step, p0, grads, lrs=[2 * lr for lr in lrs], betas=(0.8, 0.9),
                    weight_decay=0.3, eps=1e-3)
    torch.testing.assert_close(torch.stack(mars), torch.stack(adamw), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("shape", [(3, 7), (7, 3), (5, 5)], ids=str)
@pytest.mark.parametrize("steps", [1, 5])
def test_newton_schulz_is_polynomial_of_singular_values(shape, steps):
    """NS maps M = U S V^T to U phi(S/(||M||_F + 1e-7)) V^T with phi the quintic iterated ``steps`` times;
    checked through an SVD, independently of the matrix iteration."""
    M = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    s = S / (torch.linalg.norm(M) + 1e-7)
    for _ in range(steps):
        s = 3.4445 * s - 4.7750 * s**3 + 2.0315 * s**5
    torch.testing.assert_close(ref.newton_schulz(M, steps), U @ torch.diag(s) @ Vh, rtol=1e-10, atol=1e-12)


CAME_HP = [
    dict(lr=0.01),
    dict(lr=0.01, weight_decay=0.1, betas=(0.8, 0.99, 0.999), clip_threshold=0.5, eps=(1e-3, 1e-2)),
]


@pytest.mark.parametrize("hp", CAME_HP, ids=["default", "wd-betas-clip-eps"])
@pytest.mark.parametrize("shape", [(), (5,), (3, 7), (7, 3), (2, 4, 3, 5)], ids=str)
def test_came_reference_matches_came_pytorch(hp, shape):
    """ref.came_step with factor_conv="last2" equals the published came_pytorch 0.1.3 in float64
    (that package factors over the last two dims and its unfactored path copies m: upd = exp_avg.clone())."""
    came_pytorch = pytest.importorskip("came_pytorch")
    (p0,), grads = problem([torch.float64], shapes=[shape])
    p = p0.clone().requires_grad_(True)
    opt = came_pytorch.CAME([p], **hp)
    expected = []
    for (g,) in grads:
        p.grad = g.clone()
        opt.step()
        expected.append(p.detach().clone())
    actual = ref.run(ref.came_step, p0, [g for (g,) in grads], factor_conv="last2", **hp)
    torch.testing.assert_close(torch.stack(actual), torch.stack(expected), rtol=1e-10, atol=1e-12)


def test_came_flatten_differs_from_last2():
    """On a conv kernel, the default flatten factoring gives a different trajectory than last2."""
    (p0,), grads = problem([torch.float64], shapes=[(4, 3, 3, 3)], steps=3)
    grads = [g for (g,) in grads]
    flat = ref.run(ref.came_step, p0, grads, lr=0.01)
    last2 = ref.run(ref.came_step, p0, grads, lr=0.01, factor_conv="last2")
    assert (flat[-1] - last2[-1]).abs().max() > 1e-4


def test_caution_by_hand():
    """caution keeps u where u*g > 0 (strict) and divides by the kept fraction, floored at 1e-3."""
    u = torch.tensor([1.0, -2.0, 3.0, 0.0], dtype=torch.float64)
    g = torch.tensor([1.0, 1.0, 2.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(ref.caution(u, g), torch.tensor([2.0, 0.0, 6.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(ref.caution(u, -g), torch.tensor([0.0, -8.0, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(ref.caution(-u.abs() - 1, g.abs()), torch.zeros(4, dtype=torch.float64))


def test_cautious_wrapper_reference_by_hand():
    """The wrapper reference moves p_old - caution(p_old - p_inner, g), including weight decay in the mask."""
    p0 = torch.tensor([1.0, -1.0], dtype=torch.float64)
    g = torch.tensor([1.0, 1e-9], dtype=torch.float64)
    # Lion, lr 0.1, wd 5: d = 0.5*p + 0.1*sign(g) = [0.6, -0.4]; coordinate 1 (pure decay) disagrees with g.
    (p1,) = ref.run(ref.cautious_wrapper_step, p0, [g], inner_step=ref.lion_step, lr=0.1, weight_decay=5.0)
    torch.testing.assert_close(p1, torch.tensor([1.0 - 0.6 / 0.5, -1.0], dtype=torch.float64))

