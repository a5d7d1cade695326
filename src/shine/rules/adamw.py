"""Adam's preconditioner (the "AdamW" of Loshchilov & Hutter, decay applied separately)."""
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

    The bias corrections come from :func:`adamw_bias_corrections`. The result is written into
    the one temporary (the denominator, inverted in place), so the eager paths allocate one
    tensor per step where ``exp_avg / bias_correction1 / denominator`` took two more.
    """
    ema_(exp_avg, x, 1 - beta1)
    ema_square_(exp_avg_sq, x, 1 - beta2)
    denominator = exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(eps)
    return denominator.reciprocal_().mul_(exp_avg).div_(bias_correction1)
