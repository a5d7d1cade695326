"""Caution's pieces: the kept fraction counted from ``next_momentum`` (the fused path's read-only
pre-pass) is the one counted from the direction each rule returns; ``hoist`` is the identity."""

import pytest
import torch

from shine import rules
from shine.rules.hoist import hoist

BETA1 = 0.9


def _adamw(x, m):
    v = x * x * 3 + 1e-30
    return rules.adamw(x, m, v, beta1=BETA1, beta2=0.99, eps=1e-8, bias_correction1=0.1,
                       bias_correction2_sqrt=0.1 ** 0.5)


DIRECTIONS = {
    "adamw": _adamw,
    "lion": lambda x, m: rules.lion(x, m, beta1=BETA1, beta2=0.99),
    "sign_momentum": lambda x, m: rules.sign_momentum(x, m, beta1=BETA1),
}


@pytest.mark.parametrize("rule", list(DIRECTIONS))
def test_kept_fraction_from_next_momentum_matches_the_direction(rule):
    gen = torch.Generator().manual_seed(0)
    x, m, g = (torch.randn(4000, generator=gen) for _ in range(3))
    x[:500] = 0.0  # exact zeros: zero direction, never kept
    m[:250] = 0.0
    g = torch.where(torch.rand(4000, generator=gen) < 0.5, x, g)  # g agrees with x half the time
    before = rules.kept_fraction(rules.next_momentum(x, m, beta1=BETA1), g)
    u = DIRECTIONS[rule](x, m.clone())
    assert torch.equal(before, rules.kept_fraction(u, g))
    assert torch.equal(before, rules.kept_fraction(rules.formed(DIRECTIONS[rule](x, m.clone())), g))
    # a quotient is formed once: each caution gets its own
    cautious = [rules.formed(rules.caution(u, g, before)), rules.formed(rules.caution(DIRECTIONS[rule](x, m.clone()), g))]
    assert torch.equal(*cautious)
    expected = rules.formed(DIRECTIONS[rule](x, m.clone()))
    mask = expected * g > 0
    torch.testing.assert_close(cautious[0], expected * mask / before, rtol=1e-6, atol=0)
    assert 0.2 < before.item() < 0.8  # a real mix of kept and dropped coordinates


def test_kept_fraction_is_floored():
    g = torch.ones(10)
    assert rules.kept_fraction(-g, g).item() == pytest.approx(1e-3)


def test_hoist_is_the_identity_outside_the_compiler():
    t = torch.randn(3)
    assert hoist(t) is t


def test_hoist_under_compile_gives_the_same_numbers():
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    f = lambda t: t * hoist(t.norm().clamp_min(1.0).reciprocal())  # noqa: E731
    # the compiled norm may sum in another order: equal to a few ulps
    torch.testing.assert_close(torch.compile(f, dynamic=True)(x), f(x), rtol=1e-6, atol=0)
