"""Caution (Liang et al., arXiv 2411.16085): keep only the coordinates that agree with the gradient."""
import torch


def caution(u, g):
    """Zero ``u`` where ``u * g <= 0``; rescale by ``1 / max(mean(mask), 1e-3)``.

    The mean is over the whole tensor (a global reduction for DTensors), as in
    the official code and timm. Other libraries divide by ``numel/(kept+1)``,
    which differs on small tensors. Returns a new tensor: the caller's momentum
    state is never masked.
    """
    mask = (u * g > 0).to(torch.float32)
    return u * mask / mask.mean().clamp_min(1e-3)
