"""The fused path (torch.compile of ``pipeline_step``) against the per-tensor reference path.

Compiling costs seconds per graph on a 2-core CPU, so the cases are chosen to share graphs:
every pipeline compiles once per process (engine caches the compiled step per pipeline, rank
and dtypes), whichever test triggers it first.
"""
import copy
import functools
import math
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

import shine
from shine import engine, tensorlist, validation
from rules.support import bf16_spacing, generated_code

pytestmark = pytest.mark.usefixtures("fused_in_pairs")  # groups of two (tests/conftest.py)

# 0-d, 1-d, 2-d wide and tall, 4-d conv kernel.
SHAPES = [(), (5,), (3, 7), (7, 3), (2, 3, 3, 3)]
STEPS = 6
# Every rule in fp32; bf16 parameters (fp32 state) for one case of each kind of box.
CASES = [(name, "fp32") for name in shine.list_optimizers()] + [
    ("lion", "bf16"), ("c-mars-adamw", "bf16"), ("came", "bf16")]
HYPER = {"came": {"lr": 1e-3}, "c-came": {"lr": 1e-3}}

needs_compiler = pytest.mark.skipif(not engine.compiler_available("cpu"), reason="torch.compile unavailable")


def problem(dtype, seed=0, steps=STEPS):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen).to(dtype) for s in SHAPES] for _ in range(steps)]
    return params, grads


def build(name, params, path, **kw):
    flags = {"fused": dict(fused=True), "foreach": dict(fused=False),
             "per_tensor": dict(fused=False, foreach=False)}[path]
    return shine.create_optimizer(params, name, weight_decay=0.1, **{**HYPER.get(name, {}), **kw}, **flags)


def drive(opt, params, grads, scheduler=None, on_step=None):
    """Step through ``grads``; returns the float64 parameters after every step."""
    out = []
    for t, step_grads in enumerate(grads):
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        if on_step is not None:
            on_step(t)
        out.append([p.detach().double().clone() for p in params])
    return out


def assert_close(actual, expected, dtype, what=""):
    """fp32: within rounding; bf16: after step t, within t bf16 steps of each element (each step's
    fp32 math before its rounding to bf16 may differ in its last bits, and an element rounded one
    step apart enters the next step so: CAME's step 1 put one element one step apart, which was
    two steps apart after step 5)."""
    for t, (a_t, e_t) in enumerate(zip(actual, expected)):
        for i, (a, e) in enumerate(zip(a_t, e_t)):
            where = f"{what} step {t + 1} param {i} {tuple(a.shape)}"
            if dtype == torch.float32:
                torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6, msg=lambda m: f"{where}: {m}")
            else:
                steps = (a - e).abs() / bf16_spacing(e)
                assert steps.max() <= t + 1, f"{where}: up to {steps.max():.3g} bf16 steps apart"


def assert_moved(trajectory, initial, dtype):
    """Some element ends more bf16 steps from where it started than four times the most
    :func:`assert_close` allows at the end (fp32: many tolerances), so that a path that did not
    step could not pass it."""
    spacing = 4 * len(trajectory) if dtype == torch.bfloat16 else None
    moves = [((end - start.double()).abs() / (spacing * bf16_spacing(end) if spacing else 1e-4)).max()
             for end, start in zip(trajectory[-1], initial)]
    assert max(moves) > 1, f"the parameters hardly moved: {moves}"


def lr_schedule(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - 0.1 * t)


