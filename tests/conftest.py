"""Shared fixtures: a tiny model and deterministic gradient streams."""
import pytest
import torch
from torch import nn

from shine import engine


@pytest.fixture(autouse=True)
def fuse_tiny_tensors(monkeypatch):
    """The tests' tensors are tiny; the fused path compiles every one of two elements or more
    (by default it leaves tensors under ``FUSED_MIN_TENSOR_NUMEL`` to the multi-tensor path), one
    tensor per compiled call: the tests compile a few hundred graphs, and a graph of a group of
    ``FUSED_GROUP_SIZE`` tensors traces each of them (with groups of eight the suite, about 4
    minutes before, was three quarters done after 13; with groups of two it took 9 with new graphs
    to compile). The fused path's own tests (``tests/test_fused.py``, ``tests/rules/test_fused.py``,
    ``tests/test_precision.py``, the CUDA fused test) step in groups of two (:func:`fused_in_pairs`)."""
    monkeypatch.setattr(engine, "FUSED_MIN_TENSOR_NUMEL", 2)
    monkeypatch.setattr(engine, "FUSED_GROUP_SIZE", 1)


@pytest.fixture
def fused_in_pairs(monkeypatch):
    """Fused steps in groups of two tensors, a short group filled up with scratch tensors."""
    monkeypatch.setattr(engine, "FUSED_GROUP_SIZE", 2)


class TinyNet(nn.Module):
    """A model with every parameter kind the optimizers route differently: matrices, a conv, biases, a norm, an embedding."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, tokens):
        h = self.embed(tokens).transpose(1, 2)
        h = self.conv(h).transpose(1, 2).mean(1)
        return self.out(torch.relu(self.fc(self.norm(h))))


def tiny_batch(seed: int = 0, n: int = 32):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 11, (n, 6), generator=g)
    return tokens, tokens[:, 0] % 3


@pytest.fixture
def tiny_net():
    torch.manual_seed(0)
    return TinyNet()
