"""The engine's multi-tensor path: a bucket stepped in groups of tensors."""

import pytest
import torch

import shine
from shine import engine

SHAPES = [(), (5,), (3, 7), (7, 3), (4, 3, 3, 3), (40,), (9, 9), (2,)]


def test_groups_are_consecutive_and_bounded(monkeypatch):
    """Consecutive ranges covering every tensor, each of at most the limit's elements unless it
    is one tensor larger than that."""
    monkeypatch.setitem(engine.FOREACH_GROUP_NUMEL, "cpu", 262_144)
    pipe = engine.Pipeline(shine.rules.adamw, ("exp_avg", "exp_avg_sq"), ())
    sizes = [100, 200_000, 100_000, 5, 300_000, 7]
    groups = engine._foreach_groups(pipe, [torch.empty(n) for n in sizes])
    assert groups == [(0, 2), (2, 4), (4, 5), (5, 6)]
    shaped = engine.Pipeline(shine.rules.orthogonal_momentum, (), ())  # Newton-Schulz, tensor by tensor: one group
    assert engine._foreach_groups(shaped, [torch.empty(n) for n in sizes]) == [(0, 6)]


def test_factored_came_groups(monkeypatch):
    """Factored CAME goes matrix by matrix on the CPU (one call for the bucket); elsewhere its
    multi-tensor passes go in groups of at most FACTORED_GROUP_NUMEL elements (its temporaries
    exist for a whole group at once), where the element-wise rules stay whole."""
    came = engine.Pipeline(shine.rules.came_factored, (), ())
    adamw = engine.Pipeline(shine.rules.adamw, ("exp_avg", "exp_avg_sq"), ())
    sizes = [100, 200_000, 100_000, 5, 300_000, 7]
    assert engine._foreach_groups(came, [torch.empty(n) for n in sizes]) == [(0, 6)]
    elsewhere = [torch.empty(n, device="meta") for n in sizes]
    monkeypatch.setattr(engine, "FACTORED_GROUP_NUMEL", 1 << 26)
    assert engine._foreach_groups(came, elsewhere) == [(0, 6)]
    monkeypatch.setattr(engine, "FACTORED_GROUP_NUMEL", 400_000)
    assert engine._foreach_groups(came, elsewhere) == [(0, 4), (4, 6)]
    assert engine._foreach_groups(adamw, elsewhere) == [(0, 6)]


@pytest.mark.parametrize("name", shine.list_optimizers())
def test_grouped_step_gives_the_whole_bucket_bits(name, monkeypatch):
    """Three multi-tensor steps of every optimizer, with the bucket split into groups of at most
    50 elements and in one call: the same bits (each tensor's math is its own)."""
    calls = []
    step = engine.pipeline_step
    monkeypatch.setattr(engine, "pipeline_step", lambda *a, **k: calls.append(1) or step(*a, **k))
    results = []
    for limit in ({}, {"cpu": 50}):
        monkeypatch.setattr(engine, "FOREACH_GROUP_NUMEL", limit)
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
        opt = shine.create_optimizer(params, name, lr=1e-2, fused=False)
        calls.clear()
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        results.append((params, len(calls)))
    (whole, whole_calls), (grouped, grouped_calls) = results
    if "shampoo" not in name and "came" not in name:  # those go tensor by tensor on the CPU: never grouped
        assert grouped_calls > whole_calls
    for a, b in zip(whole, grouped):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["adamw", "lion", "c-adamw"])
def test_elementwise_steps_cut_large_tensors_into_slices(name, dtype, monkeypatch):
    """AdamW and Lion (element-wise) step a tensor of more than the group limit in consecutive 1-D
    slices of at most that many elements, with the whole step's bits (bf16 parameters too, through
    their fp32 copies); a non-contiguous tensor stays whole, and a rule with a whole-tensor
    quantity (caution's mean) never gets slices."""
    seen = []
    step = engine.pipeline_step
    monkeypatch.setattr(engine, "pipeline_step",
                        lambda pipe, p, *a, **k: seen.extend(tuple(t.shape) for t in p) or step(pipe, p, *a, **k))
    results = []
    for limit in ({}, {"cpu": 50}):
        monkeypatch.setattr(engine, "FOREACH_GROUP_NUMEL", limit)
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in [(120,), (9, 9), (7,)]]
        params.append(torch.nn.Parameter(torch.randn(10, 8, generator=gen).to(dtype).t()))  # not contiguous
        opt = shine.create_optimizer(params, name, lr=1e-2, weight_decay=0.1, fused=False)
        seen.clear()
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            opt.step()
        results.append([p.detach().clone() for p in params])
    expected = [(50,), (50,), (20,), (50,), (31,), (7,), (8, 10)] if name != "c-adamw" else [(120,), (9, 9), (7,), (8, 10)]
    assert sorted(seen[:len(expected)]) == sorted(expected)  # the second step's shapes follow
    for a, b in zip(*results):
        assert torch.equal(a, b)
