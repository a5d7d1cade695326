"""TensorList: the multi-tensor path computes what the per-tensor path computes."""
import copy

import pytest
import torch

from shine import rules
from shine import tensorlist
from shine.tensorlist import (TensorList, as_dtype_of, l2_norm, multi_tensor_preferred, per_tensor, size_of,
                              sum_of_squares, total)

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
    for n, x in zip(ta.norm(1), a):
        torch.testing.assert_close(n, x.abs().sum())
    for m, x in zip((ta > 0).to(torch.float32).mean(), a):
        torch.testing.assert_close(m, (x > 0).float().mean())


def test_in_place_ops_update_the_listed_tensors():
    """In-place ops write into the listed tensors themselves, with the per-tensor op's bits."""
    ops = {
        "lerp_": lambda x, y: x.lerp_(y, 0.3),
        "add_ alpha": lambda x, y: x.add_(y, alpha=-0.37),  # apply_update's one pass
        "addcdiv_": lambda x, y: x.addcdiv_(y, y.abs() + 1, value=-0.37),  # ... of a Quotient
        "sign_": lambda x, y: x.sign_(),
        "gt_": lambda x, y: x.gt_(0),  # caution's mask, written into its temporary
        "pow_": lambda x, y: x.pow_(2),
        "clamp_min_": lambda x, y: x.clamp_min_(0),  # caution's mask where launches cost host time
    }
    for name, op in ops.items():
        a, b = _lists(0), _lists(1)
        expected = [op(x.clone(), y) for x, y in zip(a, b)]
        ids = [id(x) for x in a]
        out = op(TensorList(a), TensorList(b))
        assert [id(x) for x in out] == ids, name
        for x, e in zip(a, expected):
            assert torch.equal(x, e), name


def test_rules_run_unchanged_on_tensor_lists():
    """caution and mars_correction (whole-tensor reductions) give per-tensor results on TensorLists."""
    u, g, prev = _lists(0), _lists(1), _lists(2)
    for out, ref in zip(rules.caution(TensorList(u), TensorList(g)), [rules.caution(x, y) for x, y in zip(u, g)]):
        torch.testing.assert_close(out, ref)
    got = rules.mars_correction(TensorList(g), TensorList(prev), gamma=0.5, beta1=0.9)
    for out, x, y in zip(got, g, prev):
        torch.testing.assert_close(out, rules.mars_correction(x, y, gamma=0.5, beta1=0.9))


def test_as_dtype_of_casts_where_needed_and_copies_nothing_otherwise():
    fp32, bf16 = TensorList(_lists(0)), TensorList(t.bfloat16() for t in _lists(1))
    assert as_dtype_of(fp32, TensorList(_lists(1))) is fp32
    cast = as_dtype_of(bf16, fp32)
    assert [t.dtype for t in cast] == [torch.float32] * len(fp32)
    assert all(torch.equal(a, b.float()) for a, b in zip(cast, bf16))
    assert as_dtype_of(fp32.tensors[0], bf16.tensors[0]).dtype == torch.bfloat16


