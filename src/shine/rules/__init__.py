"""The math of every update rule, as pure functions on tensors.

Each function takes the gradient estimate ``x`` and the state tensors it owns
(updated in place), plus hyperparameters as numbers or 0-d tensors, and returns
the update direction ``u`` (the optimizer then does ``p -= lr * u``), or a
:class:`Quotient` that stands for it until :func:`apply_update` adds it in one pass. Written
with plain tensor methods, every function runs unchanged on a single tensor
(reference path), on a :class:`shine.tensorlist.TensorList` (multi-tensor path)
and under ``torch.compile`` (fused path). Nothing here allocates state or reads
a parameter group. A full-size temporary is written in place once made (an
allocation saved on the eager paths); ``x`` and the gradient never are.

    gradient -> [estimate] -> [precondition] -> [mask] -> [apply]
                mars.py       adamw.py lion.py   caution.py  apply.py
                              came.py
                              mars.py (MARS-Lion's sign, MARS-Shampoo's
                                       newton_schulz.py orthogonalisation)

``ema.py`` holds the moving average every rule keeps.
"""
from .adamw import adamw, adamw_bias_corrections
from .apply import Quotient, apply_update, decay_factor, formed
from .came import came_factored, came_row_statistics, came_unfactored, factored_shapes
from .caution import caution, kept_fraction
from .lion import lion, next_momentum
from .mars import mars_clip, mars_correction, sign_momentum, orthogonal_momentum
from .newton_schulz import newton_schulz5

__all__ = [
    "adamw", "adamw_bias_corrections", "apply_update", "decay_factor", "formed", "Quotient", "came_factored",
    "came_row_statistics", "came_unfactored", "factored_shapes", "caution", "kept_fraction", "next_momentum", "lion",
    "mars_clip", "mars_correction", "sign_momentum", "orthogonal_momentum", "newton_schulz5",
]