@needs_compiler
@pytest.mark.parametrize("name, dtype_name", CASES, ids=[f"{n}-{d}" for n, d in CASES])
def test_fused_matches_reference_and_never_recompiles(name, dtype_name):
    """Every rule, every shape class: fused follows the per-tensor reference over several steps
    while a scheduler changes lr every step, and no step after the first compiles anything."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    params0, grads = problem(dtype)
    graphs_after = {}

    def count(t):
        graphs_after[t] = counters["stats"]["unique_graphs"]

    kw = {"lr": 1e-2} if dtype == torch.bfloat16 else {}  # moves bf16 weights by many bf16 steps
    params = [p.clone().requires_grad_() for p in params0]
    opt = build(name, params, "fused", **kw)
    fused = drive(opt, params, grads, lr_schedule(opt), on_step=count)
    params = [p.clone().requires_grad_() for p in params0]
    opt = build(name, params, "per_tensor", **kw)
    reference = drive(opt, params, grads, lr_schedule(opt))
    assert_moved(reference, params0, dtype)
    assert_close(fused, reference, dtype, f"{name} {dtype_name} fused vs per_tensor")
    assert graphs_after[STEPS - 1] == graphs_after[0], (
        f"lr/step changes recompiled: graph count per step {graphs_after}")


@needs_compiler
@pytest.mark.parametrize("name", ["c-mars-adamw", "came"])
@pytest.mark.parametrize("source, target", [("fused", "foreach"), ("per_tensor", "fused")])
def test_checkpoint_moves_between_paths(name, source, target):
    """A state_dict saved on one path loads into an optimizer on another and continues as the
    source would have."""
    params0, grads = problem(torch.float32, seed=1)
    params = [p.clone().requires_grad_() for p in params0]
    opt = build(name, params, source)
    drive(opt, params, grads[:3])
    checkpoint = copy.deepcopy(opt.state_dict())  # state_dict() shares the live state tensors
    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    continued = drive(opt, params, grads[3:])
    resumed = build(name, resumed_params, target)
    resumed.load_state_dict(checkpoint)
    assert_close(drive(resumed, resumed_params, grads[3:]), continued, torch.float32,
                 f"{name}: {source} checkpoint continued on {target}")


def _assert_falls_back(name, seed, expected_words):
    """fused=True gives exactly one warning naming ``expected_words`` and the multi-tensor path's numbers."""
    params0, grads = problem(torch.float32, seed=seed)
    params = [p.clone().requires_grad_() for p in params0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = drive(build(name, params, "fused"), params, grads[:3])
    messages = [str(w.message) for w in caught if "torch.compile" in str(w.message)]
    assert len(messages) == 1 and expected_words in messages[0], messages
    params = [p.clone().requires_grad_() for p in params0]
    expected = drive(build(name, params, "foreach"), params, grads[:3])
    for a_t, e_t in zip(fused, expected):
        for a, e in zip(a_t, e_t):
            assert torch.equal(a, e)


def _failing_compiler(monkeypatch, probe_works: bool) -> list:
    """Every compile of a pipeline fails; the device's probe works or not. Returns the list of
    the compiles tried (fn name, pipeline key)."""
    tried = []

    def broken(fn, key):
        def fail(*args):
            tried.append((fn.__name__, key))
            raise RuntimeError("no C++ compiler")
        return fail

    def probe(device_type):
        if not probe_works:
            engine._COMPILER_ERRORS[device_type] = "RuntimeError: no C++ compiler"
        return probe_works

    monkeypatch.setattr(engine, "compiler_available", probe)
    monkeypatch.setattr(engine, "_compiled", broken)
    monkeypatch.setattr(engine, "_COMPILER_ERRORS", {})
    monkeypatch.setattr(validation, "_WARNED", set())
    monkeypatch.setattr(engine, "_BROKEN", set())
    monkeypatch.setattr(engine, "_COMPILED_OK", set())
    return tried


def test_fallback_without_compiler_warns_once(monkeypatch):
    """fused=True where the compiler does not work at all (its probe, run after the first failed
    compile, fails too): one warning naming the device, the multi-tensor path's numbers, and no
    compile tried after the first step, for any pipeline on that device."""
    tried = _failing_compiler(monkeypatch, probe_works=False)
    _assert_falls_back("mars-adamw", 2, "does not work on cpu")
    assert len(tried) == 1
    assert engine.choose_path(True, None, torch.device("cpu"), 10) == "foreach"
    assert engine.choose_path(None, None, torch.device("cpu"), engine.AUTO_FUSE_MIN_NUMEL["cpu"]) == "foreach"


def test_fallback_when_compiling_fails(monkeypatch):
    """A compiler that works for the probe but fails on a pipeline: one warning, that pipeline
    runs on the multi-tensor path, and no tensor is stepped twice or skipped; other pipelines
    still compile."""
    tried = _failing_compiler(monkeypatch, probe_works=True)
    _assert_falls_back("c-adamw", 3, "no C++ compiler")
    assert len(tried) == 1 and engine._BROKEN == {tried[0][1][0]}
    assert engine.choose_path(True, None, torch.device("cpu"), 10) == "fused"


def test_auto_choice(monkeypatch):
    """fused=None: CPU fuses only buckets of AUTO_FUSE_MIN_NUMEL elements or more (so small
    models and tests never compile); foreach=False keeps the reference loop; fused=False never.
    CUDA never fuses by itself (the multi-tensor path measured faster there), but does on request,
    with one warning saying so."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    small, large = 1000, engine.AUTO_FUSE_MIN_NUMEL["cpu"]
    assert engine.choose_path(None, None, cuda, 10 * large) == "foreach"
    monkeypatch.setattr(validation, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="fused=True on CUDA measured slower"):
        assert engine.choose_path(True, None, cuda, small) == "fused"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert engine.choose_path(True, None, cuda, small) == "fused"  # once per process
    assert engine.choose_path(None, None, cpu, small) == "foreach"
    assert engine.choose_path(None, False, cpu, large) == "per_tensor"
    assert engine.choose_path(False, None, cpu, large) == "foreach"
    if engine.compiler_available("cpu"):
        assert engine.choose_path(None, None, cpu, large) == "fused"
        assert engine.choose_path(True, None, cpu, small) == "fused"
    before = counters["stats"]["unique_graphs"]
    params0, grads = problem(torch.float32, seed=4)
    params = [p.clone().requires_grad_() for p in params0]
    drive(shine.AdamW(params), params, grads[:2])
    assert counters["stats"]["unique_graphs"] == before, "a small default optimizer compiled"


def test_grad_norm_of_every_layout_and_dtype():
    """Row-wise norms of every layout (transposed, bf16, empty), in float64 on demand, and accurate:
    float32 over a whole 4M-element tensor would be off by about 1e-4 relative."""
    grads = [torch.randn(100, 30), torch.randn(7).bfloat16(), torch.randn(5, 4).t(), torch.randn(0)]
    expected = torch.cat([g.double().reshape(-1) for g in grads]).norm().item()
    assert engine.grad_norm(grads) == pytest.approx(expected, rel=1e-6)
    assert engine.grad_norm([]) == 0.0
    big = [torch.randn(4096, 1024, generator=torch.Generator().manual_seed(0))]
    assert engine.grad_norm(big) == pytest.approx(big[0].double().norm().item(), rel=1e-7)
    huge = [torch.tensor([3e30, 4e30])]
    assert engine.grad_norm(huge) == math.inf
    assert engine.grad_norm(huge, dtype=torch.float64) == pytest.approx(5e30, rel=1e-7)


def test_grad_norm_does_not_depend_on_memory_alignment():
    """The same gradients at 16 different offsets in memory give the same bits (BLAS ``dot`` did
    not, which made runs clipped with ``max_grad_norm`` differ between processes)."""
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(n, generator=gen) for n in (3000, 777, 20000)] + [torch.randn(300, 400, generator=gen)]
    norms = set()
    for offset in range(16):
        placed = []
        for g in grads:
            buffer = torch.empty(g.numel() + offset)
            placed.append(buffer[offset:].view(g.shape).copy_(g))
        norms.add(engine.grad_norm(placed))
    assert len(norms) == 1, norms


def test_finite_check_exact_despite_overflow():
    """The fast screen (a sum) overflows for huge finite gradients; the exact check then decides."""
    big = torch.full((4,), 3e38)
    assert engine.grads_finite([big, torch.ones(3)])
    assert not engine.grads_finite([torch.ones(3), torch.tensor([1.0, float("nan")])])
    assert not engine.grads_finite([torch.tensor([float("-inf")])])
    p = torch.zeros(4, requires_grad=True)
    opt = shine.AdamW([p])
    p.grad = big.clone()
    opt.step()  # no error: finite
    p.grad = torch.tensor([0.0, float("inf"), 0.0, 0.0])
    with pytest.raises(RuntimeError, match="non-finite"):
        opt.step()


def test_caution_counts_before_the_step_when_the_rule_gives_the_sign(monkeypatch):
    """C-AdamW's and C-MARS-AdamW's kept fraction (and MARS's clip) come from the read-only
    pre-pass of the fused path; C-CAME (no cheap sign) counts inside its step, and its pre-pass
    computes the row statistics of the factored matrices. The fused path is run here with its
    step function uncompiled (the compiler traces the same code)."""
    prepassed = []
    prepass = engine.pipeline_prepass

    def spy(pipe, *args):
        prepassed.append((pipe.precondition.__name__, pipe.correction))
        return prepass(pipe, *args)

    monkeypatch.setattr(engine, "pipeline_prepass", spy)
    _uncompiled_fused_path(monkeypatch)
    for name in ("c-adamw", "c-mars-adamw", "c-came"):
        params, grads = problem(torch.float32, steps=2)
        reference = [p.clone() for p in params]
        fused = drive(build(name, params, "fused"), params, grads)
        assert_close(fused, drive(build(name, reference, "per_tensor"), reference, grads), torch.float32, name)
    assert set(prepassed) == {("adamw", False), ("adamw", True), ("came_factored", False)}


def _uncompiled_fused_path(monkeypatch):
    """The fused path's code run without compiling (the compiler traces the same code)."""
    monkeypatch.setattr(engine, "_compiled", lambda fn, key: fn)
    checked = []
    grads_finite = engine.grads_finite

    def spy(grads):
        checked.extend(tuple(g.shape) for g in grads)
        return grads_finite(grads)

    monkeypatch.setattr(engine, "grads_finite", spy)
    return checked


@pytest.mark.parametrize("name", ["c-adamw", "came"])
def test_the_step_reuses_what_the_prepass_built(monkeypatch, name):
    """Where the pre-pass runs first (CPU), the step takes the packed hyperparameters and each
    tensor's views from it: built once per tensor and step, as when no pre-pass runs first."""
    _uncompiled_fused_path(monkeypatch)
    monkeypatch.setattr(engine, "FUSED_MIN_TENSOR_NUMEL", 10)
    calls = []
    for helper in ("_fused_args", "_packed"):
        def spy(*args, _original=getattr(engine, helper), _name=helper):
            calls.append(_name)
            return _original(*args)
        monkeypatch.setattr(engine, helper, spy)
    counts = {}
    for nonfinite in ("raise", "ignore"):  # with and without the pre-pass run first
        calls.clear()
        params, grads = problem(torch.float32, steps=2)
        drive(build(name, params, "fused", nonfinite=nonfinite), params, grads)
        counts[nonfinite] = (calls.count("_fused_args"), calls.count("_packed"))
    assert counts["raise"] == counts["ignore"] and counts["raise"][0] > 0


@pytest.mark.parametrize("name, huge", [("c-adamw", 3e38), ("mars-adamw", 1e20), ("came", 1.4e19)])
def test_fused_prepass_is_the_nonfinite_check(monkeypatch, name, huge):
    """On CPU the fused pre-pass (caution's count, MARS's clip) runs before any step and reads each
    gradient anyway: its probe checks those gradients, and only the others get the separate check.
    A NaN behind a probe still stops the step with nothing written, not even the first step's
    fresh state; huge finite gradients let the step go on, also where the probe overflows (MARS's
    clip norm, CAME's row statistics; caution's largest |g| cannot)."""
    checked = _uncompiled_fused_path(monkeypatch)
    monkeypatch.setattr(engine, "FUSED_MIN_TENSOR_NUMEL", 10)  # 0-d and (5,) take the multi-tensor path
    params, grads = problem(torch.float32, steps=2)
    reference = [p.clone() for p in params]
    fused = drive(build(name, params, "fused"), params, grads)
    assert_close(fused, drive(build(name, reference, "per_tensor"), reference, grads), torch.float32, name)
    # MARS's 1-D and 0-d parameters take its AdamW (no pre-pass), CAME's its unfactored rule
    # (no pre-pass either); both paths check those separately
    probed = [(3, 7), (7, 3)] + ([(2, 3, 3, 3)] if name != "mars-adamw" else [])
    separately = [s for s in SHAPES if s not in probed]
    assert sorted(checked) == sorted(separately * 2 + SHAPES * 2)  # 2 fused steps, 2 reference steps

    fresh = [p.clone().requires_grad_() for p in params]
    before = [p.detach().clone() for p in fresh]
    opt = build(name, fresh, "fused")
    for p, g in zip(fresh, grads[0]):
        p.grad = g.clone()
    fresh[2].grad[1, 1] = math.nan
    with pytest.raises(RuntimeError, match=r"non-finite gradient \(NaN or inf\) in parameter #2"):
        opt.step()
    assert not any(opt.state[p] for p in fresh)
    assert all(torch.equal(p, q) for p, q in zip(fresh, before))

    fresh[2].grad = torch.full((3, 7), huge)  # MARS's and CAME's probes overflow; c-adamw's is 3e38
    opt.step()
    assert all(opt.state[p]["step"].item() == 1 for p in fresh)
    reference = [p.clone().requires_grad_() for p in before]  # the same step on the reference path
    for p, q in zip(reference, fresh):
        p.grad = q.grad.clone()
    build(name, reference, "per_tensor").step()
    for p, q in zip(fresh, reference):  # CAME's own math overflows at this size, as the reference's
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, equal_nan=True)


@needs_compiler
@pytest.mark.parametrize("name", ["c-adamw", "came"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_compiled_prepass_catches_every_nonfinite_value(name, bad):
    """The compiled probes (largest |g|, largest row statistic) propagate NaN and both infinities."""
    params, grads = problem(torch.float32, steps=1)
    opt = build(name, params, "fused")
    for p, g in zip(params, grads[0]):
        p.grad = g.clone()
    params[3].grad[2, 1] = bad
    with pytest.raises(RuntimeError, match=r"non-finite gradient \(NaN or inf\) in parameter #3"):
        opt.step()
    assert not any(opt.state[p] for p in params)


@needs_compiler
def test_fused_kernel_is_parallel_even_when_a_small_tensor_compiles_it():
    """One graph serves every tensor size, so whether its loop runs on all threads must not depend
    on the size of the tensor that triggered the compile (a bias would make it serial)."""
    opt = shine.AdamW([torch.nn.Parameter(torch.zeros(3))])
    pipe, hyper = opt._pipeline(opt.param_groups[0], "adamw")
    hyper = {**hyper, "step": 1.0, **pipe.scalars({**hyper, "step": 1.0})}
    hyper = {k: torch.tensor(v, dtype=torch.float64) if isinstance(v, float) else v for k, v in hyper.items()}
    p, g = torch.randn(8), torch.randn(8)
    state = {"exp_avg": torch.zeros(8), "exp_avg_sq": torch.zeros(8)}
    step = engine._compiled.__wrapped__(engine.pipeline_step, (pipe, "parallel-test"))  # a fresh compile
    assert "#pragma omp parallel" in generated_code(step, pipe, p, g, state, hyper, None)


@needs_compiler
@pytest.mark.parametrize("name", ["c-adamw", "mars-lion", "came"])
def test_fused_sums_by_rows_as_on_a_gpu(name, monkeypatch):
    """Graphs compiled for a GPU take whole-tensor sums by rows of a fixed length
    (``tensorlist._by_rows``). Forced on the CPU, with fresh graphs: caution's count, MARS's norm
    and CAME's RMS compile that way (no fallback) for a first tensor of under one row, and the
    step follows the per-tensor reference on tensors of whole rows, part rows and 2-D."""
    by_rows = tensorlist._by_rows
    monkeypatch.setattr(tensorlist, "_by_rows", lambda t: torch.compiler.is_compiling() or by_rows(t))
    monkeypatch.setattr(engine, "_compiled", functools.cache(engine._compiled.__wrapped__))
    monkeypatch.setattr(engine, "_BROKEN", set())
    gen = torch.Generator().manual_seed(0)
    shapes = [(5,), (3000,), (2048,), (40, 80), (2, 3, 3, 3)]
    params0 = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    counters.clear()
    runs = []
    for path in ("fused", "per_tensor"):
        params = [p.clone().requires_grad_() for p in params0]
        runs.append(drive(build(name, params, path), params, grads))
    assert counters["stats"]["unique_graphs"] > 0 and not engine._BROKEN, "the row-wise sums did not compile"
    assert_close(*runs, torch.float32, f"{name} fused by rows vs per_tensor")


def test_small_tensors_of_a_fused_bucket_take_the_multi_tensor_path(monkeypatch):
    """Under ``FUSED_MIN_TENSOR_NUMEL`` elements a compiled call costs more than it saves, so those
    tensors run on the multi-tensor path in one go; the rest compile. Both give the reference's numbers."""
    monkeypatch.setattr(engine, "FUSED_MIN_TENSOR_NUMEL", 10)
    compiled_sizes, foreach_sizes = [], []
    run_foreach = engine._run_foreach

    def spy_foreach(pipe, params, *args):
        foreach_sizes.append(sorted(p.numel() for p in params))
        return run_foreach(pipe, params, *args)

    def fake_compile(fn, key):
        def step(pipe, tensors, *args):
            compiled_sizes.append((fn.__name__, sorted(t.numel() for t in tensors if t.numel() != engine.FILLER_NUMEL)))
            return fn(pipe, tensors, *args)
        return step

    monkeypatch.setattr(engine, "_run_foreach", spy_foreach)
    monkeypatch.setattr(engine, "_compiled", fake_compile)
    params, grads = problem(torch.float32, steps=2)
    reference = [p.clone() for p in params]
    fused = drive(build("c-adamw", params, "fused"), params, grads)
    # per step, in groups of two (tests/conftest.py): pre-passes, then steps, for the tensors of 21, 21 and 54 elements
    assert foreach_sizes == [[1, 5]] * 2
    assert compiled_sizes == [(fn, sizes) for fn in ("fused_prepass", "fused_step") for sizes in ([21, 21], [54])] * 2
    assert_close(fused, drive(build("c-adamw", reference, "per_tensor"), reference, grads), torch.float32)


def _double(x):
    return x * 2 + 1


@needs_compiler
def test_cached_graphs_run_without_dynamo_frame_and_guards_still_choose(monkeypatch):
    """After the first call of a key, its graphs run straight from dynamo's cache: the first
    entry whose guards pass, so a tensor the cached graphs do not fit (another dtype here) still
    compiles a graph of its own, and the results are the plain compiled call's."""
    hits = []
    call_cached = engine._call_cached

    def spy(compiled, args):
        out = call_cached(compiled, args)
        hits.append(out is not engine._MISS)
        return out

    monkeypatch.setattr(engine, "_call_cached", spy)
    key = ("cached-graphs-test",)
    for x in (torch.arange(5.0), torch.arange(7.0), torch.arange(6), torch.arange(9), torch.arange(3.0)):
        torch.testing.assert_close(engine._call_compiled(_double, key, x), x * 2 + 1, rtol=0, atol=0)
    # float 5: compiles; float 7: cached (dynamic size); int: guards fail, compiles; int 9, float 3: cached
    assert hits == [False, True, False, True, True]
    with torch.compiler.set_stance("force_eager"):
        assert engine._call_cached(engine._compiled(_double, key), (torch.arange(4.0),)) is engine._MISS


@needs_compiler
def test_cached_graph_calls_equal_dynamo_calls(monkeypatch):
    """A fused optimizer stepping through dynamo's cache gives bit for bit what it gives through
    dynamo's frame evaluation (the same compiled graphs)."""
    params, grads = problem(torch.float32, steps=3)
    copies = [p.clone() for p in params]
    direct = drive(build("c-came", params, "fused"), params, grads)
    monkeypatch.setattr(engine, "_call_cached", lambda compiled, args: engine._MISS)
    through_dynamo = drive(build("c-came", copies, "fused"), copies, grads)
    for a_t, e_t in zip(direct, through_dynamo):
        for a, e in zip(a_t, e_t):
            assert torch.equal(a, e)


def _step_code(opt):
    """The C++ that compiling ``opt``'s fused step generates (compiled afresh, no cache hits)."""
    torch._dynamo.reset()
    return generated_code(opt.step)


@needs_compiler
@pytest.mark.parametrize("param_dtype, state_dtype, stochastic, lanes", [
    (torch.float32, torch.bfloat16, False, 32),   # fp32 parameters, bf16 state: bf16's width
    (torch.bfloat16, None, False, 32),            # bf16 parameters, fp32 state: the same
    (torch.float32, None, False, 16),             # no bf16 value: float's width, as inductor chooses
    (torch.float32, torch.bfloat16, True, 32),    # stochastic rounding, its bit casts as vector casts
])
def test_fused_step_tiles_by_bf16_width_where_it_moves_bf16(param_dtype, state_dtype, stochastic, lanes):
    """A kernel that loads and stores bf16 is vectorised 32 elements at a time, although the store
    of an fp32 tensor (parameter or state) is a loop body without a bf16 value, and stochastic
    rounding's bit casts are vector casts, not element-by-element loops; the changes to inductor
    last only while shine compiles, and the step's numbers stay the reference's."""
    from torch._inductor.codegen import cpp

    chooser, bit_cast = cpp.get_loop_body_lowp_fp, vars(cpp.CppVecOverrides)["to_dtype_bitcast"]
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(4099, generator=gen).to(param_dtype)
    grads = [torch.randn(4099, generator=gen).to(param_dtype) for _ in range(3)]
    results = []
    for fused in (True, False):
        p = torch.nn.Parameter(init.clone())
        opt = shine.AdamW([p], lr=1e-2, weight_decay=0.1, fused=fused, state_dtype=state_dtype,
                          stochastic_rounding=stochastic, nonfinite="ignore")
        p.grad = grads[0].clone()
        if fused:
            code = _step_code(opt)
            assert f"x0+=static_cast<int64_t>({lanes}L)" in code
            assert f"x0+=static_cast<int64_t>({ {16: 32, 32: 16}[lanes]}L)" not in code
            assert cpp.get_loop_body_lowp_fp is chooser, "the tiling change outlived the compile"
            assert vars(cpp.CppVecOverrides)["to_dtype_bitcast"] is bit_cast, "the cast change outlived the compile"
            assert ("at::vec::cast<int32_t>" in code) == stochastic
            assert "= c10::bit_cast<" not in code  # the element-by-element form
        else:
            opt.step()
        for g in grads[1:]:
            p.grad = g.clone()
            opt.step()
        results.append(p.detach().float())
    if not stochastic:
        torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-7)


@needs_compiler
def test_stochastic_rounding_with_vector_bit_casts_gives_the_element_wise_casts_bits(monkeypatch):
    """Vector casts and bf16-wide tiles change how the rounding's bits are moved, not which: three
    steps of AdamW with bf16 state rounded stochastically give the same bits as the step compiled
    without shine's changes to inductor, from the same seed."""
    import contextlib

    gen = torch.Generator().manual_seed(1)
    init, grads = torch.randn(4099, generator=gen), [torch.randn(4099, generator=gen) for _ in range(3)]

    def run():
        torch._dynamo.reset()
        torch.manual_seed(7)
        p = torch.nn.Parameter(init.clone())
        opt = shine.AdamW([p], lr=1e-2, fused=True, state_dtype=torch.bfloat16, stochastic_rounding=True)
        with torch._inductor.config.patch(fx_graph_cache=False):
            for g in grads:
                p.grad = g.clone()
                opt.step()
        state = opt.state[p]
        return [p.detach().clone(), state["exp_avg"].clone(), state["exp_avg_sq"].clone()]

    changed = run()
    monkeypatch.setattr(engine, "_cpu_codegen", lambda bit_casts=False: contextlib.nullcontext())
    plain = run()
    assert changed[1].dtype == torch.bfloat16
    for a, e in zip(changed, plain):
        assert torch.equal(a, e)


def _group_calls(monkeypatch) -> list:
    """Records each compiled call of the fused path: (function name, members, group size)."""
    calls = []
    call = engine._call_compiled

    def spy(fn, key, pipe, tensors, *args, **kwargs):
        members = [len(t) for t in tensors if t.numel() != engine.FILLER_NUMEL]
        calls.append((fn.__name__, members, len(tensors)))
        return call(fn, key, pipe, tensors, *args, **kwargs)

    monkeypatch.setattr(engine, "_call_compiled", spy)
    return calls


@needs_compiler
def test_groups_of_tensors_share_one_graph(monkeypatch):
    """A shape-free rule's tensors are stepped ``FUSED_GROUP_SIZE`` per compiled call, a short last
    group padded with scratch tensors: one graph serves every group, whatever the sizes in it (two
    equal ones too, which duck sizing would have made a guard), nothing compiles after the first
    step while the lr changes, and the numbers are the per-tensor reference's."""
    monkeypatch.setattr(engine, "FUSED_GROUP_SIZE", 3)
    torch._dynamo.reset()
    counters.clear()
    calls = _group_calls(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    sizes = [64, 64, 45, 64, 30, 49, 66]
    params0 = [torch.randn(n, generator=gen) for n in sizes]
    grads = [[torch.randn(n, generator=gen) for n in sizes] for _ in range(3)]
    graphs = []
    params = [p.clone().requires_grad_() for p in params0]
    opt = build("adamw", params, "fused")
    fused = drive(opt, params, grads, lr_schedule(opt),
                  on_step=lambda t: graphs.append(counters["stats"]["unique_graphs"]))
    reference = [p.clone().requires_grad_() for p in params0]
    opt = build("adamw", reference, "per_tensor")
    assert_close(fused, drive(opt, reference, grads, lr_schedule(opt)), torch.float32, "adamw in groups")
    assert calls == [("fused_step", [64, 64, 45], 3), ("fused_step", [64, 30, 49], 3), ("fused_step", [66], 3)] * 3
    assert graphs == [1, 1, 1], graphs


def test_tensors_whose_memory_overlaps_go_to_different_groups(monkeypatch):
    """Views of disjoint parts of one buffer (flat parameters, DDP's gradient buckets) share groups;
    tensors whose memory overlaps never share a compiled call (one's update could change what
    another reads, and dynamo guards on which inputs overlap). Their steps are the reference's."""
    _uncompiled_fused_path(monkeypatch)
    grouped = []
    fused_groups = engine._fused_groups
    monkeypatch.setattr(engine, "_fused_groups", lambda *args: grouped.append(fused_groups(*args)) or grouped[-1])
    gen = torch.Generator().manual_seed(0)
    flat = torch.randn(160, generator=gen)
    grads = [torch.randn(120, generator=gen) for _ in range(2)]
    runs = []
    for path in ("fused", "per_tensor"):
        buffer = flat.clone()
        params = [torch.nn.Parameter(buffer[i * 40:(i + 1) * 40]) for i in range(4)]
        assert params[1].untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
        opt = build("adamw", params, path)
        trajectory = []
        for g in grads:  # gradients that are views of one bucket, each overlapping the next
            for p, (start, stop) in zip(params, [(0, 40), (20, 60), (60, 100), (80, 120)]):
                p.grad = g[start:stop]
            opt.step()
            trajectory.append([p.detach().double().clone() for p in params])
        runs.append(trajectory)
    assert_close(*runs, torch.float32, "views of one buffer")
    # groups of two: 1's gradient overlaps 0's, so 0 takes 2 and 1 takes 3 (which overlaps 2's)
    assert [[group.members for group in groups] for groups in grouped] == [[[0, 2], [1, 3]]] * 2


@needs_compiler
@pytest.mark.parametrize("group_size", [1, 2])
def test_tensors_of_every_rank_share_one_graph(monkeypatch, group_size):
    """A shape-free rule's tensors go in as 1-D tensors that view nothing: dynamo guards a view on
    the size of the tensor it views, which compiled AdamW three graphs for a vector, a matrix and a
    conv kernel, one tensor per call, where one serves them all."""
    monkeypatch.setattr(engine, "FUSED_GROUP_SIZE", group_size)
    torch._dynamo.reset()
    counters.clear()
    gen = torch.Generator().manual_seed(0)
    shapes = [(9000,), (100, 90), (10, 9, 10, 10), (50, 60)]
    params0 = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(2)]
    params = [p.clone().requires_grad_() for p in params0]
    fused = drive(build("adamw", params, "fused", nonfinite="ignore"), params, grads)
    assert counters["stats"]["unique_graphs"] == 1
    reference = [p.clone().requires_grad_() for p in params0]
    assert_close(fused, drive(build("adamw", reference, "per_tensor"), reference, grads), torch.float32, "ranks")


@needs_compiler
def test_non_contiguous_tensors_step_one_per_call_in_one_graph():
    """Tensors that keep a non-contiguous layout (transposed matrices) go one per call: contiguous
    scratch tensors filling up their group would fail the graph's stride guards and compile it again."""
    torch._dynamo.reset()
    counters.clear()
    gen = torch.Generator().manual_seed(0)
    shapes = [(30, 20), (40, 20), (30, 50)]
    params0 = [torch.randn(s, generator=gen).t() for s in shapes]
    grads = [[torch.randn(s, generator=gen).t() for s in shapes] for _ in range(2)]
    params = [torch.nn.Parameter(p.clone().t().contiguous().t()) for p in params0]
    assert not any(p.is_contiguous() for p in params)
    fused = drive(build("adamw", params, "fused", nonfinite="ignore"), params, grads)
    assert counters["stats"]["unique_graphs"] == 1
    reference = [torch.nn.Parameter(p.clone()) for p in params0]
    assert_close(fused, drive(build("adamw", reference, "per_tensor"), reference, grads), torch.float32, "transposed")
