"""Mixed precision: bf16 parameters with fp32 state, bf16 state, and stochastic rounding."""
import pytest
import torch

import shine
from shine import engine
from shine.bench import gpt2_shapes
from rules.support import bf16_spacing

pytestmark = pytest.mark.usefixtures("fused_in_pairs")  # groups of two (tests/conftest.py)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_stochastic_round_is_unbiased_and_lands_on_neighbours(compiled):
    """Both noise sources: torch.randint_like (eager) and the index hash (under torch.compile)."""
    if compiled and not engine.compiler_available("cpu"):
        pytest.skip("torch.compile unavailable")
    stochastic_round = torch.compile(engine.stochastic_round, dynamic=True) if compiled else engine.stochastic_round
    torch.manual_seed(0)
    lo = torch.tensor(1.0, dtype=torch.bfloat16)
    spacing = 2.0 ** -7  # bf16 spacing in [1, 2)
    hi = torch.tensor(1.0 + spacing, dtype=torch.bfloat16)
    x = torch.full((200_000,), 1.0 + 0.3 * spacing)
    r = stochastic_round(x)
    assert r.dtype == torch.bfloat16
    assert bool(((r == lo) | (r == hi)).all())
    assert abs(r.double().mean().item() - x[0].item()) < 0.01 * spacing
    assert abs((r == hi).double().mean().item() - 0.3) < 0.01
    exact = torch.tensor([0.0, -0.0, 1.0, -2.5, 2.0 ** 127, float("inf"), float("-inf")])
    assert torch.equal(stochastic_round(exact), exact.bfloat16())
    assert torch.isnan(stochastic_round(torch.tensor([float("nan")]))).all()
    neg = stochastic_round(-x)  # symmetric: rounds the magnitude
    assert abs(neg.double().mean().item() + x[0].item()) < 0.01 * spacing
    # each element, over calls (fresh noise per call): rounded up 30% of the time, within 4 sd
    ups = torch.stack([stochastic_round(x[:8]) == hi for _ in range(400)]).double().mean(0)
    assert bool(((ups - 0.3).abs() < 4 * (0.21 / 400) ** 0.5).all()), ups


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_stochastic_round_decides_each_element_independently(compiled):
    """Halfway between two bf16 values, each element rounds up half the time, and elements at any
    distance decide independently: the compiled CPU path's hash of the element index (Knuth's
    multiplicative hash alone) had correlated elements 1, 8, 55, 987 and 4096 apart by -0.53,
    0.78, 0.97, 1.00 and -0.87."""
    if compiled and not engine.compiler_available("cpu"):
        pytest.skip("torch.compile unavailable")
    stochastic_round = torch.compile(engine.stochastic_round, dynamic=True) if compiled else engine.stochastic_round
    torch.manual_seed(0)
    spacing = 2.0 ** -7
    x = torch.full((8192,), 1.0 + 0.5 * spacing)
    up = torch.stack([stochastic_round(x) > 1.0 for _ in range(300)]).double() - 0.5  # +-1/2
    assert (up.mean(0).abs() < 4 * 0.5 / 300 ** 0.5).float().mean() > 0.999  # each element: p = 1/2
    for d in (1, 2, 8, 55, 987, 4096):
        correlation = (up[:, :-d] * up[:, d:]).mean().item() / 0.25
        assert abs(correlation) < 0.03, (d, correlation)


def test_bf16_state_dtypes_and_memory():
    """state_dtype=bf16 halves the per-element state; CAME's factored statistics stay fp32."""
    shapes = gpt2_shapes(2, 64, vocab=500, context=64)
    params = [torch.zeros(s, requires_grad=True) for s in shapes]
    n = sum(p.numel() for p in params)
    for p in params:
        p.grad = torch.ones_like(p)
    sizes = {}
    for name in ("adamw", "mars-adamw", "came"):
        for state_dtype in (None, torch.bfloat16):
            kw = {"lr": 1e-4} if name == "came" else {}
            opt = shine.create_optimizer(params, name, state_dtype=state_dtype, **kw)
            opt.step()
            sizes[name, state_dtype] = shine.optimizer_state_bytes(opt)
            for p in params:
                for key, value in opt.state[p].items():
                    if key == "step":
                        assert value.dtype == torch.float32
                    elif value.shape == p.shape:
                        assert value.dtype == (state_dtype or torch.float32), (name, key)
                    else:
                        assert value.dtype == torch.float32, (name, key)  # factored statistics
        assert sizes[name, torch.bfloat16] < 0.55 * sizes[name, None], name
    # CAME: about one fp32 copy of the parameters (the target is <= 1.1x).
    assert sizes["came", None] <= 1.1 * 4 * n
    assert sizes["adamw", None] >= 2 * 4 * n


def _constant_grad_run(opt, p, steps):
    for _ in range(steps):
        p.grad = torch.ones_like(p)
        opt.step()


