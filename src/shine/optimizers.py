"""The optimizers users construct: thin shells that validate hyperparameters and route parameters.

Every update goes through :mod:`shine.engine` and the pure math of :mod:`shine.rules`.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from . import distributed, engine, rules
from .base import ShineOptimizer, group_lr, run_closure, state_zeros
from .engine import Pipeline
from .validation import (LOW_PRECISION, check_betas, check_choice, check_eps, check_finite_nonneg, check_lr,
                         is_number, plain_values, require)

_COMMON_DOC = """
        cautious: mask the update where it disagrees in sign with the gradient
            (Cautious optimizers, arXiv 2411.16085); weight decay is not masked.
        maximize: maximize the objective instead of minimizing it.
        foreach, fused, nonfinite, state_dtype, stochastic_rounding, max_grad_norm: execution
            path, NaN/inf handling, state precision and gradient clipping, see
            :class:`shine.base.ShineOptimizer`.
"""


def _common(cautious: bool, maximize: bool) -> dict[str, Any]:
    """The group keys every optimizer has (checked with the group, :meth:`ShineOptimizer._validate`)."""
    return {"cautious": cautious, "maximize": maximize}


def _check_lr_wd(group: dict[str, Any], positive_lr: bool = False) -> None:
    check_lr(group["lr"], positive=positive_lr)
    check_finite_nonneg("weight_decay", group["weight_decay"])


def _lr_and_decay(group: dict[str, Any]) -> dict[str, float]:
    """The step's ``lr`` (a number) and the decoupled weight decay's factor ``1 - lr * wd``."""
    lr = group_lr(group)
    return {"lr": lr, "decay": rules.decay_factor(lr, group["weight_decay"])}


def _flags(group: dict[str, Any], correction: bool = False) -> dict[str, Any]:
    """The :class:`Pipeline` flags a group sets: caution, maximize, and whether the MARS correction
    runs (then in the group's exact or approximate mode)."""
    flags = {"cautious": group["cautious"], "maximize": group["maximize"]}
    return {**flags, "correction": True, "approx": group["approx"]} if correction else flags


def _adam_pipeline(flags: dict[str, Any]) -> Pipeline:
    return Pipeline(rules.adamw, ("exp_avg", "exp_avg_sq"),
                    ("beta1", "beta2", "eps", "bias_correction1", "bias_correction2_sqrt"),
                    scalars=rules.adamw_bias_corrections, direction_sign=rules.next_momentum, **flags)


class AdamW(ShineOptimizer):
    __doc__ = f"""AdamW (decoupled weight decay); with ``cautious=True`` it is C-AdamW.

    ``u = m_hat / (sqrt(v_hat) + eps)``; ``p = p * (1 - lr*wd) - lr*u``. Defaults as torch.optim.AdamW.

    Args:
        params: parameters or parameter groups.
        lr, betas, eps, weight_decay: as in torch.optim.AdamW.
        amsgrad, capturable, differentiable: torch.optim.AdamW's, taken at their default
            (``False``) so that its keyword arguments build this one; ``True`` is an error.{_COMMON_DOC}"""

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, cautious: bool = False, maximize: bool = False,
                 foreach: bool | None = None, fused: bool | None = None, nonfinite: str = "raise",
                 state_dtype: torch.dtype | None = None, stochastic_rounding: bool | None = None,
                 max_grad_norm: float | None = None, capturable: bool = False, differentiable: bool = False):
        for name, value, why in (("amsgrad", amsgrad, "AMSGrad is not implemented"),
                                 ("capturable", capturable, "steps capturable in CUDA graphs are not implemented"),
                                 ("differentiable", differentiable, "the step is not differentiable")):
            require(not value, f"Invalid {name}: {value!r} (shine.AdamW takes torch.optim.AdamW's {name} "
                                    f"only at its default False: {why})")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **_common(cautious, maximize))
        super().__init__(params, defaults, foreach=foreach, fused=fused, nonfinite=nonfinite,
                         state_dtype=state_dtype, stochastic_rounding=stochastic_rounding, max_grad_norm=max_grad_norm)

    def _check_group(self, group):
        _check_lr_wd(group)
        check_betas("betas", group["betas"], 2)
        check_eps("eps", group["eps"])

    _ELEMENTWISE_RULE = True

    def _route(self, group, p):
        return "adamw"

    def _new_state(self, group, route, p):
        return {"exp_avg": state_zeros(p), "exp_avg_sq": state_zeros(p)}

    def _pipeline(self, group, route):
        beta1, beta2 = group["betas"]
        return _adam_pipeline(_flags(group)), dict(**_lr_and_decay(group),
                                           beta1=beta1, beta2=beta2, eps=group["eps"])


