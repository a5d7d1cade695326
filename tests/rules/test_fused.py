"""The fused path (fused=True, torch.compile) against the references, on a few representative
cases (compiling costs seconds per case on CPU)."""

import pytest
import torch
from torch._dynamo.utils import counters

import shine

from .support import DTYPES, assert_fp32_state, assert_trajectories_close, problem
from .cases import CASES, run_reference, run_shine

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


# Buckets by pipeline (MARS's matrices and Adam's vectors, factored and unfactored CAME) and dtype.
BUCKET_CASES = {"mars-adamw-cautious": "mixed", "came-wd": "fp32"}


@pytest.mark.parametrize("optimizer, step, hp, grad_scale", [c for c in CASES if c.id in BUCKET_CASES],
                         ids=[c.id for c in CASES if c.id in BUCKET_CASES])
def test_bucket_fused_matches_reference_and_never_recompiles(optimizer, step, hp, grad_scale, request,
                                                             fresh_compiler, monkeypatch):
    """With the device in ``engine.BUCKET_FUSED_DEVICES`` a bucket is one compiled call for all its
    tensors: it follows the reference while the lr changes every step, compiles one graph per
    bucket at the first step, and nothing after it."""
    monkeypatch.setattr(shine.engine, "BUCKET_FUSED_DEVICES", frozenset({"cpu"}))
    called = []
    call = shine.engine._call_compiled
    monkeypatch.setattr(shine.engine, "_call_compiled", lambda fn, *a, **k: called.append(fn.__name__) or call(fn, *a, **k))
    dtypes = DTYPES[BUCKET_CASES[request.node.callspec.id]]
    params0, grads = problem(dtypes, grad_scale=grad_scale)
    after_first = {}

    def first_step(opt):
        after_first["graphs"] = counters["stats"]["unique_graphs"]
        after_first["called"] = list(called)
        after_first["buckets"] = {(opt._route(opt.param_groups[0], p), p.dtype)  # (pipeline, dtype)
                                  for group in opt.param_groups for p in group["params"]}

    opt, actual = run_shine(optimizer, hp, params0, grads, on_first_step=first_step, fused=True)
    graphs, buckets = after_first["graphs"], after_first["buckets"]
    assert graphs == len(buckets), (graphs, buckets)
    # one call per bucket, no pre-pass call
    assert after_first["called"] == ["fused_bucket_step"] * len(buckets), after_first["called"]
    assert counters["stats"]["unique_graphs"] == graphs, "a step after the first compiled again"
    assert_trajectories_close(actual, run_reference(step, hp, params0, grads), dtypes, what="bucket fused vs reference")
    assert_fp32_state(opt)
