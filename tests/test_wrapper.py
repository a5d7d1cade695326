"""shine.Cautious brings caution to any torch optimizer; against its documented formula,
d = p_before - p_after(inner step), p = p_before - d*mask/max(mean(mask), 1e-3), mask = d*g > 0
(weight decay inside d, so masked too), g negated for maximize groups, inner state never masked."""
import copy
import pickle

import pytest
import torch
from torch import nn

import reference as ref
import shine
from rules.cases import run_reference, run_shine
from rules.support import DTYPES, assert_trajectories_close, drive, fresh_params, problem


def test_cautious_wrapper_equals_builtin_c_adamw_without_decay():
    """With no weight decay the wrapper's masked displacement is exactly C-AdamW's update."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(6, 5))
    q, r = nn.Parameter(p.detach().clone()), nn.Parameter(p.detach().clone())
    wrapped = shine.Cautious(torch.optim.AdamW([p], lr=1e-2, weight_decay=0.0))
    builtin = shine.AdamW([q], lr=1e-2, weight_decay=0.0, cautious=True)
    plain = torch.optim.AdamW([r], lr=1e-2, weight_decay=0.0)
    for _ in range(5):
        g = torch.randn(6, 5)
        p.grad, q.grad, r.grad = g.clone(), g.clone(), g.clone()
        for opt in (wrapped, builtin, plain):
            opt.step()
    assert torch.allclose(p, q, atol=1e-6)
    assert not torch.allclose(p, r, atol=1e-4)  # the mask did something


def test_wrapper_only_moves_coordinates_that_agree_with_the_gradient():
    p = nn.Parameter(torch.zeros(4))
    opt = shine.Cautious(torch.optim.SGD([p], lr=0.1, momentum=0.9))
    p.grad = torch.tensor([1.0, 1.0, 1.0, 1.0])
    opt.step()  # momentum buffer = g
    p.grad = torch.tensor([1.0, -1.0, 1.0, -1.0])
    before = p.detach().clone()
    opt.step()  # buffer = 0.9*1 + g: [1.9, -0.1, 1.9, -0.1] -> moves against g everywhere, all kept
    assert torch.all((before - p) * p.grad > 0)
    p.grad = torch.tensor([-1.0, 1.0, 1.0, 1.0])
    before = p.detach().clone()
    opt.step()  # buffer [0.71, 0.91, 2.71, 0.91]: coordinate 0 disagrees with g -> masked, the rest scaled by 4/3
    assert p[0] == before[0]
    assert torch.allclose(before[1:] - p[1:], 0.1 * torch.tensor([0.91, 2.71, 0.91]) * 4 / 3)


def _quadratic(p, target):
    def closure():
        p.grad = None
        loss = ((p - target) ** 2 * torch.arange(1.0, 7.0)).sum()
        loss.backward()
        return loss
    return closure


@pytest.mark.parametrize("inner", ["lbfgs", "sgd"])
def test_wrapper_passes_the_closure_to_the_inner_step(inner):
    """The closure goes to the inner step (LBFGS evaluates it several times, and failed without
    it), and the mask compares the inner step's displacement with the gradient of its first
    evaluation, at the parameters the step started from."""
    target = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0, -6.0])
    start = torch.tensor([0.5, 0.5, -0.5, -0.5, 2.0, 0.0])
    make = {"lbfgs": lambda ps: torch.optim.LBFGS(ps, lr=0.5, max_iter=4),
            "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9)}[inner]
    p, q = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    wrapped, plain = shine.Cautious(make([p])), make([q])
    for _ in range(3):
        old = q.detach().clone()
        _quadratic(q, target)()
        first = q.grad.clone()
        q.grad = None
        plain.step(_quadratic(q, target))
        loss = wrapped.step(_quadratic(p, target))
        expected = old - shine.rules.caution(old - q.detach(), first)
        assert torch.is_tensor(loss) and torch.equal(p.detach(), expected)
        q.data.copy_(expected)  # the next step starts where the wrapped one is


def test_wrapper_runs_its_own_state_dict_hooks():
    """Hooks registered on the wrapper run around the inner optimizer's ``state_dict`` and
    ``load_state_dict`` (a post-hook's state dict and a load pre-hook's are the ones used)."""
    p = nn.Parameter(torch.randn(3))
    opt = shine.Cautious(torch.optim.SGD([p], lr=0.1, momentum=0.9))
    called = []
    opt.register_state_dict_pre_hook(lambda o: called.append("save pre"))
    opt.register_state_dict_post_hook(lambda o, sd: called.append("save post") or {**sd, "note": 1})
    opt.register_load_state_dict_pre_hook(lambda o, sd: called.append(("load pre", sd.get("note")))
                                          or {k: v for k, v in sd.items() if k != "note"})
    opt.register_load_state_dict_post_hook(lambda o: called.append("load post"))
    p.grad = torch.randn(3)
    opt.step()
    saved = opt.state_dict()
    opt.load_state_dict(saved)
    assert called == ["save pre", "save post", ("load pre", 1), "load post"]
    assert torch.equal(opt.state[p]["momentum_buffer"], saved["state"][0]["momentum_buffer"])


def test_wrapper_is_an_optimizer_for_schedulers_and_checkpoints():
    p = nn.Parameter(torch.ones(3))
    opt = shine.Cautious(torch.optim.SGD([p], lr=0.1, momentum=0.9))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    p.grad = torch.ones(3)
    opt.step()
    sched.step()
    assert opt.inner.param_groups[0]["lr"] == pytest.approx(0.05)
    sd = opt.state_dict()
    assert "momentum_buffer" in sd["state"][0]
    opt2 = shine.Cautious(torch.optim.SGD([p], lr=0.1, momentum=0.9))
    opt2.load_state_dict(sd)
    assert torch.equal(opt2.state[p]["momentum_buffer"], opt.state[p]["momentum_buffer"])


@pytest.mark.parametrize("clone", ["deepcopy", "pickle"])
def test_copied_wrapper_steps_as_the_original(clone):
    """A copy of the wrapper carries its inner optimizer (the groups and state live there) and
    steps as the original does; torch's ``__getstate__`` dropped ``inner``."""
    p = nn.Parameter(torch.randn(4, 3))
    opt = shine.Cautious(torch.optim.SGD([p], lr=0.1, momentum=0.9))
    p.grad = torch.randn(4, 3)
    opt.step()
    twin = copy.deepcopy(opt) if clone == "deepcopy" else pickle.loads(pickle.dumps(opt))
    q = twin.param_groups[0]["params"][0]
    assert q is not p and torch.equal(q, p) and isinstance(twin.inner, torch.optim.SGD)
    for _ in range(2):
        p.grad = torch.randn(4, 3)
        q.grad = p.grad.clone()
        opt.step()
        twin.step()
    assert torch.equal(p, q)
    assert torch.equal(twin.state[q]["momentum_buffer"], opt.state[p]["momentum_buffer"])


