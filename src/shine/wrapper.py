"""Caution for any ``torch.optim.Optimizer``, by masking the displacement it makes."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.optim import Optimizer

from .base import run_closure
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

    def __init__(self, inner: Optimizer):
        if not isinstance(inner, Optimizer):
            raise TypeError(f"Cautious wraps a torch.optim.Optimizer, got {type(inner).__name__}")
        super().__init__([torch.zeros(())], {})  # sets up the hooks; its placeholder group is never used
        self.inner = inner

    param_groups = _delegated("param_groups")
    state = _delegated("state")
    defaults = _delegated("defaults")

    def __repr__(self) -> str:
        return f"Cautious({self.inner!r})"

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "inner" in self.__dict__:
            self.inner.add_param_group(param_group)
        else:
            super().add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Run the inner step, then keep only the coordinates where it moved against the gradient."""
        loss = run_closure(closure)
        before = [(p, p.clone(), g.get("maximize", False)) for g in self.param_groups for p in g["params"]
                  if p.grad is not None]
        self.inner.step()
        for p, old, maximize in before:
            p.copy_(old - caution(old - p, -p.grad if maximize else p.grad))
        return loss
