"""shine.Cautious brings caution to any torch optimizer."""
import pytest
import torch
from torch import nn

import shine


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


def test_wrapper_rejects_non_optimizers():
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        shine.Cautious(object())
