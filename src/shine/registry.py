"""Optimizer names, their defaults, and ``create_optimizer`` with sensible parameter groups."""
from __future__ import annotations

import difflib
import inspect
from typing import Any, Iterable

import torch
from torch import nn

from .distributed import is_dtensor
from .optimizers import CAME, MARS, AdamW, Lion

# name -> (class, defaults). Every name also exists with a "c-" prefix (cautious=True).
_BASE: dict[str, tuple[type, dict[str, Any]]] = {
    "adamw": (AdamW, {}),
    "lion": (Lion, {}),
    "mars-adamw": (MARS, {"mars_type": "adamw"}),
    "mars-lion": (MARS, {"mars_type": "lion", "lr": 1e-4}),
    "mars-shampoo": (MARS, {"mars_type": "shampoo", "lr": 2e-2}),
    "came": (CAME, {"lr": 2e-4}),
    "mars-came": (CAME, {"lr": 2e-4, "gamma": 0.025}),
}
_CAUTIOUS_PREFIX = "c-"


def list_optimizers() -> list[str]:
    """Every name ``create_optimizer`` accepts, each base name followed by its cautious variant."""
    return [n for base in _BASE for n in (base, _CAUTIOUS_PREFIX + base)]


def resolve(name: str) -> tuple[type, dict[str, Any]]:
    """The class and defaults of a registered name; an unknown name's error lists the close matches."""
    key = name.lower().strip()
    cautious = key.startswith(_CAUTIOUS_PREFIX)
    base = key[len(_CAUTIOUS_PREFIX):] if cautious else key
    if base not in _BASE:
        close = difflib.get_close_matches(key, list_optimizers(), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"Unknown optimizer {name!r}.{hint} Known: {', '.join(list_optimizers())}")
    cls, defaults = _BASE[base]
    return cls, {**defaults, "cautious": cautious}


def _no_decay_params(model: nn.Module) -> set[int]:
    """Ids of biases, normalisation weights, embeddings and every other tensor with fewer than 2 dims."""
    ids = set()
    for module in model.modules():
        is_norm = "norm" in type(module).__name__.lower()
        for p in module.parameters(recurse=False):
            if p.ndim < 2 or is_norm or isinstance(module, nn.Embedding):
                ids.add(id(p))
    return ids


def param_groups(model: nn.Module, weight_decay: float, decay_keys: Iterable[str] = ("weight_decay",)) -> list[dict]:
    """Two groups: matrices with ``weight_decay``, and the rest (biases, norms, embeddings) without it.
    Parameters frozen now (``requires_grad=False``) are left out, as timm's factory leaves them: to
    unfreeze some later, give them to the optimizer then with ``add_param_group``."""
    skip = _no_decay_params(model)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if id(p) not in skip]
    no_decay = [p for p in params if id(p) in skip]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, **{k: 0.0 for k in decay_keys}})
    return [g for g in groups if g["params"]]


def create_optimizer(model_or_params: nn.Module | Iterable[Any], name: str, *, lr: float | None = None,
                     weight_decay: float | None = None, **hyper: Any) -> torch.optim.Optimizer:
    """Build the optimizer ``name`` (see :func:`list_optimizers`).

    Given a module, biases, normalisation weights and embeddings are kept out of
    weight decay (for MARS both ``weight_decay`` and ``weight_decay_1d``); given
    parameters or groups, they are used as they are. ``lr``, ``weight_decay`` and
    any other keyword override the registered defaults.
    """
    cls, kwargs = resolve(name)
    if lr is not None:
        kwargs["lr"] = lr
    kwargs.update(hyper)
    if isinstance(model_or_params, nn.Module):
        wd = weight_decay if weight_decay is not None else inspect.signature(cls).parameters["weight_decay"].default
        keys = ("weight_decay", "weight_decay_1d") if cls is MARS else ("weight_decay",)
        params: Any = param_groups(model_or_params, wd, keys)
    else:
        params = model_or_params
        if weight_decay is not None:
            kwargs["weight_decay"] = weight_decay
    return cls(params, **kwargs)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's state tensors (local shards for distributed tensors)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                local = value.to_local() if is_dtensor(value) else value
                total += local.numel() * local.element_size()
    return total