class Lion(ShineOptimizer):
    __doc__ = f"""Lion (arXiv 2302.06675); with ``cautious=True`` it is C-Lion.

    ``u = sign(beta1*m + (1-beta1)*g)``; ``p = p * (1 - lr*wd) - lr*u``; then
    ``m = beta2*m + (1-beta2)*g``. Use an lr 3-10x smaller than AdamW's and a
    weight decay 3-10x larger. The C-Lion paper uses betas (0.95, 0.98).

    Args:
        params: parameters or parameter groups.
        lr, betas, weight_decay: as in the Lion paper.{_COMMON_DOC}"""

    def __init__(self, params: Any, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, cautious: bool = False, maximize: bool = False,
                 foreach: bool | None = None, fused: bool | None = None, nonfinite: str = "raise",
                 state_dtype: torch.dtype | None = None, stochastic_rounding: bool | None = None,
                 max_grad_norm: float | None = None):
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, **_common(cautious, maximize))
        super().__init__(params, defaults, foreach=foreach, fused=fused, nonfinite=nonfinite,
                         state_dtype=state_dtype, stochastic_rounding=stochastic_rounding, max_grad_norm=max_grad_norm)

    def _check_group(self, group):
        _check_lr_wd(group)
        check_betas("betas", group["betas"], 2)

    _ELEMENTWISE_RULE = True

    def _route(self, group, p):
        return "lion"

    def _new_state(self, group, route, p):
        return {"exp_avg": state_zeros(p)}

    def _pipeline(self, group, route):
        beta1, beta2 = group["betas"]
        pipe = Pipeline(rules.lion, ("exp_avg",), ("beta1", "beta2"), direction_sign=rules.next_momentum,
                        **_flags(group))
        return pipe, dict(**_lr_and_decay(group),
                          beta1=beta1, beta2=beta2)


MARS_TYPES = ("adamw", "lion", "shampoo")


