"""The optimizers on a CUDA device (the whole module is skipped without one): every rule on every
path against the float64 references, the fused path as Triton kernels (one call per tensor, and
one per bucket; no recompile when the lr changes), checkpoints moving between CUDA and the CPU,
stochastic rounding, bf16 state, the non-finite check, ``shine bench --device cuda`` and the
arena."""
import copy
import json
import math

import pytest
import torch
from torch._dynamo.utils import counters

import shine
from shine import bench, engine
from rules.cases import CASES, run_reference, run_shine
from rules.support import DTYPES, assert_fp32_state, assert_trajectories_close, drive, problem

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

CUDA = torch.device("cuda")
#: Between them every box of the fused path: AdamW, Lion, MARS's correction with each
#: preconditioner (Newton-Schulz too), factored and unfactored CAME, caution, maximize.
FUSED_CASES = ("adamw-cautious", "lion-cautious", "mars-adamw-cautious", "mars-lion-default",
               "mars-shampoo-maximize", "came-wd", "came-cautious", "mars-came-cautious")


def cuda_problem(dtypes, grad_scale=1.0, seed=0):
    params0, grads = problem(dtypes, grad_scale=grad_scale, seed=seed)
    return [p.to(CUDA) for p in params0], [[g.to(CUDA) for g in step] for step in grads], params0, grads


def run_on_cuda(optimizer, hp, params0, grads, **options):
    """``run_shine`` on CUDA tensors; returns (optimizer, trajectories on the CPU)."""
    opt, trajectories = run_shine(optimizer, hp, params0, grads, **options)
    return opt, [[t.cpu() for t in trajectory] for trajectory in trajectories]


@pytest.mark.parametrize("path", ["per_tensor", "foreach"])
@pytest.mark.parametrize("optimizer, step, hp, grad_scale", CASES)
def test_eager_paths_match_reference(optimizer, step, hp, grad_scale, path):
    """Every case of the CPU trajectory tests, in a mixed fp32/bf16 group on CUDA."""
    dtypes = DTYPES["mixed"]
    params0, grads, cpu_params0, cpu_grads = cuda_problem(dtypes, grad_scale)
    flags = dict(foreach=path == "foreach", fused=False)
    opt, actual = run_on_cuda(optimizer, hp, params0, grads, **flags)
    expected = run_reference(step, hp, cpu_params0, cpu_grads)
    assert_trajectories_close(actual, expected, dtypes, what=f"cuda {path} vs reference")
    assert_fp32_state(opt)


@pytest.mark.usefixtures("fused_in_pairs")
@pytest.mark.parametrize("case", [c for c in CASES if c.id in FUSED_CASES],
                         ids=[c.id for c in CASES if c.id in FUSED_CASES])
def test_fused_matches_reference_and_never_recompiles(case):
    """fused=True compiles Triton kernels that follow the reference while the lr changes every
    step, and no step after the first compiles anything; two tensors per call, a short group
    filled up with scratch tensors."""
    optimizer, step, hp, grad_scale = case.values
    torch._dynamo.reset()
    counters.clear()
    dtypes = DTYPES["mixed"]
    params0, grads, cpu_params0, cpu_grads = cuda_problem(dtypes, grad_scale)
    graphs = []
    opt, actual = run_on_cuda(optimizer, hp, params0, grads, fused=True,
                              on_first_step=lambda opt: graphs.append(counters["stats"]["unique_graphs"]))
    assert graphs[0] > 0, "fused=True did not compile"
    assert counters["stats"]["unique_graphs"] == graphs[0], "a step after the first compiled again"
    expected = run_reference(step, hp, cpu_params0, cpu_grads)
    assert_trajectories_close(actual, expected, dtypes, what="cuda fused vs reference")
    assert_fp32_state(opt)


@pytest.mark.parametrize("name", ["c-mars-adamw", "came", "mars-came"])
@pytest.mark.parametrize("source, target", [("cuda", "cpu"), ("cpu", "cuda")])
def test_checkpoint_moves_between_devices(name, source, target):
    """A state_dict saved on one device loads on the other (state lands on the parameters'
    device) and continues as the source does, to fp32 rounding."""
    params0, grads = problem(DTYPES["fp32"], seed=2)
    params = [p.to(source).requires_grad_(True) for p in params0]
    opt = shine.create_optimizer(params, name, lr=1e-2, weight_decay=0.1)
    drive(opt, params, [[g.to(source) for g in step] for step in grads[:4]])
    checkpoint = copy.deepcopy(opt.state_dict())
    resumed_params = [p.detach().to(target).requires_grad_(True) for p in params]
    continued = drive(opt, params, [[g.to(source) for g in step] for step in grads[4:]])
    resumed = shine.create_optimizer(resumed_params, name, lr=1e-2, weight_decay=0.1)
    resumed.load_state_dict(checkpoint)
    for state in resumed.state.values():
        assert all(v.device.type == target for v in state.values() if torch.is_tensor(v) and v.dim())
        assert state["step"].device.type == "cpu"  # read every step: on the GPU each read would wait
    after = drive(resumed, resumed_params, [[g.to(target) for g in step] for step in grads[4:]])
    assert_trajectories_close([[t.cpu() for t in a] for a in after], [[t.cpu() for t in a] for a in continued],
                              DTYPES["fp32"], what=f"{name}: {source} checkpoint continued on {target}")


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_stochastic_round_is_unbiased_on_cuda(compiled):
    """The eager noise (randint_like) and the compiled index hash (int32 arithmetic in Triton)
    round up with probability equal to the distance to the lower neighbour, fresh every call."""
    rounding = torch.compile(engine.stochastic_round, dynamic=True) if compiled else engine.stochastic_round
    spacing = 2.0 ** -7
    x = torch.full((200_000,), 1.0 + 0.3 * spacing, device=CUDA)
    r = rounding(x)
    assert r.dtype == torch.bfloat16
    assert bool(((r == 1.0) | (r == 1.0 + spacing)).all())
    assert abs((r == 1.0 + spacing).double().mean().item() - 0.3) < 0.01
    ups = torch.stack([rounding(x[:8]) == 1.0 + spacing for _ in range(400)]).double().mean(0)
    assert bool(((ups - 0.3).abs() < 4 * (0.21 / 400) ** 0.5).all()), ups
    exact = torch.tensor([0.0, 1.0, -2.5, float("inf"), float("-inf")], device=CUDA)
    assert torch.equal(rounding(exact), exact.bfloat16())


