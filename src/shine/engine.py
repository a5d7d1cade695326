"""Runs one pipeline of rules over a bucket of tensors, on one of three execution paths.

A *pipeline* is one path through the boxes of :mod:`shine.rules`
(estimate -> precondition -> mask -> apply); a *bucket* is the tensors of one
parameter group that take the same pipeline, live on the same device, have the
same dtype and the same step count. :func:`pipeline_step` is the only place the
boxes are composed, and every path calls it:

- ``"per_tensor"``: a Python loop, one tensor at a time (the reference);
- ``"foreach"``: once, on :class:`TensorList` s (multi-tensor kernels);
- ``"fused"``: the per-tensor loop traced by ``torch.compile`` into fused kernels,
  with every float hyperparameter passed as a 0-d tensor so that a scheduler
  never triggers a recompile. This module is the only one that knows about
  ``torch.compile``.
"""
from __future__ import annotations

import dataclasses
import functools
import types
import warnings
from typing import Any, Callable

import torch
from torch import Tensor

from . import rules
from .tensorlist import TensorList

PATHS = ("per_tensor", "foreach", "fused")
LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """One path through the boxes: which preconditioner, with which state and hyperparameters.

    ``state`` and ``hyper`` name, in order, the state tensors and the keyword
    hyperparameters that ``precondition`` takes. ``correction`` prepends the
    MARS gradient estimate (state ``prev_grad``; hyperparameters ``gamma`` and
    ``beta1``); with ``approx`` the current gradient is then copied into
    ``prev_grad`` (a copy, never an alias). ``cautious`` masks the direction.
    """

    precondition: Callable
    state: tuple[str, ...]
    hyper: tuple[str, ...]
    correction: bool = False
    approx: bool = True
    cautious: bool = False
    maximize: bool = False


def pipeline_step(pipe: Pipeline, p, g, state: dict[str, Any], hyper: dict[str, Any]) -> None:
    """Advance ``p`` (a tensor or TensorList) by one step of ``pipe``; updates ``state`` in place.

    Low-precision parameters are updated through an fp32 copy (their state is fp32).
    """
    upcast = _dtype_of(p) in LOW_PRECISION
    work = p.float() if upcast else p
    g = g.float() if upcast else g
    if pipe.maximize:
        g = -g
    x = g
    if pipe.correction:
        x = rules.mars_correction(g, state["prev_grad"], gamma=hyper["gamma"], beta1=hyper["beta1"])
        if pipe.approx:
            state["prev_grad"].copy_(g)
    u = pipe.precondition(x, *(state[name] for name in pipe.state), **{k: hyper[k] for k in pipe.hyper})
    if pipe.cautious:
        u = rules.caution(u, g)
    rules.apply_update(work, u, lr=hyper["lr"], decay=hyper["decay"])
    if upcast:
        p.copy_(work)


def _dtype_of(p) -> torch.dtype:
    return p.tensors[0].dtype if isinstance(p, TensorList) else p.dtype


def run_bucket(path: str, pipe: Pipeline, params: list[Tensor], grads: list[Tensor],
               states: list[dict[str, Tensor]], hyper: dict[str, Any]) -> None:
    """Apply one step of ``pipe`` to every tensor of a bucket on the chosen execution path."""
    if path == "per_tensor":
        for p, g, s in zip(params, grads, states):
            pipeline_step(pipe, p, g, s, hyper)
    elif path == "foreach":
        state = {name: TensorList(s[name] for s in states) for name in _state_names(pipe)}
        pipeline_step(pipe, TensorList(params), TensorList(grads), state, hyper)
    elif path == "fused":
        device = params[0].device
        tensor_hyper = {k: torch.tensor(v, dtype=torch.float32, device=device) if isinstance(v, float) else v
                        for k, v in hyper.items()}
        _compiled(pipe)(params, grads, [{n: s[n] for n in _state_names(pipe)} for s in states], tensor_hyper)
    else:
        raise ValueError(f"unknown execution path {path!r}; expected one of {PATHS}")


def choose_path(fused: bool | None, foreach: bool | None, device: torch.device, numel: int) -> str:
    """The execution path for a bucket of ``numel`` elements, from the user's ``fused``/``foreach`` flags."""
    if fused and compiler_available(device.type):
        return "fused"
    return "per_tensor" if foreach is False else "foreach"


def _state_names(pipe: Pipeline) -> tuple[str, ...]:
    return pipe.state + (("prev_grad",) if pipe.correction else ())


def _loop(pipe: Pipeline, params, grads, states, hyper) -> None:
    for p, g, s in zip(params, grads, states):
        pipeline_step(pipe, p, g, s, hyper)


@functools.cache
def _compiled(pipe: Pipeline) -> Callable:
    """A compiled step for ``pipe``. Dynamo keeps one cache (and recompile limit) per code
    object, so each pipeline gets its own copy of ``_loop``'s code."""
    loop = types.FunctionType(_loop.__code__.replace(), _loop.__globals__, "_fused_step")
    return functools.partial(torch.compile(loop, dynamic=False), pipe)


@functools.cache
def compiler_available(device_type: str) -> bool:
    """Whether ``torch.compile`` can build kernels for ``device_type`` here (tried once, cached)."""
    try:
        fn = torch.compile(lambda t: t * 2 + 1, dynamic=False)
        return bool(torch.equal(fn(torch.ones(3, device=device_type)), torch.full((3,), 3.0, device=device_type)))
    except Exception as err:  # any failure to build or run means: no compiler here
        warnings.warn(f"shine: torch.compile is unavailable on {device_type} ({type(err).__name__}: {err}); "
                      "fused=True falls back to the multi-tensor path", RuntimeWarning, stacklevel=3)
        return False