class _VarianceReduced(ShineOptimizer):
    """The MARS gradient correction's bookkeeping, for optimizers some of whose parameters take it
    (:meth:`_corrected`): the exact mode's ``stash_grad`` and ``step(closure, next_closure=...)``.
    Approximate mode needs nothing here: the pipeline copies each gradient into ``prev_grad``."""

    _KEPT_BETWEEN_CALLS = ("next_prev_grad",)

    def _corrected(self, group: dict[str, Any], p: Tensor) -> bool:
        raise NotImplementedError

    def _check_exact(self, group: dict[str, Any]) -> None:
        require(isinstance(group["approx"], bool), f"Invalid approx: {group['approx']!r} (expected a bool)")
        require(group["approx"] or self.max_grad_norm is None,
                "Invalid max_grad_norm with approx=False: exact mode's stashed gradient would not be clipped "
                "with the current one; clip both with torch.nn.utils.clip_grad_norm_ before stash_grad() and step()")

    def _exact_params(self) -> list[Tensor]:
        return [p for g in self.param_groups if not g["approx"] for p in g["params"]
                if p.grad is not None and self._corrected(g, p)]

    @torch.no_grad()
    def stash_grad(self, scaler: Any = None) -> None:
        """Exact mode: record each ``p.grad`` (a copy) as the ``g_prev`` of the NEXT step.

        ``scaler``: the ``torch.amp.GradScaler`` that scaled the loss of this backward pass; the
        copy is unscaled by its current scale (``scaler.step`` unscales only the gradients of the
        step, and a scaled ``g_prev`` made ``g - g_prev`` mix two scales). A stashed gradient that
        is not finite (the backward pass overflowed) is caught by the non-finite check of the step
        that uses it (``nonfinite="skip"``: the step is skipped), or, with ``nonfinite="raise"``,
        here: nothing is then stashed, and the previous call's stash stays."""
        name = type(self).__name__
        if all(g["approx"] for g in self.param_groups):
            raise RuntimeError(f"{name}.stash_grad() is for exact mode only (construct with approx=False)")
        scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else 1.0
        groups = {id(p): g for g in self.param_groups for p in g["params"]}
        stashed = []
        for p in self._exact_params():
            g = p.grad.float() if p.grad.dtype in LOW_PRECISION else p.grad.clone()
            if scale != 1.0:
                g.div_(scale)
            stashed.append((p, g.neg_() if groups[id(p)]["maximize"] else g))
        if self.nonfinite == "raise":
            if not distributed.grads_finite([g for _, g in stashed], engine.grads_finite):
                where = self._where_nonfinite([(p, g, "gradient") for p, g in stashed])
                raise RuntimeError(f"{name}.stash_grad(): non-finite {where}; nothing was stashed (the previous "
                                   f"stash stays). Recompute it, or pass nonfinite='skip' to skip the step that "
                                   f"would use it.")
            checked = self.__dict__.setdefault("_checked_stashes", WeakIdKeyDictionary())
            for _, g in stashed:
                checked[g] = True
        for p, g in stashed:
            self.state[p]["next_prev_grad"] = g

    def _also_checked(self, params: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """Exact mode's ``g_prev`` of this step (a stashed gradient), checked with the gradients,
        unless ``stash_grad`` checked it (``nonfinite="raise"``: a second read, and a second
        synchronisation, for nothing). Those it checked are held weakly: a loaded one is checked."""
        exact = {id(p) for p in self._exact_params()}
        checked = self.__dict__.get("_checked_stashes", {})
        return [(p, t) for p in params if id(p) in exact
                and (t := self.state[p].get("prev_grad")) is not None and t not in checked]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None,
             next_closure: Callable[[], Any] | None = None) -> Any:
        """One step. In exact mode, ``next_closure`` (optional) computes the next batch's gradient first."""
        name = type(self).__name__
        if next_closure is not None:
            require(closure is not None, f"{name}.step(next_closure=...) also needs closure (the current batch)")
            run_closure(next_closure)
            self.stash_grad()
        loss = run_closure(closure)
        for group in self.param_groups:  # before _exact_params reads approx (the step checks the rest)
            self._check_exact(group)
        exact = self._exact_params()
        missing = [p for p in exact if "next_prev_grad" not in self.state[p]]
        if missing:
            raise RuntimeError(f"{name} exact mode (approx=False): {len(missing)} parameter(s) have no stashed "
                               "gradient. Each iteration, compute the NEXT batch's gradient and call "
                               "opt.stash_grad() before the current batch's backward and opt.step() "
                               "(or pass next_closure=...). Resuming with torch.distributed.checkpoint? "
                               "Call opt.init_state() before get_state_dict(), which otherwise steps once.")
        self._update()
        # also after a skipped step (nonfinite="skip"), whose parameters are those the stash was taken
        # at: it is the next step's g_prev (the skipped step's own, maybe the non-finite one, is done with)
        for p in exact:
            self.state[p]["prev_grad"] = self.state[p].pop("next_prev_grad")
        return loss