def test_wrapper_rejects_non_optimizers():
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        shine.Cautious(object())
    # as ZeroRedundancyOptimizer(params, optimizer_class=shine.Cautious, lr=...) would build it
    with pytest.raises(TypeError, match="got list and options lr.*ZeroRedundancyOptimizer's optimizer_class"):
        shine.Cautious([nn.Parameter(torch.zeros(2))], lr=1e-3)


def test_wrapper_forwards_the_inner_optimizers_own_methods():
    """``init_state()`` (before a distributed checkpoint) and exact mode's ``stash_grad()`` reach a
    shine optimizer inside the wrapper; torch's private attributes stay the wrapper's own."""
    p = nn.Parameter(torch.randn(4, 3))
    opt = shine.Cautious(shine.MARS([p], approx=False))
    opt.init_state()
    assert opt.inner.state[p]["step"] == 0
    p.grad = torch.randn(4, 3)
    opt.stash_grad()
    assert torch.equal(opt.inner.state[p]["next_prev_grad"], p.grad)
    opt.step()
    assert opt.inner.state[p]["step"] == 1 and opt.skipped_steps == 0
    assert opt._optimizer_step_pre_hooks is not opt.inner._optimizer_step_pre_hooks
    with pytest.raises(AttributeError, match="stash_grad"):
        shine.Cautious(torch.optim.SGD([p], lr=0.1)).stash_grad()
    opt.nonfinite, opt.max_grad_norm = "skip", 1.0  # the inner optimizer's options, set where its step reads them
    assert (opt.inner.nonfinite, opt.inner.max_grad_norm) == ("skip", 1.0) and "nonfinite" not in vars(opt)


FP32 = DTYPES["fp32"]

INNERS = [
    pytest.param(lambda ps, **hp: torch.optim.AdamW(ps, foreach=False, **hp), ref.adamw_step,
                 dict(lr=0.02, weight_decay=0.5), id="torch-adamw"),
    pytest.param(lambda ps, **hp: torch.optim.AdamW(ps, foreach=True, **hp), ref.adamw_step,
                 dict(lr=0.02, weight_decay=0.5, maximize=True), id="torch-adamw-maximize"),
    pytest.param(shine.Lion, ref.lion_step, dict(lr=0.01, weight_decay=3.0), id="shine-lion"),
    pytest.param(shine.CAME, ref.came_step, dict(lr=0.01, weight_decay=0.5), id="shine-came"),
    pytest.param(shine.MARS, ref.mars_step, dict(lr=0.01, weight_decay=0.5, weight_decay_1d=0.5), id="shine-mars"),
]


@pytest.mark.parametrize("make_inner, inner_step, hp", INNERS)
def test_wrapper_matches_reference(make_inner, inner_step, hp):
    """Cautious(inner) follows ref.cautious_wrapper_step over a decaying lr schedule; the weight
    decays are large enough that the decay alone flips some coordinates' mask."""
    params0, grads = problem(FP32)
    _, actual = run_shine(lambda ps, **kw: shine.Cautious(make_inner(ps, **kw)), hp, params0, grads)
    expected = run_reference(ref.cautious_wrapper_step, hp, params0, grads, inner_step=inner_step)
    assert_trajectories_close(actual, expected, FP32, what="Cautious wrapper")


@pytest.mark.parametrize("optimizer, hp", [
    (shine.AdamW, dict(lr=0.02, weight_decay=0.0)),
    (shine.Lion, dict(lr=0.01)),
    (shine.CAME, dict(lr=0.01)),
    (shine.MARS, dict(lr=0.01, weight_decay_1d=0.0, mars_type="shampoo")),
], ids=["adamw", "lion", "came", "mars-shampoo"])
def test_wrapper_without_decay_equals_builtin(optimizer, hp):
    """Without weight decay the wrapper is exact: Cautious(opt) == opt(cautious=True)."""
    params0, grads = problem(FP32)
    wrapped_params, builtin_params = fresh_params(params0), fresh_params(params0)
    wrapped = drive(shine.Cautious(optimizer(wrapped_params, **hp)), wrapped_params, grads)
    builtin = drive(optimizer(builtin_params, cautious=True, **hp), builtin_params, grads)
    assert_trajectories_close(wrapped, builtin, FP32, what="wrapper vs cautious=True")
