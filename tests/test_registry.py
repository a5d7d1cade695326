"""create_optimizer, list_optimizers and optimizer_state_bytes."""
import pytest
import torch
from torch import nn

import shine
from conftest import TinyNet


def test_every_listed_name_builds_its_class():
    expected = {"adamw": shine.AdamW, "lion": shine.Lion, "mars-adamw": shine.MARS, "mars-lion": shine.MARS,
                "mars-shampoo": shine.MARS, "came": shine.CAME, "mars-came": shine.CAME}
    names = shine.list_optimizers()
    assert set(names) == set(expected) | {"c-" + n for n in expected}
    for name in names:
        opt = shine.create_optimizer([nn.Parameter(torch.zeros(2, 2))], name)
        base = name.removeprefix("c-")
        assert type(opt) is expected[base]
        assert opt.defaults["cautious"] == name.startswith("c-")
        if base == "mars-came":
            assert opt.defaults["gamma"] == 0.025
        elif base.startswith("mars-"):
            assert opt.defaults["mars_type"] == base.removeprefix("mars-")


def test_unknown_name_lists_close_matches():
    with pytest.raises(ValueError, match="Did you mean 'c-adamw'"):
        shine.create_optimizer([nn.Parameter(torch.zeros(1))], "c-adamv")


def test_model_groups_keep_biases_norms_embeddings_out_of_decay():
    model = TinyNet()
    opt = shine.create_optimizer(model, "mars-adamw", weight_decay=0.05)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05
    assert no_decay["weight_decay"] == 0.0 and no_decay["weight_decay_1d"] == 0.0
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(decay["params"]) == ids([model.conv.weight, model.fc.weight, model.out.weight])
    assert ids(no_decay["params"]) == ids([model.embed.weight, model.conv.bias, model.norm.weight, model.norm.bias,
                                           model.fc.bias, model.out.bias])


def test_hyperparameters_override_defaults():
    opt = shine.create_optimizer([nn.Parameter(torch.zeros(2, 2))], "c-lion", lr=0.5, betas=(0.95, 0.98))
    assert opt.defaults["lr"] == 0.5 and opt.defaults["betas"] == (0.95, 0.98) and opt.defaults["cautious"]


def _state_floats(opt):
    return (shine.optimizer_state_bytes(opt) - 4 * len(opt.state)) // 4  # minus each fp32 step counter


@pytest.mark.parametrize("name, floats", [
    ("adamw", 2 * 64 * 48),
    ("lion", 64 * 48),
    ("mars-adamw", 3 * 64 * 48),  # m, v, g_prev
    ("mars-lion", 2 * 64 * 48),  # no second moment
    ("mars-shampoo", 2 * 64 * 48),
    ("came", 64 * 48 + 2 * (64 + 48)),
    ("mars-came", 2 * 64 * 48 + 2 * (64 + 48)),  # and g_prev
])
def test_state_memory_is_minimal(name, floats):
    p = nn.Parameter(torch.randn(64, 48))
    opt = shine.create_optimizer([p], name)
    p.grad = torch.randn_like(p)
    opt.step()
    assert _state_floats(opt) == floats


@pytest.mark.parametrize("factor_conv, floats", [("flatten", 32 * 9 * 3 * 3 + 2 * (32 + 81)),
                                                  ("last2", 32 * 9 * 3 * 3 + 4 * 32 * 9 * 3)])
def test_came_conv_factoring(factor_conv, floats):
    p = nn.Parameter(torch.randn(32, 9, 3, 3))
    opt = shine.CAME([p], lr=1e-3, factor_conv=factor_conv)
    p.grad = torch.randn_like(p)
    opt.step()
    assert _state_floats(opt) == floats