class MARS(_VarianceReduced):
    __doc__ = f"""MARS (arXiv 2411.10438): variance-reduced, preconditioned momentum.

    For 2-D parameters (all parameters with ``optimize_1d=True``)::

        c = g + gamma * beta1/(1-beta1) * (g - g_prev);  c = c / max(||c||, 1)
        m = beta1*m + (1-beta1)*c
        u = m_hat/(sqrt(v_hat)+eps)          (mars_type="adamw", v from c)
            sign(m)                          (mars_type="lion")
            NS5(m/(1-beta1)) * sqrt(max(1, rows/cols))   (mars_type="shampoo")
        p = p - lr * (wd*p + u)

    Other parameters (biases, norms, conv kernels) take plain AdamW with the lr
    ``lr * lr_1d / lr_at_construction``, ``betas_1d``, ``weight_decay_1d`` and no correction, as
    the reference does: ``lr`` is the group's lr now and ``lr_at_construction`` the lr given to
    the constructor (the reference's ``lr_1d / lr`` factor), so a schedule, or a group's own lr,
    scales both; a group that sets its own ``lr_1d`` has it relative to its own first lr.

    Approximate mode (``approx=True``, default, the paper's headline setting):
    ``g_prev`` is a copy of the previous step's gradient.

    Exact mode (``approx=False``): ``g_prev`` is the CURRENT mini-batch's gradient at
    the PREVIOUS parameters, which costs a second backward pass per step::

        for batch, next_batch in pairs:               # next_batch: the one after batch
            opt.zero_grad(); loss_fn(next_batch).backward(); opt.stash_grad()
            opt.zero_grad(); loss_fn(batch).backward(); opt.step()

    or, equivalently, ``opt.step(closure, next_closure=...)`` with closures that
    zero the gradients, run backward and return the loss. ``stash_grad`` records
    the gradient of the next batch at the current parameters; ``step`` uses the
    stash of the previous iteration (zero at step 1). A global gradient-norm clip
    before ``stash_grad``/``step`` clips ``g_prev`` too, as in the reference recipes.

    Args:
        params: parameters or parameter groups.
        lr, betas, eps, weight_decay: reference defaults 3e-3, (0.95, 0.99), 1e-8, 0.
        gamma: strength of the variance-reduction term (0 turns MARS into its base optimizer
            on clipped gradients).
        mars_type: "adamw", "lion" or "shampoo" ("mars-" prefix accepted).
        approx: approximate (one gradient per step) or exact mode.
        optimize_1d: use MARS for every parameter, not only 2-D ones.
        lr_1d, betas_1d, weight_decay_1d: the AdamW of the other parameters.
        ns_steps: Newton–Schulz iterations for "shampoo".
        ns_dtype: dtype of the Newton–Schulz arithmetic (None: float32; the reference uses bfloat16).{_COMMON_DOC}"""

    def __init__(self, params: Any, lr: float = 3e-3, betas: tuple[float, float] = (0.95, 0.99), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, gamma: float = 0.025, mars_type: str = "adamw", approx: bool = True,
                 optimize_1d: bool = False, lr_1d: float = 3e-3, betas_1d: tuple[float, float] = (0.9, 0.95),
                 weight_decay_1d: float = 0.1, ns_steps: int = 5, ns_dtype: torch.dtype | None = None,
                 cautious: bool = False, maximize: bool = False, foreach: bool | None = None,
                 fused: bool | None = None, nonfinite: str = "raise",
                 state_dtype: torch.dtype | None = None, stochastic_rounding: bool | None = None,
                 max_grad_norm: float | None = None):
        if isinstance(mars_type, str) and mars_type.startswith("mars-"):
            mars_type = mars_type[len("mars-"):]
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, gamma=gamma, mars_type=mars_type,
                        approx=approx, optimize_1d=optimize_1d, lr_1d=lr_1d, betas_1d=betas_1d,
                        weight_decay_1d=weight_decay_1d, ns_steps=ns_steps, ns_dtype=ns_dtype,
                        **_common(cautious, maximize))
        super().__init__(params, defaults, foreach=foreach, fused=fused, nonfinite=nonfinite,
                         state_dtype=state_dtype, stochastic_rounding=stochastic_rounding, max_grad_norm=max_grad_norm)

    def _check_group(self, group):
        # > 0 when the group is added (the 1-D lr follows lr / its first value); a scheduler may
        # take it to 0 later
        _check_lr_wd(group, positive_lr="lr_at_construction" not in group)
        check_betas("betas", group["betas"], 2)
        check_eps("eps", group["eps"])
        check_finite_nonneg("gamma", group["gamma"])
        require(group["mars_type"] != "came",
                "Invalid mars_type: 'came' (MARS-CAME is shine.CAME(..., gamma=0.025), or create_optimizer's 'mars-came')")
        check_choice("mars_type", group["mars_type"], MARS_TYPES)
        check_finite_nonneg("lr_1d", group["lr_1d"])
        check_betas("betas_1d", group["betas_1d"], 2)
        check_finite_nonneg("weight_decay_1d", group["weight_decay_1d"])
        require(is_number(group["ns_steps"]) and isinstance(group["ns_steps"], int) and group["ns_steps"] >= 1,
                f"Invalid ns_steps: {group['ns_steps']!r} (expected an int >= 1)")
        require(isinstance(group["optimize_1d"], bool),
                f"Invalid optimize_1d: {group['optimize_1d']!r} (expected a bool)")
        check_choice("ns_dtype", group["ns_dtype"], NS_DTYPES)
        self._check_exact(group)
        group.setdefault("lr_at_construction", group_lr(group))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Also: the lr that the group's ``lr_1d`` is relative to (``lr_at_construction``): the
        constructor's, as in the reference, unless the group sets its own ``lr_1d``, which is then
        relative to its own first lr (the check of the group sets that)."""
        if "lr_1d" not in param_group:
            plain_values(self.defaults)
            check_lr(self.defaults["lr"])
            require(group_lr(self.defaults) > 0, f"Invalid lr: {self.defaults['lr']!r} (MARS needs the "
                                                 f"constructor's lr > 0: the other parameters' lr is lr * lr_1d / it)")
            param_group = {"lr_at_construction": group_lr(self.defaults), **param_group}
        super().add_param_group(param_group)

    def _corrected(self, group, p):
        return self._route(group, p) != "adamw_1d"

    def _route(self, group, p):
        if not (p.ndim == 2 or group["optimize_1d"]):
            return "adamw_1d"
        if group["mars_type"] == "shampoo" and p.ndim != 2:
            return "mars_adamw"
        return "mars_" + group["mars_type"]

    def _new_state(self, group, route, p):
        state = {"exp_avg": state_zeros(p)}
        if route in ("mars_adamw", "adamw_1d"):
            state["exp_avg_sq"] = state_zeros(p)
        if route != "adamw_1d":
            state["prev_grad"] = state_zeros(p)
        return state

    def _pipeline(self, group, route):
        lr, (beta1, beta2) = group_lr(group), group["betas"]
        if route == "adamw_1d":
            lr_1d = lr * group["lr_1d"] / group["lr_at_construction"]
            beta1_1d, beta2_1d = group["betas_1d"]
            decay = rules.decay_factor(lr_1d, group["weight_decay_1d"])
            return _adam_pipeline(_flags(group)), dict(lr=lr_1d, decay=decay, beta1=beta1_1d, beta2=beta2_1d,
                                                       eps=group["eps"])
        flags = _flags(group, correction=True)
        if route == "mars_adamw":
            pipe = _adam_pipeline(flags)
        elif route == "mars_lion":
            pipe = Pipeline(rules.sign_momentum, ("exp_avg",), ("beta1",), direction_sign=rules.next_momentum, **flags)
        else:
            pipe = Pipeline(rules.orthogonal_momentum, ("exp_avg",), ("beta1", "ns_steps", "ns_dtype"), **flags)
        return pipe, dict(**_lr_and_decay(group), beta1=beta1, beta2=beta2,
                          eps=group["eps"], gamma=group["gamma"], ns_steps=group["ns_steps"],
                          ns_dtype=group["ns_dtype"])

CONV_FACTORING = ("flatten", "last2")
#: The dtypes MARS-Shampoo's Newton–Schulz iteration may run in (``None``: float32).
NS_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16, torch.float64)


class CAME(_VarianceReduced):
    __doc__ = f"""CAME (arXiv 2307.02047): Adam-level results with Adafactor-sized second moments.

    A matrix ``n x m`` keeps its momentum plus factored second-moment and
    confidence statistics: ``n*m + 2(n+m)`` numbers (Adam: ``2nm``). Vectors use
    an unfactored second moment and no confidence term. No bias correction, as in
    the reference, so the first steps are large (step 1 is about
    ``(1-b1)/(b1*sqrt(1-b3))`` times Adam's with the defaults): use warmup.
    Recommended lr: 0.5-0.9x the AdamW lr; ``betas[2] > betas[1]``.

    MARS-CAME: with a ``gamma`` (MARS: 0.025), every parameter's gradient is first corrected
    as in :class:`MARS`, ``c = g + gamma*b1/(1-b1)*(g - g_prev)`` clipped to norm 1, and CAME
    runs on ``c``. ``g_prev`` is a copy of the previous gradient (``approx=True``) or, with
    ``approx=False``, the current batch's gradient at the previous parameters, given through
    ``stash_grad()`` or ``step(closure, next_closure=...)`` as for :class:`MARS`. It costs one
    more parameter-sized state tensor (``prev_grad``).

    Args:
        params: parameters or parameter groups.
        lr: required.
        betas: (b1, b2, b3) for momentum, second moment, confidence; reference (0.9, 0.999, 0.9999).
        eps: (eps1, eps2) added to g^2 and to the squared instability; reference (1e-30, 1e-16).
        clip_threshold: RMS bound of the normalised update (1.0).
        weight_decay: decoupled, ``p -= lr*wd*p`` before the update.
        factor_conv: tensors with more than 2 dims are factored as ``(shape[0], rest)``
            with "flatten" (default; state n*m + 2(n+m) against Adam's 2nm for an n x m view, smaller
            where n*m > 2(n+m): all conv kernels but those of 1 or 2 output channels and a few
            tiny ones, such as 4x3x1x1) or over
            their last two dims with "last2" (the reference).
        gamma: strength of the MARS correction; ``None`` (default): none, CAME as published.
        approx: with a ``gamma``, MARS's approximate (default) or exact mode.{_COMMON_DOC}"""

    def __init__(self, params: Any, lr: float | None = None, betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
                 eps: tuple[float, float] = (1e-30, 1e-16), clip_threshold: float = 1.0, weight_decay: float = 0.0, *,
                 factor_conv: str = "flatten", gamma: float | None = None, approx: bool = True,
                 cautious: bool = False, maximize: bool = False,
                 foreach: bool | None = None, fused: bool | None = None, nonfinite: str = "raise",
                 state_dtype: torch.dtype | None = None, stochastic_rounding: bool | None = None,
                 max_grad_norm: float | None = None):
        require(lr is not None, "CAME needs an explicit lr (recommended: 0.5-0.9x your AdamW lr)")
        defaults = dict(lr=lr, betas=betas, eps=eps, clip_threshold=clip_threshold, weight_decay=weight_decay,
                        factor_conv=factor_conv, gamma=gamma, approx=approx, **_common(cautious, maximize))
        super().__init__(params, defaults, foreach=foreach, fused=fused, nonfinite=nonfinite,
                         state_dtype=state_dtype, stochastic_rounding=stochastic_rounding, max_grad_norm=max_grad_norm)

    def _check_group(self, group):
        _check_lr_wd(group)
        check_betas("betas", group["betas"], 3)
        eps = group["eps"]
        require(isinstance(eps, (tuple, list)) and len(eps) == 2, f"Invalid eps: {eps!r} (expected (eps1, eps2))")
        check_eps("eps[0]", eps[0])
        check_eps("eps[1]", eps[1])
        check_finite_nonneg("clip_threshold", group["clip_threshold"], positive=True)
        check_choice("factor_conv", group["factor_conv"], CONV_FACTORING)
        if group["gamma"] is not None:
            check_finite_nonneg("gamma", group["gamma"])
        self._check_exact(group)
        require(group["approx"] or group["gamma"] is not None,
                "Invalid approx=False without gamma: the exact mode is that of the MARS correction, "
                "which a gamma turns on (MARS: 0.025)")

    def _corrected(self, group, p):
        return group["gamma"] is not None

    def _check_layout(self, group, p):
        """Also: a DTensor parameter must allow the factored view (a conv kernel as ``(out, rest)``
        with ``factor_conv="flatten"``): DTensor cannot flatten dims split unevenly over ranks
        (tensor parallelism's ``Shard(1)`` of a ``[3, 5, 2]`` kernel on 2 ranks), which failed in
        the first step, inside DTensor."""
        super()._check_layout(group, p)
        view = self._factored_view(group, p)
        if view is None or not distributed.is_dtensor(p):
            return
        try:
            p.detach().reshape(view)
        except RuntimeError as err:
            raise ValueError(
                f"CAME factors the parameter of shape {tuple(p.shape)} as {view} (factor_conv="
                f"{group['factor_conv']!r}), a view its DTensor layout {tuple(p.placements)} does not allow "
                f"({str(err).splitlines()[0]}). Pass factor_conv='last2' (factor over its last two dims), "
                "or shard it along dim 0.") from err

    def _check_state_layout(self, group, pipe, params):
        """Also: the row state of a tensor of more than 2 dims has the shape ``factor_conv`` gives
        (the rule reads the factoring off the state, so a ``factor_conv`` changed after the first
        step had been ignored)."""
        super()._check_state_layout(group, pipe, params)
        for p in params:
            row = self.state[p].get("exp_avg_sq_row") if p.ndim > 2 else None
            if row is not None and tuple(row.shape) != self._factored_view(group, p)[:-1]:
                raise RuntimeError(
                    f"CAME: parameter #{self._index(p)} of shape {tuple(p.shape)} has state factored otherwise than "
                    f"factor_conv={group['factor_conv']!r} factors it (row state {tuple(row.shape)}): was factor_conv "
                    f"changed after the first step? Set it before the first step, or build a new optimizer. "
                    f"Nothing was changed.")

    @staticmethod
    def _factored_view(group, p):
        """The rule's view of ``p``'s gradient, the matrix (or stack) whose row and column means it
        keeps (row = mean over -1, col = mean over -2); ``None`` for a tensor it does not factor."""
        shapes = rules.factored_shapes(p.shape, group["factor_conv"])
        return None if shapes is None else (*shapes[0], shapes[1][-1])

    def _route(self, group, p):
        return "unfactored" if self._factored_view(group, p) is None else "factored"

    def _new_state(self, group, route, p):
        correction = {"prev_grad": state_zeros(p)} if group["gamma"] is not None else {}
        if route == "unfactored":
            return {"exp_avg": state_zeros(p), "exp_avg_sq": state_zeros(p), **correction}
        view = self._factored_view(group, p)
        # contiguous: the rule views the momentum as the factored matrix (p may be channels-last)
        return {"exp_avg": state_zeros(p, memory_format=torch.contiguous_format),
                "exp_avg_sq_row": state_zeros(p, reduce=(view, -1)),
                "exp_avg_sq_col": state_zeros(p, reduce=(view, -2)),
                "exp_avg_res_row": state_zeros(p, reduce=(view, -1)),
                "exp_avg_res_col": state_zeros(p, reduce=(view, -2)), **correction}

    def _pipeline(self, group, route):
        beta1, beta2, beta3 = group["betas"]
        flags = _flags(group, correction=group["gamma"] is not None)
        if route == "unfactored":
            pipe = Pipeline(rules.came_unfactored, ("exp_avg", "exp_avg_sq"),
                            ("beta1", "beta2", "eps1", "clip_threshold"), **flags)
        else:
            pipe = Pipeline(rules.came_factored, ("exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_res_row",
                                                  "exp_avg_res_col"),
                            ("beta1", "beta2", "beta3", "eps1", "eps2", "clip_threshold"),
                            statistics=rules.came_row_statistics, **flags)
        return pipe, dict(**_lr_and_decay(group), beta1=beta1,
                          beta2=beta2, beta3=beta3, eps1=group["eps"][0], eps2=group["eps"][1],
                          clip_threshold=group["clip_threshold"], gamma=group["gamma"])
