"""A list of tensors that does arithmetic with ``torch._foreach_*`` kernels.

The update rules in :mod:`shine.rules` are written once, with ordinary tensor
methods and operators. Called on plain tensors they are the per-tensor
reference path; called on :class:`TensorList` s they become the multi-tensor
path, because every method used by the rules maps to a foreach kernel here
(one launch for the whole list) or, for the few without one (comparisons,
reductions along a dim, reshapes), to a loop over the elements.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

from .distributed import is_dtensor
from .validation import is_number

_Operand = Any  # a number, a 0-d tensor, a list of numbers or a TensorList
# dtypes in which a number operand and a 0-d tensor of the same value give the same results
# (their opmath type is themselves; fp16/bf16 ops take a number in fp32)
_EXACT_0D_DTYPES = (torch.float32, torch.float64)


class TensorList:
    """An ordered list of tensors supporting the tensor API used by the rules."""

    __slots__ = ("tensors",)

    def __init__(self, tensors: Iterable[Tensor]):
        self.tensors = list(tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __iter__(self):
        return iter(self.tensors)

    def __repr__(self) -> str:
        return f"TensorList({[tuple(t.shape) for t in self.tensors]})"

    # ---- foreach-backed arithmetic -------------------------------------------------
    @staticmethod
    def _arg(x: _Operand):
        return x.tensors if isinstance(x, TensorList) else x

    def _operand(self, x: _Operand):
        """:meth:`_arg`, with a Python number as a 0-d tensor of the list's dtype when the list holds
        plain fp32/fp64 CPU tensors. The CPU foreach kernels convert a number operand once per
        tensor: ``_foreach_mul`` of 98 tensors of 768 elements took 3.6 us per tensor with a
        number and 1.5 us with a 0-d tensor (in place: 2.7 against 0.8). Making the 0-d tensor
        costs about 3.7 us, so a list of one or two tensors keeps the number (a layer-wise lr
        decay gives each group its own bucket, often of one tensor). In fp32 and fp64 the number
        enters the arithmetic in the tensors' dtype either way, so the results are the same bits.
        (Not in the GPU form forced on the CPU, ``PER_TENSOR_DEVICES`` emptied: as on a GPU, a
        number stays a number there, and reading a 0-d tensor's value is no synchronisation.)"""
        if is_number(x) and len(self.tensors) > 2:
            t = self.tensors[0]
            on_cpu = t.device.type == "cpu" and "cpu" in PER_TENSOR_DEVICES
            if on_cpu and t.dtype in _EXACT_0D_DTYPES and not is_dtensor(t):
                return torch.tensor(x, dtype=t.dtype)
        if isinstance(x, TensorList) and HOST_SCALARS and _scalars_for(x, self):
            return host_values(x)
        return self._arg(x)

    def _binary(self, op: Callable, other: _Operand) -> "TensorList":
        return TensorList(op(self.tensors, self._operand(other)))

    def __add__(self, o): return self._binary(torch._foreach_add, o)
    def __sub__(self, o): return self._binary(torch._foreach_sub, o)
    def __mul__(self, o): return self._binary(torch._foreach_mul, o)
    def __truediv__(self, o): return self._binary(torch._foreach_div, o)
    # a 0-d tensor exponent changes pow's results in the last bit: the number stays a number
    def __pow__(self, o): return TensorList(torch._foreach_pow(self.tensors, self._arg(o)))
    def pow_(self, o): torch._foreach_pow_(self.tensors, self._arg(o)); return self
    __radd__ = __add__
    __rmul__ = __mul__

    def __rsub__(self, o): return TensorList(torch._foreach_add(torch._foreach_neg(self.tensors), self._operand(o)))
    def __neg__(self): return TensorList(torch._foreach_neg(self.tensors))

    def add_(self, o, *, alpha=1):
        if alpha == 1:
            torch._foreach_add_(self.tensors, self._operand(o))
        else:  # only list operands take an alpha
            torch._foreach_add_(self.tensors, self._arg(o), alpha=alpha)
        return self
    def sub_(self, o): torch._foreach_sub_(self.tensors, self._operand(o)); return self
    def mul_(self, o): torch._foreach_mul_(self.tensors, self._operand(o)); return self
    def div_(self, o): torch._foreach_div_(self.tensors, self._operand(o)); return self
    def copy_(self, o):
        if self.tensors and is_dtensor(self.tensors[0]):  # DTensor has no _foreach_copy_ strategy
            for t, x in zip(self.tensors, self._arg(o)):
                t.copy_(x)
        else:
            torch._foreach_copy_(self.tensors, self._arg(o))
        return self
    def addcmul_(self, a, b, *, value=1):
        torch._foreach_addcmul_(self.tensors, self._arg(a), self._arg(b), value=value); return self
    def addcdiv_(self, a, b, *, value=1):
        torch._foreach_addcdiv_(self.tensors, self._arg(a), self._arg(b), value=value); return self
    def lerp_(self, end, w): torch._foreach_lerp_(self.tensors, self._arg(end), self._arg(w)); return self
    def lerp(self, end, w): return TensorList(torch._foreach_lerp(self.tensors, self._arg(end), self._arg(w)))
    def sqrt(self): return TensorList(torch._foreach_sqrt(self.tensors))
    def rsqrt(self): return TensorList(torch._foreach_rsqrt(self.tensors))
    def reciprocal_(self): torch._foreach_reciprocal_(self.tensors); return self
    def sign(self): return TensorList(torch._foreach_sign(self.tensors))
    def sign_(self): torch._foreach_sign_(self.tensors); return self
    def abs(self): return TensorList(torch._foreach_abs(self.tensors))
    def clamp_min(self, o): return self._binary(torch._foreach_clamp_min, o)
    def clamp_min_(self, o): torch._foreach_clamp_min_(self.tensors, self._operand(o)); return self
    def norm(self, p=2, dtype=None): return TensorList(torch._foreach_norm(self.tensors, p, dtype=dtype))

    # ---- everything else: one call per element -------------------------------------
    def __getattr__(self, name: str):
        if name.startswith("__"):  # protocols (``__dict__``, ``__deepcopy__``, ...) are not tensor methods
            raise AttributeError(name)

        def method(*args, **kwargs):
            return _map(lambda t, *a: getattr(t, name)(*a, **kwargs), self, *args)
        return method

    def __gt__(self, o): return _map(lambda t, x: t > x, self, o)
    def __getitem__(self, index): return _map(lambda t: t[index], self)


#: Device types on which the rules, given TensorLists, prefer fewer passes over memory to fewer
#: kernel calls: there a kernel call costs about a function call, and a tensor's passes run back
#: to back while it is in cache. On GPUs each launch costs host time, and the multi-tensor path had
#: been host-bound (an H200, GPT-2 small: CAME 43 ms of wall time for 9.6 ms of kernels, C-AdamW
#: 16.8 for 6.4), so there the rules use multi-tensor kernels wherever one exists.
PER_TENSOR_DEVICES = frozenset({"cpu"})


def multi_tensor_preferred(x: Any) -> bool:
    """Whether ``x`` is a TensorList on a device where kernel launches cost host time (not in
    :data:`PER_TENSOR_DEVICES`): the rules then take multi-tensor kernels over per-tensor ones."""
    return isinstance(x, TensorList) and bool(x.tensors) and x.tensors[0].device.type not in PER_TENSOR_DEVICES


#: Whether a TensorList operand of 0-d tensors (a scale per tensor: caution's kept fraction,
#: MARS's clip, CAME's) goes to a multi-tensor kernel as numbers, copied to the host at once (one
#: synchronisation), where launches cost host time (:func:`multi_tensor_preferred`). torch's
#: multi-tensor kernels take a list of 0-d tensors only tensor by tensor: a launch per tensor,
#: which was most of the launches that caution adds to a GPU step (148 of 160 for C-AdamW on
#: GPT-2 small). The numbers are the tensors' values, so the results are the same bits; but only
#: on fp32 and fp64 lists: a bf16 or fp16 list takes a 0-d float32 tensor rounded to its own
#: dtype, and a number unrounded.
HOST_SCALARS = True


def _scalars_for(x: TensorList, like: TensorList) -> bool:
    """Whether ``x`` is one 0-d tensor per tensor of ``like``, and :data:`HOST_SCALARS` applies:
    ``like`` is an fp32 or fp64 list on a device where launches cost host time, neither holds
    DTensors, and the values can be read (:func:`has_values`)."""
    return (multi_tensor_preferred(like) and len(x) == len(like) and like.tensors[0].dtype in _EXACT_0D_DTYPES
            and all(t.ndim == 0 and not is_dtensor(t) for t in x.tensors)
            and not all(t.ndim == 0 for t in like.tensors) and not is_dtensor(like.tensors[0])
            and has_values(like.tensors[0]))


def has_values(t: Tensor) -> bool:
    """Whether ``t``'s values can be read: not a meta tensor, nor a FakeTensor (of a memory
    estimate or a trace), which have shapes only."""
    return not (t.is_meta or isinstance(t, FakeTensor))  # is_fake(t) took 1.3 us a tensor, these 0.2


def host_values(x: TensorList) -> list:
    """The values of a list of 0-d tensors as Python numbers: one copy to the host, one synchronisation."""
    return torch.stack(x.tensors).tolist()


def size_of(t: Any, dim: int | None = None):
    """The size of ``t`` along ``dim`` (``None``: its number of elements); for a TensorList, the
    list of its tensors' sizes, which divide them in one multi-tensor kernel."""
    if isinstance(t, TensorList):
        return [size_of(x, dim) for x in t]
    return t.numel() if dim is None else t.shape[dim]


def _map(fn: Callable, *args: _Operand):
    """Apply ``fn`` element-wise, zipping TensorList arguments and broadcasting the rest."""
    n = next(len(a) for a in args if isinstance(a, TensorList))
    columns = [a.tensors if isinstance(a, TensorList) else [a] * n for a in args]
    out = [fn(*row) for row in zip(*columns)]
    if all(o is None for o in out):
        return None
    if isinstance(out[0], tuple):
        return tuple(TensorList(col) for col in zip(*out))
    return TensorList(out)


#: CPU tensors from this many elements up are reduced in rows by :func:`sum_of_squares`; below it
#: a float32 sum is accurate (1.1e-6 relative at 65535 elements).
ROWWISE_MIN_NUMEL = 65536
#: The longest row :func:`sum_of_squares` sums in one float32 reduction; longer rows (and 1-D
#: tensors) are cut into blocks of :data:`_BLOCK` elements.
_LONGEST_ROW = 65536
_BLOCK = 1024


def _rows(t: Tensor) -> list[Tensor]:
    """``t``'s elements as 2-D views whose rows :func:`sum_of_squares` and :func:`total` reduce:
    ``t``'s own rows where they are at most :data:`_LONGEST_ROW` long, else blocks of
    :data:`_BLOCK` elements and a shorter last row. Inside a compiled graph the last block is
    padded with zeros instead (one view of ``t``): inductor fails to lower a view of a slice of
    a computed tensor with dynamic shapes ("pop from empty list")."""
    if t.ndim >= 2 and math.prod(t.shape[1:]) <= _LONGEST_ROW:
        return [t.reshape(t.shape[0], -1)]
    flat = t.reshape(-1)
    if torch.compiler.is_compiling():
        blocks = (flat.numel() + _BLOCK - 1) // _BLOCK
        return [torch.nn.functional.pad(flat, (0, blocks * _BLOCK - flat.numel())).view(blocks, _BLOCK)]
    blocks = flat.numel() // _BLOCK
    return [flat[:blocks * _BLOCK].view(blocks, _BLOCK), flat[blocks * _BLOCK:].view(1, -1)]


def _by_rows(t: Tensor) -> bool:
    """Whether a whole-tensor sum of ``t`` goes row by row (:func:`_rows`, the rows' sums added
    in float64): where ``t`` is large and eager on the CPU, for accuracy (see
    :func:`sum_of_squares`), and inside any graph compiled for another device, for speed. One
    compiled graph serves every tensor size, and inductor plans a whole-tensor reduction for the
    size of the tensor whose call compiled it (and its on-disk cache keeps the plan for later
    processes). On an H200, over GPT-2 small's tensors, C-AdamW's fused step took 20.7 ms of
    kernel time with its count of kept elements planned for a tensor of 8192 elements (19.4 ms
    of it in the count), and 222 ms after the CUDA tests, whose tensors have a few elements, had
    most likely compiled it; by rows, 2.0 ms (torch's fused AdamW: 1.0 ms; measured with the last
    row sliced off, before it was padded). Rows of a fixed length are a plan that fits every
    size. DTensors keep their shard-wise reductions."""
    if is_dtensor(t):
        return False
    if torch.compiler.is_compiling():
        return t.device.type != "cpu"
    return t.device.type == "cpu" and t.numel() >= ROWWISE_MIN_NUMEL


def sum_of_squares(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``sum(t**2)`` as a 0-d float64 tensor, accurate on the CPU: the squares are summed in
    ``dtype`` within rows (:func:`_rows`), and the rows' sums in float64.

    torch's CPU norm sums a whole tensor in float32 chunk by chunk: on a random 50257x768 matrix
    it is off by 2.7e-3 relative (4e-5 at 768x3072, 6e-5 for 3M elements in 1-D); by rows,
    1e-10, and as fast. Every reduction here sums by index, so the result is the same bits
    wherever ``t`` lies in memory (unlike BLAS ``dot``).
    """
    return sum(torch.linalg.vector_norm(r, dim=-1, dtype=dtype).double().square().sum() for r in _rows(t))


def total(t: Any) -> Any:
    """The sum of ``t``'s elements (of each tensor of a TensorList), as a 0-d tensor of ``t``'s
    dtype: row by row where :func:`_by_rows` says so, else one reduction."""
    if isinstance(t, TensorList):
        return _map(total, t)
    if not _by_rows(t):
        return t.sum()
    return sum(r.sum(-1).double().sum() for r in _rows(t)).to(t.dtype)


def l2_norm(t: Any) -> Any:
    """The Euclidean norm of ``t`` (of each tensor of a TensorList), in ``t``'s dtype: through
    :func:`sum_of_squares` where :func:`_by_rows` says so, else ``norm()`` (CUDA's eager tree
    reductions are accurate, and inductor's CPU loops to 1e-7 on 50257x768). A TensorList where
    launches cost host time (:func:`multi_tensor_preferred`) takes one multi-tensor norm."""
    if isinstance(t, TensorList):
        return t.norm() if multi_tensor_preferred(t) else _map(l2_norm, t)
    if not _by_rows(t):
        return t.norm()
    return sum_of_squares(t, torch.promote_types(t.dtype, torch.float32)).sqrt().to(t.dtype)


def as_dtype_of(t: Any, like: Any) -> Any:
    """``t`` (a tensor or TensorList) in the dtype of ``like`` (one of the same kind), element by
    element; itself where the dtypes already match (no copy)."""
    if not isinstance(t, TensorList):
        return t.to(like.dtype)
    if all(a.dtype == b.dtype for a, b in zip(t, like)):
        return t
    return TensorList(a.to(b.dtype) for a, b in zip(t, like))


def per_tensor(fn: Callable) -> Callable:
    """Let a function written for one tensor accept TensorLists (it is then mapped).

    Used for the math whose shape matters (matrix factoring, Newton–Schulz), where
    tensors of different shapes cannot share a foreach kernel anyway.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for a in args:  # a loop, not any(<generator>): this runs for every call on plain tensors too
            if isinstance(a, TensorList):
                return _map(lambda *a: fn(*a, **kwargs), *args)
        return fn(*args, **kwargs)

    return wrapper
