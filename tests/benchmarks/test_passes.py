"""benchmarks/passes.py: operations and bytes of an eager step, counted with a dispatch mode."""

import torch

from shine import engine, tensorlist


def test_traffic_counts_reads_writes_and_in_place_updates(passes):
    x, y, z = (torch.ones(1000) for _ in range(3))
    with passes.Traffic() as traffic:
        x.add_(y)  # reads x and y, writes x (returned: counted once)
        torch._foreach_lerp_([x, y], [y, z], 0.5)  # returns nothing; updates x and y; reads y once, passed twice
        x.view(10, 100)  # a view moves nothing
        torch._foreach_mul_([x, y], [torch.tensor(2.0), torch.tensor(3.0)])  # 0-d scales: a launch per tensor
    assert traffic.ops == 3
    assert traffic.launches == 1 + 1 + 2
    assert traffic.bytes == 4000 * (3 + 5 + 4) + 4 * 2


def test_multi_tensor_adamw_moves_less_than_torchs(passes, capsys, monkeypatch):
    """In the GPU form, shine's multi-tensor AdamW dispatches 7 operations (its direction a
    quotient added in one ``addcdiv_``), never waits for the device, and touches fewer bytes than
    torch's foreach AdamW. Caution's kept fractions and MARS's clips, a 0-d tensor per tensor,
    are scaled in one multi-tensor kernel after one synchronisation, not in a launch per tensor:
    each of their operations is one launch."""
    monkeypatch.setattr(tensorlist, "PER_TENSOR_DEVICES", tensorlist.PER_TENSOR_DEVICES)  # main() changes them
    monkeypatch.setattr(engine, "FOREACH_GROUP_NUMEL", engine.FOREACH_GROUP_NUMEL)
    passes.main(["--form", "gpu", "--only", "adamw", "c-adamw", "mars-adamw", "came"])
    rows = {line[:28].strip(): line[28:].split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows["adamw"][:3] == ["7", "7", "0"]  # operations, GPU launches, synchronisations
    assert float(rows["adamw"][3]) < float(rows["torch AdamW(foreach=True)"][3])
    for name in ("c-adamw", "mars-adamw"):
        assert rows[name][0] == rows[name][1] and rows[name][2] == "1"
    assert set(rows) == {"torch AdamW(foreach=True)", "torch AdamW(fused=True)", "adamw", "c-adamw", "mars-adamw",
                         "came"}


def test_traffic_counts_synchronisations_but_not_step_counters(passes):
    """A value read on the host is a synchronisation (``item()``, :func:`shine.tensorlist.host_values`),
    except from the tensors named host-resident (step counters)."""
    step, x = torch.tensor(3.0), torch.ones(4)
    with passes.Traffic(on_host=(step,)) as traffic:
        step.item()
        x.sum().item()
        tensorlist.host_values(tensorlist.TensorList([x.sum(), x.amax()]))
    assert traffic.syncs == 2


def test_came_stacks_make_fewer_launches(passes, monkeypatch):
    """In the GPU form, CAME's matrices of one shape step as one stack: on a 6-layer GPT-2 (26
    matrices of five shapes), fewer launches than matrix by matrix, for more bytes moved (the
    copies into and out of the stacks); on a 2-layer one (ten of five), where stacks would cost
    more launches than they save, none."""
    from shine import bench, create_optimizer
    from shine.rules import came
    monkeypatch.setattr(tensorlist, "PER_TENSOR_DEVICES", frozenset())
    for layers, fewer in ((6, True), (2, False)):
        params = bench.make_params(bench.gpt2_shapes(layers, 128, vocab=1000, context=128), torch.float32)
        counts = {}
        for stacked in (False, True):
            monkeypatch.setattr(came, "STACKED", stacked)
            counts[stacked] = passes.count(lambda: create_optimizer(params, "came", fused=False, nonfinite="ignore"),
                                           params)
        (_, unstacked, _, fewer_words), (_, stacked, _, more_words) = counts[False], counts[True]
        if fewer:
            assert stacked < 0.6 * unstacked and more_words > fewer_words
        else:
            assert counts[True] == counts[False]
