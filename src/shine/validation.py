"""Hyperparameter and input checks shared by every optimizer: each error names the problem."""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Sequence

import torch


#: The parameter dtypes whose steps work in float32 (their state is float32 unless ``state_dtype``).
LOW_PRECISION = (torch.float16, torch.bfloat16)


def require(condition: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``condition`` holds."""
    if not condition:
        raise ValueError(message)


def is_number(x: Any) -> bool:
    """A Python int or float, not a bool."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


_PLAIN = frozenset({type(None), bool, int, float, str, torch.dtype})


#: The group keys whose values are dtypes (by name in a state dict: :func:`dtypes_as_names`).
DTYPE_KEYS = ("state_dtype", "ns_dtype")


def plain_values(group: dict[str, Any]) -> None:
    """Replace, in place, a group's NumPy scalars (``np.float32(1e-3)``, as a ``LambdaLR`` whose
    lambda returns one leaves in ``lr`` under NumPy 2), also inside tuples such as ``betas``
    (there, 0-d floating-point tensors too), by Python numbers of the same value, and the names
    of dtypes that :func:`dtypes_as_names` wrote (``"torch.bfloat16"``) by the dtypes. torch.optim
    takes such numbers; the checks here take Python numbers, and the step's arithmetic on a
    float32 scalar would round in float32."""
    for key, value in group.items():
        if key in DTYPE_KEYS and isinstance(value, str) and value.startswith("torch."):
            named = getattr(torch, value.removeprefix("torch."), None)
            group[key] = named if isinstance(named, torch.dtype) else value
        elif key not in ("params", "param_names"):
            group[key] = _plain(value)


def _plain(value: Any) -> Any:
    if type(value) in _PLAIN or isinstance(value, torch.Tensor):  # the usual values, at every step
        return value
    if isinstance(value, (tuple, list)):  # betas: 0-d tensors too, as torch.optim takes them (read as numbers)
        return type(value)(float(v) if isinstance(v, torch.Tensor) and v.ndim == 0 and v.is_floating_point()
                           else _plain(v) for v in value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def dtypes_as_names(group: dict[str, Any]) -> dict[str, Any]:
    """``group`` with each ``torch.dtype`` value (``state_dtype``, ``ns_dtype``) as its name, as a
    state dict holds it: ``torch.distributed.checkpoint`` takes numbers, strings, lists, dicts and
    tensors only (a dtype made ``get_optimizer_state_dict(..., full_state_dict=True)`` fail)."""
    return {k: str(v) if k in DTYPE_KEYS and isinstance(v, torch.dtype) else v for k, v in group.items()}


def check_finite_nonneg(name: str, value: Any, *, positive: bool = False) -> None:
    """A finite number >= 0 (> 0 when ``positive``)."""
    bound = "> 0" if positive else ">= 0"
    require(is_number(value) and math.isfinite(value) and (value > 0 if positive else value >= 0),
            f"Invalid {name}: {value!r} (expected a finite number {bound})")


def check_lr(value: Any, *, positive: bool = False) -> None:
    """:func:`check_finite_nonneg` for ``lr``, which may also be a 0-d floating-point tensor, as
    torch.optim allows (an LR scheduler then fills it in place)."""
    if isinstance(value, torch.Tensor):
        require(value.ndim == 0 and value.is_floating_point(),  # complex is not floating point
                f"Invalid lr: {value!r} (expected a number or a 0-d floating-point tensor)")
        value = value.item()
    check_finite_nonneg("lr", value, positive=positive)


def check_betas(name: str, betas: Sequence[Any], count: int) -> None:
    """``count`` coefficients, each in [0, 1)."""
    require(isinstance(betas, (tuple, list)) and len(betas) == count,
            f"Invalid {name}: {betas!r} (expected a tuple of {count} numbers in [0, 1))")
    for i, b in enumerate(betas):
        require(is_number(b) and 0.0 <= b < 1.0, f"Invalid {name}[{i}]: {b!r} (expected a number in [0, 1))")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """One of ``choices``, of its type too (``1`` is not ``True``, nor ``"False"`` ``False``;
    any ``str``, a ``str`` enum's member or ``np.str_``, stands for a string)."""
    for c in choices:  # None, bools and dtypes are singletons: the check of every step ends here
        if value is c:
            return
    require(any(value == c and (type(value) is type(c) or isinstance(c, str) and isinstance(value, str))
                for c in choices),
            f"Invalid {name}: {value!r} (expected one of {', '.join(map(repr, choices))})")


def check_eps(name: str, value: Any) -> None:
    """A finite number > 0: with 0, a gradient element that is 0 (an unused embedding row) makes
    the update 0 / 0, NaN."""
    require(is_number(value) and math.isfinite(value) and value > 0,
            f"Invalid {name}: {value!r} (expected a finite number > 0; with 0 an element whose gradient "
            f"and moments are 0 gets 0/0 = NaN, so use a tiny one such as 1e-30 instead)")


def check_param(p: torch.Tensor, optimizer: str) -> None:
    """A real floating-point leaf tensor."""
    if p.is_complex():
        raise ValueError(f"{optimizer} does not support complex parameters (got {p.dtype}, shape {tuple(p.shape)}); "
                         "optimize torch.view_as_real(p) instead")
    require(p.is_floating_point(), f"{optimizer} needs floating-point parameters (got {p.dtype})")


def check_grad(g: torch.Tensor, optimizer: str, param_dtype: torch.dtype | None = None,
               shape: torch.Size | None = None) -> None:
    """A dense, real gradient, of the parameter's ``shape`` (a broadcastable one would step
    silently), in the parameter's dtype (``param_dtype``), or in float32 for a float16 or
    bfloat16 parameter (``p.grad_dtype``), whose step works in float32 anyway."""
    if g.is_sparse:
        raise RuntimeError(f"{optimizer} does not support sparse gradients; use torch.optim.SparseAdam "
                           "or a dense embedding (sparse=False)")
    if g.is_complex():
        raise RuntimeError(f"{optimizer} does not support complex gradients (got {g.dtype})")
    if shape is not None and g.shape != shape:
        raise RuntimeError(f"{optimizer} needs a gradient of its parameter's shape {tuple(shape)}; got "
                           f"{tuple(g.shape)}. Nothing was changed.")
    if param_dtype is not None and g.dtype != param_dtype and not (
            param_dtype in LOW_PRECISION and g.dtype == torch.float32):
        raise RuntimeError(f"{optimizer} needs a gradient in its parameter's dtype {param_dtype}, or float32 for "
                           f"float16/bfloat16 parameters; got a {g.dtype} gradient. Nothing was changed.")


_WARNED: set[str] = set()


def warn_once(message: str, stacklevel: int = 3) -> None:
    """A ``RuntimeWarning`` shown once per process for each distinct message (fallbacks, not errors)."""
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel + 1)
