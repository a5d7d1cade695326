"""Adam's preconditioner (the "AdamW" of Loshchilov & Hutter, decay applied separately)."""
from .apply import Quotient
from .ema import ema_, ema_square_


def adamw_bias_corrections(hyper):
    """``1 - beta1^t`` and ``sqrt(1 - beta2^t)``: scalar math done once per step on the host.

    Kept out of the tensor math so a compiled kernel never recomputes ``pow``
    per element block (inductor does not hoist it; that tripled the fused step time).
    """
    return {"bias_correction1": 1 - hyper["beta1"] ** hyper["step"],
            "bias_correction2_sqrt": (1 - hyper["beta2"] ** hyper["step"]) ** 0.5}


def adamw(x, exp_avg, exp_avg_sq, *, beta1, beta2, eps, bias_correction1, bias_correction2_sqrt):
    """Update the first and second moments with ``x``; return ``m_hat / (sqrt(v_hat) + eps)``.

    The bias corrections come from :func:`adamw_bias_corrections`. The direction is returned
    as a :class:`~shine.rules.apply.Quotient`, ``m / (sqrt(v) + eps * c2) * (c2 / c1)``, the
    same number with the corrections moved out of the element-wise math (as torch's AdamW
    does): on the eager paths its one full-size temporary is the denominator, and the step
    adds the quotient to the parameter in one pass (:func:`~shine.rules.apply_update`).
    """
    ema_(exp_avg, x, 1 - beta1)
    ema_square_(exp_avg_sq, x, 1 - beta2)
    denominator = exp_avg_sq.sqrt().add_(eps * bias_correction2_sqrt)
    return Quotient(exp_avg, denominator, bias_correction2_sqrt / bias_correction1)
