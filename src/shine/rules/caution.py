"""Caution (Liang et al., arXiv 2411.16085): keep only the coordinates that agree with the gradient."""
import torch

from .hoist import hoist


def caution(u, g):
    """Zero ``u`` where ``u * g <= 0``; rescale by ``1 / max(mean(mask), 1e-3)``.

    The mean is over the whole tensor (a global reduction for DTensors), as in
    the official code and timm. Other libraries divide by ``numel/(kept+1)``,
    which differs on small tensors. Returns a new tensor: the caller's momentum
    state is never masked.
    """
    mask = (u * g > 0).to(torch.float32)
    # sum/numel rather than mean(): the same numbers, but on an unevenly sharded DTensor
    # a sum is one all-reduce of a scalar where mean() all-gathers the whole mask.
    return u * mask / hoist((mask.sum() / mask.numel()).clamp_min(1e-3))