@pytest.mark.parametrize("name", ["adamw", "c-mars-adamw", "came"])
def test_fused_bf16_state(name):
    """bf16 parameters and bf16 state on the fused CUDA path (2-D tensors: CAME's tiled kernels):
    rounded to nearest it follows the multi-tensor path to a bf16 rounding; rounded stochastically
    (fresh noise each step) it stays within 8 bf16 spacings of it over 8 steps (each step's
    rounding of a parameter differs from rounding to nearest by less than one spacing), plus 8 lr,
    the way 8 steps move a parameter (the state's rounding steers the updates)."""
    def run(fused, stochastic):
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=gen).to(CUDA, torch.bfloat16).requires_grad_(True)
                  for s in [(300,), (64, 96), (96, 64)]]
        opt = shine.create_optimizer(params, name, lr=1e-3, state_dtype=torch.bfloat16,
                                     stochastic_rounding=stochastic, fused=fused)
        for _ in range(8):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(CUDA, torch.bfloat16)
            opt.step()
        return [p.detach().double().cpu() for p in params]

    reference = run(False, False)
    for a, e in zip(run(True, False), reference):
        torch.testing.assert_close(a, e, rtol=1e-2, atol=1e-2)
    for a, e in zip(run(True, True), reference):
        spacing = torch.exp2(torch.floor(torch.log2(torch.maximum(a.abs(), e.abs()))) - 7)
        excess = (a - e).abs() - (8 * spacing + 8 * 1e-3)
        assert excess.max() <= 0, f"stochastically rounded steps left the reference by {excess.max():.3g} too much"


def test_nonfinite_gradient_is_refused_on_cuda():
    """The fused CUDA step finds a NaN gradient (inside its graph there) and writes nothing."""
    params = [torch.randn(64, 64, device=CUDA, requires_grad=True)]
    opt = shine.create_optimizer(params, "came", lr=1e-3, fused=True)
    params[0].grad = torch.randn(64, 64, device=CUDA)
    opt.step()
    before = params[0].detach().clone(), {k: v.clone() for k, v in opt.state[params[0]].items()}
    params[0].grad[3, 5] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite gradient"):
        opt.step()
    assert torch.equal(params[0].detach(), before[0])
    assert all(torch.equal(v, before[1][k]) for k, v in opt.state[params[0]].items())


def test_bench_times_cuda(tmp_path):
    """``shine bench --device cuda`` times the device (synchronised) and writes its JSON."""
    out = tmp_path / "speed.json"
    assert bench.main(["--device", "cuda", "--scale", "tiny", "--only", "adamw", "came", "--paths", "fused",
                       "foreach", "--no-extras", "--no-external", "--steps", "3", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["meta"]["device"] == torch.cuda.get_device_name()
    rows = {(r["optimizer"], r["path"]): r for r in figures["rows"]}
    assert {("adamw", "fused"), ("came", "auto"), ("came", "foreach")} <= set(rows)
    assert all(r["median_s"] > 0 and r["ratio_to_fused_adamw"] > 0 for r in rows.values())


def test_arena_trains_on_cuda(tmp_path):
    """``shine arena --device cuda``: every default optimizer trains a small model on the GPU."""
    from shine import cli
    from shine.arena import runner

    args = ["arena", "--device", "cuda", "--model", "nano", "--steps", "20", "--seq-len", "32",
            "--batch-size", "8", "--seeds", "1", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    rows = {row["optimizer"]: row for row in json.loads((tmp_path / "results.json").read_text())["summary"]}
    assert set(rows) == set(runner.DEFAULT_OPTIMIZERS)
    assert all(row["val_loss_mean"] < math.log(256) for row in rows.values())


def test_shard_sums_move_host_sizes_to_the_device_without_waiting():
    """``ShardSums`` sends its host sizes from pinned memory, asynchronously: the same values."""
    from shine.distributed import on_device
    sizes = torch.tensor([3.0, 65537.0], dtype=torch.float64)
    moved = on_device(sizes, CUDA)
    assert moved.device.type == "cuda" and torch.equal(moved.cpu(), sizes)
