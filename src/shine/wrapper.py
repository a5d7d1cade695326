"""Caution for any ``torch.optim.Optimizer``, by masking the displacement it makes."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.optim import Optimizer

from .base import run_closure, with_load_hooks
from .rules import caution


def _delegated(name: str) -> property:
    """An attribute read from and written to the inner optimizer once there is one.

    (torch's ``load_state_dict`` rebinds ``state`` and ``param_groups``, so they
    cannot be aliased once.)"""

    def get(self):
        inner = self.__dict__.get("inner")
        return getattr(inner, name) if inner is not None else self.__dict__["_own_" + name]

    def set(self, value):
        inner = self.__dict__.get("inner")
        if inner is not None:
            setattr(inner, name, value)
        else:
            self.__dict__["_own_" + name] = value

    return property(get, set)


class Cautious(Optimizer):
    """Wrap any optimizer so that it only moves coordinates that agree with the gradient.

    After ``inner.step()`` the displacement ``d = p_before - p_after`` is kept where
    ``d * g > 0`` and rescaled by ``1 / max(mean(mask), 1e-3)`` (mean over the
    whole tensor), then written back: ``p = p_before - d * mask / mean``.

    Approximation: the mask sees the inner optimizer's whole displacement, so
    its weight decay is masked too (the papers keep decay unmasked); for AdamW,
    Lion, MARS and CAME use shine's own ``cautious=True``, which is exact.
    ``g`` is ``p.grad`` (negated for groups with ``maximize=True``).

    Cost: a copy of every stepped parameter (transient memory of one parameter
    set) and three extra element-wise passes per step.

    The wrapper shares ``param_groups``, ``state`` and ``defaults`` with the inner
    optimizer, so LR schedulers, ``state_dict`` and ``add_param_group`` work on it.
    """

    def __init__(self, inner: Optimizer, **options: Any):
        if options or not isinstance(inner, Optimizer):
            given = f" and options {', '.join(options)}" if options else ""
            raise TypeError(f"Cautious wraps a torch.optim.Optimizer instance, Cautious(torch.optim.AdamW(params, "
                            f"lr=...)); got {type(inner).__name__}{given}. It is not a class that builds "
                            f"one from parameters (ZeroRedundancyOptimizer's optimizer_class): wrap the built "
                            f"optimizer, or use cautious=True of shine's optimizers")
        super().__init__([torch.zeros(())], {})  # sets up the hooks; its placeholder group is never used
        self.inner = inner

    param_groups = _delegated("param_groups")
    state = _delegated("state")
    defaults = _delegated("defaults")

    def __repr__(self) -> str:
        return f"Cautious({self.inner!r})"

    def __getattr__(self, name: str) -> Any:
        """What the inner optimizer has beyond torch's API: shine's ``init_state()`` (before
        ``torch.distributed.checkpoint``), exact mode's ``stash_grad()``, ``skipped_steps``, ...
        (public names only: torch's private attributes stay the wrapper's own)."""
        inner = self.__dict__.get("inner")
        if inner is None or name.startswith("_"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        """A public attribute of the inner optimizer's own (``nonfinite``, ``max_grad_norm``) is set
        there, where the step reads it; everything else (torch's hooks, a scheduler's patched
        ``step``) on the wrapper."""
        inner = self.__dict__.get("inner")
        if inner is not None and not name.startswith("_") and name not in self.__dict__ and name in vars(inner):
            setattr(inner, name, value)
        else:
            super().__setattr__(name, value)

    def __getstate__(self) -> dict[str, Any]:
        """What a copy (``copy.deepcopy``, ``pickle``) carries: the inner optimizer, which holds the
        groups and state (torch's ``__getstate__`` reads them, and would lose ``inner``), and the
        wrapper's hooks."""
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_own_")}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "inner" in self.__dict__:
            self.inner.add_param_group(param_group)
        else:
            super().add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict, between the wrapper's own state-dict hooks (a post-hook
        may return another)."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        state_dict = self.inner.state_dict()
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The inner optimizer's ``load_state_dict``, between the wrapper's own load hooks."""
        with_load_hooks(self, state_dict, self.inner.load_state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Run the inner step, then keep only the coordinates where it moved against the gradient.

        A ``closure`` goes to the inner step, which may evaluate it several times (LBFGS); the
        gradient the mask compares with is the one of its first evaluation, at the parameters the
        step starts from."""
        # without a closure, only the parameters the inner step moves (those with a gradient) need a
        # copy; a closure may give the others one
        params = [(p, g.get("maximize", False)) for g in self.param_groups for p in g["params"]
                  if p.requires_grad and (closure is not None or p.grad is not None)]
        before = [p.clone() for p, _ in params]
        if closure is None:
            loss, grads = self.inner.step(), [p.grad for p, _ in params]
        else:
            first = _FirstGradients([p for p, _ in params], closure)
            loss, grads = self.inner.step(first), first.grads
        for (p, maximize), old, g in zip(params, before, grads):
            if g is not None:
                p.copy_(old - caution(old - p, -g if maximize else g))
        return loss


class _FirstGradients:
    """A step closure that records the gradients of ``params`` its first evaluation leaves; they
    are copied only if it is evaluated again (which replaces or zeroes them)."""

    def __init__(self, params: list[torch.Tensor], closure: Callable[[], Any]):
        self.params, self.closure = params, closure
        self.grads: list[torch.Tensor | None] = [None] * len(params)
        self.calls = 0

    def __call__(self) -> Any:
        if self.calls == 1:
            self.grads = [None if g is None else g.clone() for g in self.grads]
        loss = run_closure(self.closure)
        if self.calls == 0:
            self.grads = [p.grad for p in self.params]
        self.calls += 1
        return loss