@pytest.mark.parametrize("stochastic", [False, True])
def test_bf16_state_second_moment(stochastic):
    """v = EMA(g^2) with beta2 = 0.999 and g = 1 must reach 1 - 0.999^t. Rounded to nearest in
    bf16 it stalls near 0.25 (the increment falls below half a bf16 spacing); stochastic
    rounding keeps it unbiased."""
    torch.manual_seed(0)
    p = torch.zeros(4096, requires_grad=True)
    opt = shine.AdamW([p], lr=0.0, weight_decay=0.0, state_dtype=torch.bfloat16, stochastic_rounding=stochastic)
    steps = 1000
    _constant_grad_run(opt, p, steps)
    v = opt.state[p]["exp_avg_sq"].double()
    expected = 1 - 0.999 ** steps
    if stochastic:
        assert abs(v.mean().item() - expected) < 0.01
    else:
        assert v.mean().item() < 0.3 < expected - 0.3  # the stall the option exists for


@pytest.mark.parametrize("stochastic", [False, True])
def test_bf16_param_write_back(stochastic):
    """Lion moves each bf16 weight by exactly lr = 1e-3 per step, a quarter of the bf16 spacing
    at 1: rounded to nearest the weights never move; stochastically they move on average."""
    torch.manual_seed(0)
    p = torch.ones(4096, dtype=torch.bfloat16, requires_grad=True)
    opt = shine.Lion([p], lr=1e-3, stochastic_rounding=stochastic)
    _constant_grad_run(opt, p, 100)
    mean = p.detach().double().mean().item()
    if stochastic:
        assert abs(mean - 0.9) < 0.005
    else:
        assert mean == 1.0


def _run(name, dtype, state_dtype, stochastic, fused, steps=8, seed=0, lr=None):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(5,), (6, 9), (9, 6)]
    params = [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]
    kw = {"lr": lr} if lr is not None else {"lr": 1e-3} if name == "came" else {}
    opt = shine.create_optimizer(params, name, state_dtype=state_dtype, stochastic_rounding=stochastic,
                                 fused=fused, **kw)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        opt.step()
    return [p.detach().double() for p in params]


@pytest.mark.parametrize("name", ["adamw", "c-mars-adamw", "came"])
def test_bf16_state_follows_fp32_state(name):
    """bf16 state with stochastic rounding stays close to the fp32-state trajectory."""
    torch.manual_seed(0)
    exact = _run(name, torch.float32, None, None, False)
    low = _run(name, torch.float32, torch.bfloat16, None, False)
    for a, e in zip(low, exact):
        torch.testing.assert_close(a, e, rtol=0, atol=5e-3)


@pytest.mark.skipif(not engine.compiler_available("cpu"), reason="torch.compile unavailable")
@pytest.mark.parametrize("name", ["adamw", "c-mars-adamw", "came"])
def test_fused_bf16_everything(name):
    """bf16 parameters and bf16 state on the fused path: nearest rounding matches the reference
    path (within one bf16 step of each element, where the fp32 math before the rounding may
    differ), stochastic rounding stays close. lr 1e-2 moves the weights by many bf16 steps, so
    a path that did not step would fail both."""
    def run(*args, **kw):
        return torch.cat([p.flatten() for p in _run(name, torch.bfloat16, torch.bfloat16, *args, **kw)])

    torch.manual_seed(0)
    start = run(False, False, steps=0)
    ref = run(False, False, lr=1e-2)
    fused = run(False, True, lr=1e-2)
    spacing = bf16_spacing(ref)
    assert ((fused - ref).abs() <= spacing).all()
    moved = (ref - start).abs().mean()
    assert moved > 2 * spacing.mean()
    fused_sr = run(True, True, lr=1e-2)
    assert (fused_sr - ref).abs().mean() < 0.3 * moved


@pytest.mark.skipif(not engine.compiler_available("cpu"), reason="torch.compile unavailable")
@pytest.mark.skipif(not hasattr(torch.Tensor, "grad_dtype"), reason="this torch has no grad_dtype")
@pytest.mark.parametrize("name", ["adamw", "lion", "c-mars-adamw", "came"])
def test_fused_step_of_bf16_weights_with_fp32_gradients(name):
    """``p.grad_dtype = torch.float32`` (fp32 gradients of bf16 weights) compiles on the fused path
    (no fallback warning) and matches the multi-tensor path to a bf16 rounding."""
    import warnings

    results = []
    for fused in (False, True):
        gen = torch.Generator().manual_seed(0)
        p = torch.randn(64, 32, generator=gen).bfloat16().requires_grad_()
        p.grad_dtype = torch.float32
        opt = shine.create_optimizer([p], name, lr=1e-2, fused=fused)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in range(3):
                p.grad = torch.randn(64, 32, generator=gen)
                opt.step()
        results.append(p.detach().float())
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=2e-3)