def test_per_tensor_maps_over_lists():
    double = per_tensor(lambda t, *, k: t * k)
    assert [t.item() for t in double(TensorList([torch.tensor(1.0), torch.tensor(2.0)]), k=3)] == [3.0, 6.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_number_operands_give_the_per_tensor_bits(dtype):
    """On CPU a number operand enters the foreach kernels as a 0-d tensor (faster there); the
    results stay bit for bit what per-tensor arithmetic with the number gives. (The rules only
    do arithmetic in fp32/fp64; bf16 lists keep the number, and there torch's own foreach and
    per-tensor kernels already round differently.)"""
    ops = {
        "add": lambda x, c: x + c, "sub": lambda x, c: x - c, "mul": lambda x, c: x * c,
        "div": lambda x, c: x / c, "rsub": lambda x, c: c - x, "radd": lambda x, c: c + x,
        "rmul": lambda x, c: c * x, "clamp_min": lambda x, c: x.clamp_min(c),
        "add_": lambda x, c: x.add_(c), "sub_": lambda x, c: x.sub_(c),
        "mul_": lambda x, c: x.mul_(c), "div_": lambda x, c: x.div_(c),
    }
    for c in (0.7, 1 / 3, 1e-8, 0.999, 2, -1.5, 1 - 0.9 ** 7):
        for name, op in ops.items():
            for length in (1, 3):  # one or two tensors keep the number (its 0-d tensor costs more)
                a = [t.to(dtype) for t in _lists(3)][:length]
                expected = [op(t.clone(), c) for t in a]
                got = op(TensorList(a), c)
                for g, e in zip(got, expected):
                    assert g.dtype == e.dtype and torch.equal(g, e), f"{name} {c} {dtype} {length}"


def test_protocol_attributes_are_not_mapped_methods():
    """Unknown tensor methods map over the list, but Python's protocol lookups (``__dict__``,
    ``__deepcopy__``, ...) find nothing: torch.compile's tracer and ``copy`` ask for them."""
    tl = TensorList([torch.ones(2), torch.zeros(3)])
    assert not hasattr(tl, "__dict__") and not hasattr(tl, "__deepcopy__")
    copied = copy.deepcopy(tl)
    assert copied is not tl and all(torch.equal(a, b) for a, b in zip(copied, tl))
    assert [t.shape for t in tl.flatten()] == [torch.Size([2]), torch.Size([3])]


def test_sizes_and_where_multi_tensor_kernels_are_preferred(monkeypatch):
    """``size_of``: a tensor's size along a dim or its numel, a list of them for a TensorList.
    Multi-tensor kernels are preferred for TensorLists off ``PER_TENSOR_DEVICES`` (the CPU)."""
    a = _lists(0)
    assert size_of(a[2]) == 12 and size_of(a[2], -1) == 4
    assert size_of(TensorList(a)) == [1, 5, 12, 12] and size_of(TensorList(a[1:]), 0) == [5, 3, 2]
    assert not multi_tensor_preferred(TensorList(a)) and not multi_tensor_preferred(a[0])
    assert multi_tensor_preferred(TensorList([torch.empty(3, device="meta")]))
    assert not multi_tensor_preferred(TensorList([]))
    monkeypatch.setattr(tensorlist, "PER_TENSOR_DEVICES", frozenset())
    assert multi_tensor_preferred(TensorList(a))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_per_tensor_scales_go_to_the_host_once_where_launches_cost(dtype, monkeypatch):
    """Where launches cost host time, a list of 0-d tensors as an operand (a scale per tensor)
    reaches the multi-tensor kernel of an fp32 or fp64 list as numbers, read in one copy to the
    host: the same bits as torch's tensor-by-tensor fallback, which the CPU form (and
    ``HOST_SCALARS = False``) keeps, and bf16 lists too (a number would not be rounded to bf16)."""
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(s, generator=g).to(dtype) for s in [(5,), (3, 4), (2, 3, 2)]]
    scales = TensorList([torch.rand((), generator=g) + 0.5 for _ in tensors])
    reads = []
    monkeypatch.setattr(tensorlist, "host_values", lambda x: reads.append(x) or torch.stack(x.tensors).tolist())

    def results():
        tl = TensorList([t.clone() for t in tensors])
        return [*(tl * scales), *(tl / scales), *(tl - scales), *tl.clamp_min(scales), *tl.mul_(scales).div_(scales)]
    fallback = results()
    assert not reads  # the CPU form
    monkeypatch.setattr(tensorlist, "PER_TENSOR_DEVICES", frozenset())
    for a, b in zip(results(), fallback):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert len(reads) == (0 if dtype == torch.bfloat16 else 6)
    if dtype == torch.bfloat16:
        return
    monkeypatch.setattr(tensorlist, "HOST_SCALARS", False)
    results()
    assert len(reads) == 6
    both = TensorList([torch.tensor(2.0), torch.tensor(3.0)])  # 0-d tensors scaled by 0-d tensors: kernels match
    assert [t.item() for t in both * both] == [4.0, 9.0] and len(reads) == 6


@pytest.mark.parametrize("shape", [(2000, 1000), (3, 400_000), (3_000_001,)], ids=["rows", "long rows", "1-D"])
def test_sum_of_squares_and_norm_are_accurate_on_large_tensors(shape):
    """By the tensor's rows, by blocks of long rows and of a 1-D tensor (with a remainder): within
    float32 rounding of the float64 value, where torch's float32 CPU norm is off by 1.5e-5 to
    6e-5 relative on these; the same through a TensorList; float64 input stays float64. The plain
    sum (:func:`total`) takes the same rows."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    exact = x.double().square().sum().item()
    assert sum_of_squares(x, torch.float32).dtype == torch.float64
    assert sum_of_squares(x, torch.float32).item() == pytest.approx(exact, rel=1e-8)
    norm = l2_norm(x)
    assert norm.dtype == torch.float32 and norm.item() == pytest.approx(exact ** 0.5, rel=2e-7)
    assert torch.equal(l2_norm(TensorList([x, x[:5]])).tensors[0], norm)
    assert l2_norm(x.double()).item() == pytest.approx(exact ** 0.5, rel=1e-12)
    total_ = total(x)
    assert total_.dtype == torch.float32 and total_.item() == pytest.approx(x.double().sum().item(), rel=1e-6)
    assert [t.item() for t in total(TensorList([x, x[:5]]))] == [total_.item(), x[:5].sum().item()]


def test_norm_of_small_tensors_is_torchs():
    """Under 64K elements a float32 norm is accurate: those keep ``norm()`` (one multi-tensor
    kernel where launches cost host time)."""
    xs = _lists(0)
    for n, x in zip(l2_norm(TensorList(xs)), xs):
        assert torch.equal(n, x.norm())
