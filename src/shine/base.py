"""The shell every shine optimizer shares: groups, state, checks, buckets; the math lives in rules."""
from __future__ import annotations

import collections
import functools
import math
import warnings
from typing import Any, Callable, Hashable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import distributed, engine
from .engine import Pipeline
from .validation import (LOW_PRECISION, check_choice, check_finite_nonneg, check_grad, check_param, dtypes_as_names,
                         plain_values, require)

NONFINITE = ("raise", "skip", "ignore")
STATE_DTYPES = (None, torch.float32, torch.bfloat16)


def state_zeros(p: Tensor, *, reduce: tuple[Iterable[int], int] | None = None,
                memory_format: torch.memory_format = torch.preserve_format) -> Tensor:
    """Zero optimizer state for ``p``: fp32 for fp16/bf16 parameters, else ``p``'s dtype.

    ``zeros_like(p)`` (so a DTensor parameter gets DTensor state), laid out like ``p`` unless
    ``memory_format`` says otherwise (``torch.contiguous_format`` for state that the rule views
    in another shape: a channels-last tensor has no such view). ``reduce=(view_shape, dim)``
    gives state shaped like ``p.reshape(view_shape).sum(dim)`` (CAME's row/column statistics),
    placed as that reduction is for a DTensor ``p``.
    """
    dtype = _working_dtype(p.dtype)
    if reduce is not None:
        return distributed.reduced_zeros(p, tuple(reduce[0]), reduce[1], dtype)
    return torch.zeros_like(p, dtype=dtype, memory_format=memory_format)


