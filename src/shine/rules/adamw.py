"""Adam's preconditioner (the "AdamW" of Loshchilov & Hutter, decay applied separately)."""


def adamw(x, exp_avg, exp_avg_sq, *, beta1, beta2, eps, step):
    """Update the first and second moments with ``x``; return ``m_hat / (sqrt(v_hat) + eps)``."""
    exp_avg.lerp_(x, 1 - beta1)
    exp_avg_sq.lerp_(x * x, 1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    return (exp_avg / bias_correction1) / (exp_avg_sq.sqrt() / bias_correction2**0.5 + eps)
