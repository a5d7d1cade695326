"""The fused path (fused=True, torch.compile) against the references, on a few representative
cases (compiling costs seconds per case on CPU)."""

import pytest
import torch
from torch._dynamo.utils import counters

import shine

from .support import DTYPES, assert_fp32_state, assert_trajectories_close, problem
from .cases import CASES, run_reference, run_shine

pytestmark = pytest.mark.usefixtures("fused_in_pairs")  # groups of two (tests/conftest.py)

# Between them: the MARS correction, Adam (2-D and the 1-D route), caution, Newton-Schulz, maximize,
# factored and unfactored CAME (also MARS-corrected), and bf16 parameters in a mixed group.
FUSED_CASES = {"mars-adamw-cautious": "mixed", "mars-shampoo-maximize": "fp32", "came-wd": "mixed",
               "mars-came-cautious": "mixed"}


@pytest.fixture
def fresh_compiler():
    """Skip without a working torch.compile; reset dynamo so that every case really compiles
    (shine's compiled step shares one code object, whose recompile limit would otherwise be hit)."""
    if not shine.engine.compiler_available("cpu"):
        pytest.skip("torch.compile unavailable")
    torch._dynamo.reset()
    counters.clear()


@pytest.mark.parametrize("optimizer, step, hp, grad_scale", [c for c in CASES if c.id in FUSED_CASES],
                         ids=[c.id for c in CASES if c.id in FUSED_CASES])
def test_fused_matches_reference(optimizer, step, hp, grad_scale, request, fresh_compiler):
    """fused=True follows the reference with the same tolerances as the other paths."""
    dtypes = DTYPES[FUSED_CASES[request.node.callspec.id]]
    params0, grads = problem(dtypes, grad_scale=grad_scale)
    opt, actual = run_shine(optimizer, hp, params0, grads, fused=True)
    assert counters["stats"]["unique_graphs"] > 0, "fused=True did not compile"
    expected = run_reference(step, hp, params0, grads)
    assert_trajectories_close(actual, expected, dtypes, what="fused vs reference")
    assert_fp32_state(opt)
