"""TensorList: the multi-tensor path computes what the per-tensor path computes."""
import torch

from shine import rules
from shine.tensorlist import TensorList, per_tensor

SHAPES = [(), (5,), (3, 4), (2, 3, 2)]


def _lists(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in SHAPES]


def test_arithmetic_and_reductions_match_per_tensor():
    a, b = _lists(0), _lists(1)
    ta, tb = TensorList(a), TensorList(b)
    out = 1 - (ta * 2 - tb) / (tb.abs() + 1)
    ref = [1 - (x * 2 - y) / (y.abs() + 1) for x, y in zip(a, b)]
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r)
    for n, x in zip(ta.norm(), a):
        torch.testing.assert_close(n, x.norm())
    for m, x in zip((ta > 0).to(torch.float32).mean(), a):
        torch.testing.assert_close(m, (x > 0).float().mean())


def test_in_place_ops_update_the_listed_tensors():
    a, b = _lists(0), _lists(1)
    expected = [x.lerp(y, 0.3) for x, y in zip(a, b)]
    TensorList(a).lerp_(TensorList(b), 0.3)
    for x, e in zip(a, expected):
        torch.testing.assert_close(x, e)


def test_rules_run_unchanged_on_tensor_lists():
    """caution and mars_correction (whole-tensor reductions) give per-tensor results on TensorLists."""
    u, g, prev = _lists(0), _lists(1), _lists(2)
    for out, ref in zip(rules.caution(TensorList(u), TensorList(g)), [rules.caution(x, y) for x, y in zip(u, g)]):
        torch.testing.assert_close(out, ref)
    got = rules.mars_correction(TensorList(g), TensorList(prev), gamma=0.5, beta1=0.9)
    for out, x, y in zip(got, g, prev):
        torch.testing.assert_close(out, rules.mars_correction(x, y, gamma=0.5, beta1=0.9))


def test_per_tensor_maps_over_lists():
    double = per_tensor(lambda t, *, k: t * k)
    assert [t.item() for t in double(TensorList([torch.tensor(1.0), torch.tensor(2.0)]), k=3)] == [3.0, 6.0]
