"""A compiler hint the rules use: compute a small derived tensor once per step, not per element."""
import torch

# Declared with the low-level library API rather than ``torch.library.custom_op``: inductor
# cannot look inside the op (the point), so every compiled step calls it through the
# dispatcher, and custom_op's autograd wrapper made each call cost 17 us against 5 here
# (CAME calls it five times per tensor and step).
_LIB = torch.library.Library("shine", "DEF")
_LIB.define("hoisted(Tensor t) -> Tensor")
_LIB.impl("hoisted", lambda t: t.clone(), "CompositeExplicitAutograd")
torch.library.register_fake("shine::hoisted", lambda t: torch.empty_like(t), lib=_LIB)


def hoist(t):
    """``t`` itself; under ``torch.compile``, an opaque copy the compiler must compute once.

    Inductor inlines cheap expressions into every loop that reads them, so a scale
    such as ``1 / max(rms(u), 1)`` or Adafactor's row factor ``rsqrt(r / mean(r))``
    would be re-derived (square roots, divisions) in each vector block of each pass
    over the matrix. Behind this op it is computed once into a small buffer. Use it
    only on small tensors (per-tensor scalars, row/column vectors).
    """
    return torch.ops.shine.hoisted(t) if torch.compiler.is_compiling() else t
