"""A compiler hint the rules use: compute a small derived tensor once per step, not per element."""
import torch
from torch import Tensor


@torch.library.custom_op("shine::hoisted", mutates_args=())
def _hoisted(t: Tensor) -> Tensor:
    return t.clone()


@_hoisted.register_fake
def _(t: Tensor) -> Tensor:
    return torch.empty_like(t)


def hoist(t):
    """``t`` itself; under ``torch.compile``, an opaque copy the compiler must compute once.

    Inductor inlines cheap expressions into every loop that reads them, so a scale
    such as ``1 / max(rms(u), 1)`` or Adafactor's row factor ``rsqrt(r / mean(r))``
    would be re-derived (square roots, divisions) in each vector block of each pass
    over the matrix. Behind this op it is computed once into a small buffer. Use it
    only on small tensors (per-tensor scalars, row/column vectors).
    """
    return torch.ops.shine.hoisted(t) if torch.compiler.is_compiling() else t
