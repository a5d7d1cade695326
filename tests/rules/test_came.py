"""CAME against the published came_pytorch 0.1.3 and the step-1 magnitude fact of ALGORITHMS.md §2."""

import pytest
import torch

import shine

from .support import assert_trajectories_close, drive, fresh_params, problem

came_pytorch = pytest.importorskip("came_pytorch")

# came_pytorch 0.1.3 factors every tensor with >= 2 dims over its last two dims (shine's
# factor_conv="last2") and, in its unfactored path, applies `update = exp_avg.clone()`: it does NOT
# have the in-place exp_avg scaling bug of ALGORITHMS.md §2, so 1-D and 0-d tensors are compared too.
# (16, 32), (37, 6), (34, 4), (33, 4) and (2, 21, 3): the fused path sums columns in blocks of 16
# rows plus a remainder of 2 to 17 rows, and the residual's columns in blocks of 8 plus 2 to 9.
PACKAGE_SHAPES = [(), (5,), (3, 7), (7, 3), (16, 32), (37, 6), (34, 4), (33, 4), (4, 3, 3, 3), (2, 4, 3, 5),
                  (2, 21, 3)]
PATHS = {"single": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("hp", [
    dict(lr=0.01),
    dict(lr=0.01, weight_decay=0.1, betas=(0.8, 0.99, 0.999), clip_threshold=0.5, eps=(1e-3, 1e-2)),
], ids=["default", "wd-betas-clip-eps"])
def test_matches_came_pytorch(hp, path):
    """shine.CAME(factor_conv="last2") follows came_pytorch.CAME step for step in fp32, on every path."""
    if path == "fused" and not shine.engine.compiler_available("cpu"):
        pytest.skip("torch.compile unavailable")
    dtypes = [torch.float32] * len(PACKAGE_SHAPES)
    params0, grads = problem(dtypes, shapes=PACKAGE_SHAPES)
    package_params = fresh_params(params0)
    expected = drive(came_pytorch.CAME(package_params, **hp), package_params, grads)
    params = fresh_params(params0)
    actual = drive(shine.CAME(params, factor_conv="last2", **PATHS[path], **hp), params, grads)
    assert_trajectories_close(actual, expected, dtypes, what="vs came_pytorch")


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
def test_flatten_differs_from_came_pytorch_on_conv(foreach):
    """The default factor_conv="flatten" is a deliberate departure on conv kernels only."""
    shapes = [(3, 7), (4, 3, 3, 3)]
    params0, grads = problem([torch.float32] * 2, shapes=shapes, steps=4)
    package_params = fresh_params(params0)
    expected = drive(came_pytorch.CAME(package_params, lr=0.01), package_params, grads)
    params = fresh_params(params0)
    actual = drive(shine.CAME(params, lr=0.01, foreach=foreach), params, grads)
    torch.testing.assert_close(torch.stack(actual[0]), torch.stack(expected[0]), rtol=1e-5, atol=1e-6)
    assert (actual[1][-1] - expected[1][-1]).abs().max() > 1e-4


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("betas", [(0.9, 0.999, 0.9999), (0.8, 0.99, 0.999)], ids=["default", "other"])
@pytest.mark.parametrize("shape", [(3, 7), (7, 3), (4, 3, 3, 3)], ids=str)
def test_step1_magnitude(shape, betas, foreach):
    """With a rank-1 gradient (so the factored moments are exact) and zero-initialised R, C, CAME's
    first step is exactly lr*(1-b1)/(b1*sqrt(1-b3))*sign(g): 11.1x AdamW's lr*sign(g) at the defaults."""
    gen = torch.Generator().manual_seed(5)
    a, b = torch.randn(shape[0], generator=gen), torch.randn(int(torch.tensor(shape[1:]).prod()), generator=gen)
    g = torch.outer(a, b).reshape(shape)
    lr, (b1, _, b3) = 1e-3, betas
    ratio = (1 - b1) / (b1 * (1 - b3) ** 0.5)
    displacements = []
    for optimizer, hp in ((shine.CAME, dict(betas=betas, weight_decay=0.0)),
                          (shine.AdamW, dict(eps=1e-30, weight_decay=0.0))):
        p = torch.zeros(shape, requires_grad=True)
        p.grad = g.clone()
        optimizer([p], lr=lr, foreach=foreach, **hp).step()
        displacements.append(p.detach().double())
    came, adamw = displacements
    torch.testing.assert_close(came, -lr * ratio * torch.sign(g.double()), rtol=1e-5, atol=0)
    torch.testing.assert_close(came / adamw, torch.full(shape, ratio, dtype=torch.float64), rtol=1e-5, atol=0)


def test_fused_factored_step_compiles_once_for_any_row_count():
    """One graph serves matrices whose rows divide by the column blocks (16 and 8 rows) or not, over
    and under 4096 rows and 4096 blocks (the blocked column sums and the float32 cascade sums once
    made the compiler guard on each)."""
    if not shine.engine.compiler_available("cpu"):
        pytest.skip("torch.compile unavailable")
    from torch._dynamo.utils import counters

    graphs = []
    for rows in (48, 49, 4100, 33000, 50):
        p = torch.randn(rows, 3, requires_grad=True)
        p.grad = torch.randn(rows, 3)
        shine.CAME([p], lr=1e-3, fused=True).step()
        assert torch.isfinite(p).all()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1:] == graphs[:1] * 4, f"graph count after each matrix: {graphs}"



@pytest.mark.parametrize("name, kw", [("came", {}), ("c-mars-came", {}), ("came", {"factor_conv": "last2"}),
                                      ("came", {"state_dtype": torch.bfloat16, "stochastic_rounding": False})])
def test_gpu_form_steps_matrices_of_one_shape_as_a_stack(name, kw, monkeypatch):
    """Where launches cost host time (the GPU form, forced on the CPU), the factored matrices of one
    shape step as one stack (four 24x16, four conv kernels as 8x27, or with ``factor_conv="last2"``
    as stacks of 8x3 matrices of 3x3, a 5x2 alone: a view of itself), each with its own RMS clip:
    the parameters and every state tensor are those of the form without stacks, and of the CPU's,
    bit for bit here. With fewer than three matrices per shape on average, no stacks."""
    from shine.rules import came
    shapes = [(24, 16), (16,), (8, 3, 3, 3), (24, 16), (8, 3, 3, 3), (5, 2)] + [(24, 16), (8, 3, 3, 3)] * 2
    stacks = []
    factored = came._came_factored

    def spy(x, *state, **hyper):
        if hyper.get("stacked"):
            stacks.append(sorted(tuple(t.shape) for t in x))
        return factored(x, *state, **hyper)
    monkeypatch.setattr(came, "_came_factored", spy)

    def run(gpu_form, stack, shapes=shapes):
        monkeypatch.setattr(shine.tensorlist, "PER_TENSOR_DEVICES", frozenset() if gpu_form else frozenset({"cpu"}))
        monkeypatch.setattr(came, "STACKED", stack)
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
        opt = shine.create_optimizer(params, name, lr=1e-2, foreach=True, fused=False, **kw)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return params + [v for s in opt.state.values() for v in s.values()]
    with_stacks = run(True, True)
    conv = [(4, 8, 3, 3, 3)] if kw.get("factor_conv") == "last2" else [(4, 8, 27)]
    assert stacks == [sorted([(4, 24, 16), (1, 5, 2), *conv])] * 4  # every step
    for other in (run(True, False), run(False, False)):
        assert all(torch.equal(a, b) for a, b in zip(with_stacks, other))
    run(True, True, shapes[:6])  # five matrices of three shapes
    assert len(stacks) == 4
