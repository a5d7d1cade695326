"""Naive float64 references for the rules in /work/shared/ALGORITHMS.md.

Each ``*_step(p, g, state, **hp)`` function is a literal transcription of the formulas: it performs
one step on ONE tensor, reads and writes its own ``state`` dict, and returns the new parameter.
``g`` is the gradient of the objective being MINIMISED (``run`` negates it for ``maximize``).
``run`` drives a step function over a list of gradients and returns the parameter trajectory.
Nothing here is optimised: clarity over speed.
"""

import math

import torch


def caution(u, g):
    """Cautious masking (§3): keep u where u*g > 0, rescale by 1/max(mean(mask), 1e-3)."""
    mask = (u * g > 0).double()
    return u * mask / max(mask.mean().item(), 1e-3)


def adamw_step(p, g, state, *, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
               cautious=False):
    """Decoupled AdamW (appendix): p = p*(1 - lr*wd) - lr*u, u = m_hat/(sqrt(v_hat) + eps)."""
    b1, b2 = betas
    t = state["t"] = state.get("t", 0) + 1
    m = state["m"] = b1 * state.get("m", torch.zeros_like(p)) + (1 - b1) * g
    v = state["v"] = b2 * state.get("v", torch.zeros_like(p)) + (1 - b2) * g * g
    u = (m / (1 - b1**t)) / (torch.sqrt(v / (1 - b2**t)) + eps)
    if cautious:
        u = caution(u, g)
    return p * (1 - lr * weight_decay) - lr * u


def lion_step(p, g, state, *, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, cautious=False):
    """Lion (appendix): u = sign(b1*m + (1-b1)*g), p = p*(1 - lr*wd) - lr*u, then m = b2*m + (1-b2)*g."""
    b1, b2 = betas
    m = state.get("m", torch.zeros_like(p))
    u = torch.sign(b1 * m + (1 - b1) * g)
    if cautious:
        u = caution(u, g)
    state["m"] = b2 * m + (1 - b2) * g
    return p * (1 - lr * weight_decay) - lr * u