class ShineOptimizer(Optimizer):
    """A ``torch.optim.Optimizer`` that routes each parameter to a :class:`Pipeline` and runs it.

    Subclasses define four small methods: ``_check_group`` (validate
    hyperparameters), ``_route`` (which pipeline a parameter takes),
    ``_new_state`` (the zero state of a route) and ``_pipeline`` (the pipeline
    and the hyperparameters of a route in a group, read fresh at every step so an
    LR scheduler's changes take effect).

    Common options:
        foreach: multi-tensor kernels (default) or, with ``False``, the per-tensor reference loop.
        fused: ``torch.compile`` the step into fused kernels (``True``), or not (``False``);
            ``None`` (default) fuses where it measured faster: CPU buckets of at least
            ``engine.AUTO_FUSE_MIN_NUMEL["cpu"]`` elements (on CUDA the multi-tensor path was the
            faster, see ``engine.AUTO_FUSE_MIN_NUMEL``); never with ``foreach=False``. Within
            a fused bucket, tensors under ``engine.FUSED_MIN_TENSOR_NUMEL`` (8192) elements
            share the multi-tensor kernels (a compiled call costs more host time than they take).
            Where the compiler does not work (learnt from the first compile, which fails before
            writing anything), the fused path warns once and uses the multi-tensor path.
        state_dtype: dtype of the per-element state (momenta, ``prev_grad``); ``None`` (default)
            is fp32 for fp16/bf16 parameters and the parameter's dtype otherwise;
            ``torch.bfloat16`` halves the state memory. Factored CAME statistics stay fp32.
        stochastic_rounding: round bf16 write-backs (bf16 parameters, bf16 state) stochastically
            (unbiased) instead of to nearest. ``None`` (default): on when ``state_dtype`` is bf16.
        nonfinite: what a NaN/inf gradient does: ``"raise"`` (default: an error naming the
            parameter, state untouched), ``"skip"`` (the step is skipped, state untouched,
            ``skipped_steps`` counts it) or ``"ignore"`` (no check, as torch.optim does).
        max_grad_norm: clip the gradients of all the optimizer's parameters to this global
            Euclidean norm, as ``torch.nn.utils.clip_grad_norm_`` before ``step()`` would
            (same coefficient, ``max_grad_norm / (norm + 1e-6)`` capped at 1), but without
            writing the gradients: the coefficient enters the update (on the fused path, inside
            its kernel). The norm's pass over the gradients is also the non-finite check, which
            then costs nothing extra. ``last_grad_norm`` holds the norm before clipping (for
            logging). ``None`` (default): no clipping. The norm is over this optimizer's
            parameters: under ZeRO, where each rank's optimizer holds a partition, clip with
            ``clip_grad_norm_`` instead (see docs/distributed.md).
    """

    def __init__(self, params: Any, defaults: dict[str, Any], *, foreach: bool | None, fused: bool | None,
                 nonfinite: str, state_dtype: torch.dtype | None = None, stochastic_rounding: bool | None = None,
                 max_grad_norm: float | None = None):
        self.nonfinite = nonfinite
        self.max_grad_norm = max_grad_norm
        self._check_options()
        self.last_grad_norm: float | None = None
        self.skipped_steps = 0
        super().__init__(params, {**defaults, "foreach": foreach, "fused": fused, "state_dtype": state_dtype,
                                  "stochastic_rounding": stochastic_rounding})

    #: State a parameter may hold between calls besides its step's (exact mode's stash).
    _KEPT_BETWEEN_CALLS: tuple[str, ...] = ()

    #: The attributes besides torch's (``defaults``, ``state``, ``param_groups``) that a copy
    #: (``copy.deepcopy``, ``pickle``) must carry: torch's ``__getstate__`` keeps only its own.
    _COPIED = ("nonfinite", "max_grad_norm", "last_grad_norm", "skipped_steps")

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), **{name: getattr(self, name) for name in self._COPIED}}

    # ---- subclass interface ----------------------------------------------------------
    def _check_group(self, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _route(self, group: dict[str, Any], p: Tensor) -> Hashable:
        raise NotImplementedError

    def _new_state(self, group: dict[str, Any], route: Hashable, p: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def _pipeline(self, group: dict[str, Any], route: Hashable) -> tuple[Pipeline, dict[str, Any]]:
        raise NotImplementedError

    def _check_options(self) -> None:
        """The options that are attributes, not group keys (they may be set at any time)."""
        check_choice("nonfinite", self.nonfinite, NONFINITE)
        if self.max_grad_norm is not None:
            check_finite_nonneg("max_grad_norm", self.max_grad_norm, positive=True)

    def _validate(self, group: dict[str, Any]) -> None:
        """The group's NumPy numbers and dtype names as Python numbers and dtypes
        (:func:`plain_values`), then the options every optimizer has, then ``_check_group``."""
        plain_values(group)
        for key in ("cautious", "maximize"):
            check_choice(key, group[key], (True, False))
        for key in ("foreach", "fused", "stochastic_rounding"):
            check_choice(key, group[key], (None, True, False))
        check_choice("state_dtype", group["state_dtype"], STATE_DTYPES)
        self._check_group(group)

    def _also_checked(self, params: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """``(parameter, tensor)`` pairs of ``params`` for the tensors besides their gradients that the
        step reads as gradients, which the non-finite check covers too (none here)."""
        return []

    #: Whether the rule reads each element alone (AdamW, Lion), so that only caution's kept
    #: fraction reads whole tensors.
    _ELEMENTWISE_RULE = False

    def _whole_tensor_math(self, group: dict[str, Any]) -> bool:
        """Whether the group's math reads whole tensors (norms, means, shapes), not just elements."""
        return group["cautious"] or not self._ELEMENTWISE_RULE

    # ---- torch.optim.Optimizer API -----------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's, then shine's checks of the group; a group they refuse is not added."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            name = type(self).__name__
            require(len(set(group["params"])) == len(group["params"]),
                    f"{name}: a parameter group lists a parameter more than once (it would be stepped "
                    f"with the gradient counted twice on one path and once on another); list each once")
            for p in group["params"]:
                check_param(p, name)
            self._validate(group)
            for p in group["params"]:
                self._check_layout(group, p)
        except BaseException:
            self.param_groups.pop()
            raise

    def _check_layout(self, group: dict[str, Any], p: Tensor) -> None:
        """Refuse a parameter laid out so that the group's math cannot work on it (FSDP1's flat
        shards, for math that reads whole tensors), or whose dtype the group's ``state_dtype`` does
        not apply to, with an error that names the problem."""
        distributed.check_layout(p, type(self).__name__, self._whole_tensor_math(group))
        self._check_state_dtype(group, p)

    def _check_state_dtype(self, group: dict[str, Any], p: Tensor) -> None:
        """Refuse a ``state_dtype`` for a parameter whose step does not work in float32 (float64):
        the step would fail on it, after stepping other parameters."""
        if group.get("state_dtype") is not None and _working_dtype(p.dtype) != torch.float32:
            raise ValueError(f"{type(self).__name__}: state_dtype={group['state_dtype']} applies to float32, "
                             f"bfloat16 and float16 parameters, whose steps work in float32; parameter "
                             f"#{self._index(p)} is {p.dtype}. Leave state_dtype=None for it (its state is then "
                             f"{p.dtype}).")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = run_closure(closure)
        self._update()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """torch's, with the groups' dtypes (``state_dtype``) by name (:func:`dtypes_as_names`), so
        that ``torch.distributed.checkpoint`` can gather and offload it; loading turns them back.
        (State-dict post-hooks, which torch runs inside, still see the dtypes.)"""
        state_dict = super().state_dict()
        state_dict["param_groups"] = [dtypes_as_names(g) for g in state_dict["param_groups"]]
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load copies of the saved state (torch shares the tensors with the source, whose steps then
        count this optimizer's too), on each parameter's device, keeping each tensor's saved dtype
        (torch would cast fp32 state to bf16 params) where the step can work with it: state saved
        for parameters of another precision (fp32 state for now fp64 parameters) takes the dtype
        this optimizer would make.

        A state dict saved by another optimizer loads where it holds this one's state: from
        ``torch.optim.AdamW`` into :class:`shine.AdamW` (the same ``exp_avg``, ``exp_avg_sq``
        and ``step``), its groups taking this optimizer's defaults for the options it lacks.
        Otherwise a parameter whose saved state lacks a tensor this optimizer needs, holds one it
        does not keep (MARS's ``prev_grad`` for AdamW), or holds one of another shape than this
        optimizer makes for it (state saved for other parameters, or in another order), is an error
        that names it, and the optimizer keeps the state it had; so is a saved group whose
        hyperparameters this optimizer refuses (``eps=0``: set it in the state dict first). The
        step would otherwise fail midway (after stepping other buckets), or step a same-sized state
        of another shape silently on the fused path, which works on flat views.

        Load hooks run as torch runs them: the pre-hooks before (the state dict one returns is the
        one loaded), the post-hooks after the copies (what they change stays).
        """
        with_load_hooks(self, state_dict, self._load)

    def _load(self, state_dict: dict[str, Any]) -> None:
        before = self.state, self.param_groups  # torch's load_state_dict binds new ones
        # torch's load_state_dict without the hooks, which with_load_hooks runs: torch's would run
        # the pre-hooks again, and the post-hooks before the copies
        hooks = "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks"
        held = {name: getattr(self, name) for name in hooks if hasattr(self, name)}
        try:
            for name in held:
                setattr(self, name, collections.OrderedDict())
            super().load_state_dict(state_dict)
            self._load_copies(state_dict)
        except Exception:
            self.state, self.param_groups = before
            raise
        finally:
            for name, registered in held.items():
                setattr(self, name, registered)

    def _load_copies(self, state_dict: dict[str, Any]) -> None:
        """:meth:`load_state_dict` after torch's: copies of the saved tensors, defaults, checks."""
        name, saved = type(self).__name__, state_dict["state"]
        for index, group in enumerate(state_dict["param_groups"]):
            # torch.optim.AdamW's and Adam's option of another rule, whose state (max_exp_avg_sq) would go unread
            require(not group.get("amsgrad"), f"{name}.load_state_dict: parameter group #{index} was saved with "
                                              f"amsgrad=True, which {name} does not implement")
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            for key, value in saved.get(i, {}).items():
                if isinstance(value, Tensor) and key != "step" and value.is_floating_point():
                    self.state[p][key] = value.to(device=p.device, dtype=_loaded_dtype(value.dtype, p.dtype), copy=True)
                elif key == "step" and isinstance(value, Tensor):  # torch would share it with the source
                    # a float32 count on the host, as _init_param_state makes it: torch moves it to the
                    # parameter's device for fused groups, where every step's read of it would wait for the GPU
                    self.state[p][key] = value.detach().to("cpu", torch.float32, copy=True)
                elif key == "step" and isinstance(value, (int, float)):  # as torch < 1.12 saved it
                    self.state[p][key] = torch.tensor(float(value), device="cpu")
        index = 0
        for number, group in enumerate(self.param_groups):
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            try:
                self._validate(group)
            except ValueError as err:
                raise ValueError(f"{name}.load_state_dict: saved parameter group "
                                 f"#{number}: {err}") from None
            for p in group["params"]:
                state = self.state.get(p)
                if state:
                    route = self._route(group, p)
                    needed = ("step", *engine.state_names(self._pipeline(group, route)[0]))
                    missing = [key for key in needed if key not in state]
                    require(not missing, f"{name}.load_state_dict: the saved state of parameter "
                                         f"#{index} (shape {tuple(p.shape)}) has no {', '.join(missing)}; it "
                                         f"holds {', '.join(sorted(state))}, saved by another optimizer?")
                    kept = {*needed, *self._KEPT_BETWEEN_CALLS}
                    foreign = sorted(key for key in state if key not in kept)
                    require(not foreign, f"{name}.load_state_dict: the saved state of parameter "
                                         f"#{index} (shape {tuple(p.shape)}) holds {', '.join(foreign)}, which "
                                         f"{name} does not keep for it ({', '.join(sorted(kept))}); "
                                         f"saved by another optimizer?")
                    self._check_state_shapes(group, route, p, state, index)
                index += 1

    def _check_state_shapes(self, group: dict[str, Any], route: Hashable, p: Tensor, state: dict[str, Any],
                            index: int) -> None:
        """Each loaded state tensor has the shape :meth:`_new_state` makes for ``p`` (made on the meta
        device: no memory). DTensor parameters are left to ``torch.distributed.checkpoint``, which
        places their state."""
        if distributed.is_dtensor(p):
            return
        fresh = self._new_state(group, route, torch.empty_like(p, device="meta"))
        wrong = [f"{key} of shape {tuple(state[key].shape)} (expected {tuple(made.shape)})"
                 for key, made in fresh.items() if isinstance(state.get(key), Tensor) and state[key].shape != made.shape]
        require(not wrong, f"{type(self).__name__}.load_state_dict: the saved state of parameter #{index} "
                           f"(shape {tuple(p.shape)}) has {', '.join(wrong)}; saved for another parameter, or "
                           f"are the parameters in another order?")

    def init_state(self) -> None:
        """Create every parameter's zero state now, as the first step would, without stepping.

        ``torch.distributed.checkpoint.state_dict.get_state_dict`` otherwise creates the
        state of a fresh optimizer with a fake step on zero gradients (which MARS exact
        mode refuses for want of a stashed gradient); call this before it when resuming.
        """
        for group in self.param_groups:
            for p in group["params"]:
                self._init_param_state(group, p)

    def _init_param_state(self, group: dict[str, Any], p: Tensor) -> dict[str, Any]:
        state = self.state[p]
        if "step" not in state:
            state.update(_cast_state(self._new_state(group, self._route(group, p), p), p, group.get("state_dtype")))
            state["step"] = torch.tensor(0.0, device="cpu")  # on the host, whatever the default device
        return state

    # ---- the step --------------------------------------------------------------------
    # Outside any enclosing torch.compile (``torch.compile(opt.step)``, or a compiled training
    # step): dynamo would break its graph at every host check here and re-trace the multi-tensor
    # path, while the fused path compiles its own kernels either way.
    @torch.compiler.disable
    def _update(self) -> bool:
        """Run every bucket once; returns False when a non-finite gradient made it skip.

        Nothing is written before every gradient is known to be finite. The pre-passes of the
        fused buckets (:func:`shine.engine.prepare_bucket`) only read, so they run first and
        their probes check the gradients they read; the other gradients get a check of their
        own. With ``max_grad_norm`` the norm, needed before anything else, is the check (and
        the pre-passes stay inside the steps' graphs, as with ``nonfinite="ignore"``).
        """
        name = type(self).__name__
        active = [(g, [p for p in g["params"] if p.grad is not None]) for g in self.param_groups]
        self._check_options()
        for group, ps in active:  # hyperparameters set after construction (schedulers, by hand)
            if ps:
                self._validate(group)
        for group, ps in active:
            for p in ps:
                check_grad(p.grad, name, p.dtype, p.shape)
            if group.get("state_dtype") is not None:  # a model cast after construction (model.double())
                for p in ps:
                    self._check_state_dtype(group, p)
        params = [p for _, ps in active for p in ps]
        scale = self._clip_scale(params)
        if scale is None:
            return False
        fresh = {p: set(self.state[p]) for p in params if "step" not in self.state[p]}
        probe = self.max_grad_norm is None and self.nonfinite != "ignore"  # pre-passes as the check
        try:
            runs, probed, counts = self._prepare(active, scale, probe)
        except BaseException:
            _drop_new_state(self.state, fresh)
            raise
        if probe and not self._gradients_finite(params, probed, [t for _, t in self._also_checked(params)]):
            _drop_new_state(self.state, fresh)
            return self._nonfinite_gradient(params, stacklevel=4) or False
        for count, step in counts:  # fill_: adding a number to a 0-d tensor took 3-4 times as long (1000 tensors: 3 ms)
            count.fill_(step)
        for run in runs:
            engine.run_bucket(*run)
        return True

    def _prepare(self, active: list[tuple[dict[str, Any], list[Tensor]]], scale: float, probe: bool):
        """Each group's buckets, made ready to step without writing anything but new state (the
        fused pre-passes run, as the non-finite check where ``probe``): the arguments of each
        :func:`shine.engine.run_bucket` call, the pre-passes' probes, and each parameter's step
        count with its next value."""
        runs, probed, counts = [], [], []
        for group, ps in active:
            buckets: dict[tuple, list[Tensor]] = collections.defaultdict(list)
            for p in ps:
                count = self._init_param_state(group, p)["step"]
                step = float(count) + 1
                counts.append((count, step))
                if p.numel() == 0:  # counts its step, but has nothing to update: means over its 0 rows would be NaN
                    continue
                # DTensors of one mesh and placement, or plain tensors, never mixed: they cannot share a kernel
                buckets[(self._route(group, p), p.device, p.dtype, step, distributed.layout_of(p))].append(p)
            for (route, device, _, step, _), bucket in buckets.items():
                pipe, hyper = self._pipeline(group, route)
                self._check_state_layout(group, pipe, bucket)
                hyper = {**hyper, "step": step, **_rounding(group)}
                if self.max_grad_norm is not None:
                    hyper["grad_scale"] = scale
                path = engine.choose_path(group["fused"], group["foreach"], device, sum(p.numel() for p in bucket))
                path, bucket, grads, states, shard_sums = distributed.localise(
                    path, group["fused"], pipe, bucket, [p.grad for p in bucket], [self.state[p] for p in bucket])
                if shard_sums is not None:
                    hyper["shard_sums"] = shard_sums
                prepared = engine.prepare_bucket(path, pipe, bucket, grads, states, hyper) if probe else None
                if prepared is not None:
                    probed += prepared.probes
                runs.append((path, pipe, bucket, grads, states, hyper, prepared))
        return runs, probed, counts

    def _check_state_layout(self, group: dict[str, Any], pipe: Pipeline, params: list[Tensor]) -> None:
        """Each state tensor the step reads is on its parameter's device and works in its dtype
        (fp32 for both where either is fp16/bf16): a model moved or cast after its optimizer's state
        was made (``model.double()``, ``model.to(device)``) otherwise failed inside a kernel, midway
        through the step. About 0.5 us per parameter on the CPU."""
        names = engine.state_names(pipe)
        for p in params:
            state, dtype = self.state[p], _working_dtype(p.dtype)
            for key in names:
                t = state.get(key)
                if t is None:
                    raise RuntimeError(
                        f"{type(self).__name__}: parameter #{self._index(p)} has no state {key}, which its step "
                        f"now needs: was a hyperparameter that decides the state (CAME's gamma, MARS's mars_type "
                        f"or optimize_1d) changed after the first step? Set it before the first step, or build "
                        f"a new optimizer. Nothing was changed.")
                if t.device != p.device or _working_dtype(t.dtype) != dtype:
                    raise RuntimeError(
                        f"{type(self).__name__}: parameter #{self._index(p)} ({p.dtype} on {p.device}) has its "
                        f"state {key} in {t.dtype} on {t.device}; was the model cast or moved after the optimizer "
                        f"made its state? Move it first, or load this optimizer's state_dict into a new one "
                        f"(load_state_dict places the state on each parameter's device). Nothing was changed.")

    def _index(self, p: Tensor) -> int:
        """``p``'s position among the parameters of all groups (as in ``state_dict()``), for messages."""
        return next(i for i, q in enumerate(q for g in self.param_groups for q in g["params"]) if q is p)

    def _clip_scale(self, params: list[Tensor]) -> float | None:
        """The factor the gradients enter the update with: 1.0 without ``max_grad_norm``, else the
        clip coefficient, from the global norm, which is then also the non-finite check (finite
        exactly when every element is, unless the sum of squares overflowed, which the exact
        check tells apart). ``None``: a non-finite gradient skips the step (or it raised)."""
        if self.max_grad_norm is None or not params:
            return 1.0
        grads = [p.grad for p in params]
        norm = distributed.grad_norm(grads, engine.grad_norm)
        if not math.isfinite(norm) and self.nonfinite != "ignore":
            if not distributed.grads_finite(grads, engine.grads_finite):
                return self._nonfinite_gradient(params, stacklevel=5)
            norm = distributed.grad_norm(grads, functools.partial(engine.grad_norm, dtype=torch.float64))
        self.last_grad_norm = norm
        return min(1.0, self.max_grad_norm / (norm + 1e-6))

    @staticmethod
    def _gradients_finite(params: list[Tensor], probed: list[tuple[Tensor, Tensor]], also: list[Tensor]) -> bool:
        """Whether every gradient (and every tensor of ``also``) is finite: from the
        ``(gradient, probe)`` pairs of the fused pre-passes where there are some (one host
        synchronisation), by a check of their own (:func:`shine.engine.grads_finite`) for the rest.
        A non-finite probe from finite values (overflow) is settled exactly."""
        seen = {id(g) for g, _ in probed}
        rest = [p.grad for p in params if id(p.grad) not in seen] + also
        if rest and not distributed.grads_finite(rest, engine.grads_finite):
            return False
        by_device: dict[torch.device, list[Tensor]] = collections.defaultdict(list)
        for _, probe in probed:
            by_device[probe.device].append(probe.float())
        if not all(bool(torch.stack(probes).isfinite().all()) for probes in by_device.values()):
            return engine.grads_finite([g for g, _ in probed])
        return True

    def _nonfinite_gradient(self, params: list[Tensor], stacklevel: int) -> None:
        """Skip (``nonfinite="skip"``: count, warn, return ``None``) or raise, naming the first
        parameter with a NaN/inf gradient."""
        if self.nonfinite == "skip":
            self.skipped_steps += 1
            warnings.warn(f"{type(self).__name__}: non-finite gradient, step skipped "
                          f"({self.skipped_steps} so far)", RuntimeWarning, stacklevel=stacklevel)
            return None
        checked = [(p, p.grad, "gradient") for p in params] + [(p, t, "stashed gradient (exact mode's g_prev)")
                                                             for p, t in self._also_checked(params)]
        raise RuntimeError(f"{type(self).__name__}: non-finite {self._where_nonfinite(checked)}; no state was "
                           f"changed. Pass nonfinite='skip' to skip such steps.")

    def _where_nonfinite(self, checked: list[tuple[Tensor, Tensor, str]]) -> str:
        """Which of the ``(parameter, tensor, what)`` is the first with a NaN or inf, in words; the
        processes agreed that one is, so where none is here, it is in another one's shard."""
        found = next((item for item in checked if not torch.isfinite(item[1]).all()), None)
        if found is None:
            return f"{checked[0][2] if checked else 'gradient'} (NaN or inf) in another process's shard"
        bad, _, what = found
        return f"{what} (NaN or inf) in parameter #{self._index(bad)} of shape {tuple(bad.shape)}"


def with_load_hooks(optimizer: Optimizer, state_dict: dict[str, Any], load: Callable[[dict[str, Any]], None]) -> None:
    """``load(state_dict)`` between ``optimizer``'s load-state-dict hooks, as torch's
    ``load_state_dict`` runs them: each pre-hook may return the state dict to load instead, and the
    post-hooks run once it is loaded."""
    for hook in getattr(optimizer, "_optimizer_load_state_dict_pre_hooks", {}).values():
        result = hook(optimizer, state_dict)
        if result is not None:
            state_dict = result
    load(state_dict)
    for hook in getattr(optimizer, "_optimizer_load_state_dict_post_hooks", {}).values():
        hook(optimizer)


def run_closure(closure: Callable[[], Any] | None) -> Any:
    """Evaluate a step closure with gradients enabled (``step`` itself runs under no_grad)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _drop_new_state(state: dict[Tensor, dict[str, Any]], before: dict[Tensor, set[str]]) -> None:
    """Remove the state a step created before it stopped: each parameter keeps the keys it had."""
    for p, keys in before.items():
        for key in set(state[p]) - keys:
            del state[p][key]


def _cast_state(state: dict[str, Tensor], p: Tensor, dtype: torch.dtype | None) -> dict[str, Tensor]:
    """New state with its per-element tensors (those shaped like ``p``) in ``dtype`` (``None``: as made)."""
    if dtype is None:
        return state
    return {k: v.to(dtype) if v.is_floating_point() and v.shape == p.shape else v for k, v in state.items()}


def _working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a step computes in for a tensor of ``dtype``: fp32 for fp16/bf16."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def _loaded_dtype(saved: torch.dtype, param: torch.dtype) -> torch.dtype:
    """The dtype a loaded state tensor takes: its own where the step works in the parameter's dtype
    with it (fp32 or bf16 state for fp32/bf16/fp16 parameters, the parameter's own dtype), else the
    one :func:`state_zeros` makes."""
    return saved if _working_dtype(saved) == _working_dtype(param) else _working_dtype(param)


def _rounding(group: dict[str, Any]) -> dict[str, bool]:
    """The ``stochastic_rounding`` flag the engine reads (absent when off, so old hyper dicts are unchanged)."""
    sr = group.get("stochastic_rounding")
    if sr is None:
        sr = group.get("state_dtype") == torch.bfloat16
    return {"stochastic_rounding": True} if sr else {}


def group_lr(group: dict[str, Any]) -> float:
    """A group's learning rate as a number (it may be a 0-d tensor that a scheduler fills)."""
    return float(group["lr"])