def newton_schulz(M, steps=5):
    """Quintic Newton-Schulz (§1): X = M/(||M||+1e-7), transposed when rows > cols,
    X <- a*X + b*(X X^T) X + c*(X X^T)^2 X with (a, b, c) = (3.4445, -4.7750, 2.0315)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = M / (torch.linalg.norm(M) + 1e-7)
    transposed = X.shape[0] > X.shape[1]
    if transposed:
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        X = a * X + b * (A @ X) + c * (A @ A @ X)
    return X.T if transposed else X


def mars_corrected(g, state, *, beta1, gamma, g_prev=None):
    """MARS's gradient estimate (§1): ``c = g + gamma*beta1/(1-beta1)*(g - g_prev)``, divided by
    its norm when that exceeds 1. ``g_prev=None`` is approx mode (the stored copy of the previous
    gradient); at t = 1 g_prev is 0 in both modes. Counts the steps in ``state["t"]``."""
    t = state["t"] = state.get("t", 0) + 1
    if g_prev is None:
        g_prev = state.get("g_prev", torch.zeros_like(g))
        state["g_prev"] = g.clone()
    if t == 1:
        g_prev = torch.zeros_like(g)
    c = g + gamma * beta1 / (1 - beta1) * (g - g_prev)
    norm = torch.linalg.norm(c).item()
    return c / norm if norm > 1 else c


def mars_step(p, g, state, *, lr=3e-3, betas=(0.95, 0.99), eps=1e-8, weight_decay=0.0,
              gamma=0.025, mars_type="adamw", g_prev=None, optimize_1d=False, lr_1d=3e-3,
              betas_1d=(0.9, 0.95), weight_decay_1d=0.1, lr_initial=None, ns_steps=5,
              cautious=False):
    """MARS (§1). ``g_prev=None`` is approx mode (the stored copy of the previous gradient);
    exact mode passes ``g_prev`` explicitly. At t = 1 g_prev is 0 in both modes.
    Non-2-D tensors (unless optimize_1d) take AdamW with lr_1d * lr / lr_initial, betas_1d,
    weight_decay_1d and the group eps; ``lr_initial`` is the lr at construction (default: lr)."""
    if p.ndim != 2 and not optimize_1d:
        lr_initial = lr if lr_initial is None else lr_initial
        return adamw_step(p, g, state, lr=lr_1d * lr / lr_initial, betas=betas_1d, eps=eps,
                          weight_decay=weight_decay_1d, cautious=cautious)
    b1, b2 = betas
    c = mars_corrected(g, state, beta1=b1, gamma=gamma, g_prev=g_prev)
    t = state["t"]
    m = state["m"] = b1 * state.get("m", torch.zeros_like(p)) + (1 - b1) * c
    if mars_type == "lion":
        u = torch.sign(m)
    elif mars_type == "shampoo" and p.ndim == 2:
        rows, cols = p.shape
        u = newton_schulz(m / (1 - b1), ns_steps) * math.sqrt(max(1.0, rows / cols))
    else:  # "adamw", and non-2-D tensors under "shampoo"
        v = state["v"] = b2 * state.get("v", torch.zeros_like(p)) + (1 - b2) * c * c
        u = m / ((1 - b1**t) * (torch.sqrt(v) / math.sqrt(1 - b2**t) + eps))
    if cautious:
        u = caution(u, g)
    return p - lr * (weight_decay * p + u)


def _rsqrt(x):
    return 1 / torch.sqrt(x)


def _factored_ema(state, row_key, col_key, X, beta):
    """Move the row and column EMAs state[row_key], state[col_key] towards X's row and column
    means; return their rank-1 inverse root rsqrt(row / mean(row))[:, None] * rsqrt(col)[None, :]."""
    row = state[row_key] = beta * state.get(row_key, torch.zeros(X.shape[:-1], dtype=X.dtype)) \
        + (1 - beta) * X.mean(dim=-1)
    col = state[col_key] = beta * state.get(col_key, torch.zeros(X.shape[:-2] + X.shape[-1:], dtype=X.dtype)) \
        + (1 - beta) * X.mean(dim=-2)
    return _rsqrt(row / row.mean(dim=-1, keepdim=True))[..., :, None] * _rsqrt(col)[..., None, :]


def came_step(p, g, state, *, lr, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16),
              clip_threshold=1.0, weight_decay=0.0, factor_conv="flatten", cautious=False,
              gamma=None, g_prev=None):
    """CAME (§2). Tensors with >= 2 dims are factored over their last two dims; with
    factor_conv="flatten" a tensor with ndim > 2 is first viewed as (shape[0], prod(shape[1:])),
    with "last2" it is factored over its last two dims as in the reference. 1-D and 0-d tensors
    are unfactored: u = g*rsqrt(v), upd = m, no confidence term. With a ``gamma`` (MARS-CAME,
    "Combinations"), CAME runs on MARS's estimate of every tensor's gradient; caution still
    compares with the gradient itself."""
    b1, b2, b3 = betas
    e1, e2 = eps
    grad = g
    if gamma is not None:
        g = mars_corrected(g, state, beta1=b1, gamma=gamma, g_prev=g_prev)
    if g.ndim > 2 and factor_conv == "flatten":
        g = g.reshape(g.shape[0], -1)
    factored = g.ndim >= 2
    G = g * g + e1
    if factored:
        u = g * _factored_ema(state, "r", "c", G, b2)
    else:
        v = state["v"] = b2 * state.get("v", torch.zeros_like(g)) + (1 - b2) * G
        u = g * _rsqrt(v)
    rms = torch.sqrt((u * u).mean()).item()
    u = u / max(1.0, rms / clip_threshold)
    m = state["m"] = b1 * state.get("m", torch.zeros_like(g)) + (1 - b1) * u
    if factored:
        U = (u - m) ** 2 + e2
        upd = m * _factored_ema(state, "R", "C", U, b3)
    else:
        upd = m.clone()
    upd = upd.reshape(p.shape)
    if cautious:
        upd = caution(upd, grad)
    p = p - lr * weight_decay * p
    return p - lr * upd


def cautious_wrapper_step(p, g, state, *, inner_step, **hp):
    """The Cautious(inner) wrapper: d = p_old - inner_step(p_old) (weight decay included),
    p = p_old - caution(d, g); the inner state is never masked."""
    d = p - inner_step(p, g, state, **hp)
    return p - caution(d, g)


def run(step, p0, grads, *, maximize=False, lrs=None, g_prevs=None, round_to=None, **hp):
    """Simulate len(grads) steps of ``step`` from p0 in float64 and return [p_1, ..., p_N].

    ``lrs``: per-step lr (overrides hp["lr"]); ``g_prevs[t]``: exact-MARS g_prev of step t+1;
    ``maximize`` negates every gradient; ``round_to`` rounds p to that dtype after each step
    (simulating a low-precision parameter with fp32 state)."""
    sign = -1.0 if maximize else 1.0
    p, state, trajectory = p0.double().clone(), {}, []
    for t, g in enumerate(grads):
        kw = dict(hp)
        if lrs is not None:
            kw["lr"] = lrs[t]
        if g_prevs is not None:
            kw["g_prev"] = sign * g_prevs[t].double()
        p = step(p, sign * g.double(), state, **kw)
        if round_to is not None:
            p = p.to(round_to).double()
        trajectory.append(p)
    return trajectory
