"""How many operations an eager optimizer step dispatches, how many bytes they touch, how
many kernel launches they would make on a GPU, and how often it waits for the device.

On a GPU the multi-tensor path (``fused=None`` there) is bound by its kernels' memory traffic
and by the host time of launching them; both are counted here, on any machine, with a torch
dispatch mode: every operation that moves data (views excluded) counts once (a foreach
operation launches one or a few kernels for the whole list), and touches the bytes of every
tensor it reads plus those it writes (its outputs, or the tensors it updates in place). The
bytes are a traffic model (each operation reads its inputs from memory), not a measurement,
and are given in 4-byte words per parameter. A synchronisation is a read of a value on the host
(``.item()``, ``bool()``, the per-tensor scales of ``tensorlist.host_values``): on a GPU the host
then waits for every kernel queued before it. ``--form gpu`` forces the form the rules take
where kernel launches cost host time (``tensorlist.PER_TENSOR_DEVICES`` emptied, one group per
bucket); ``--form cpu`` is the CPU's (per-tensor kernels for caution's mask and CAME's passes).

    python benchmarks/passes.py --form gpu --only adamw c-adamw came
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from shine import bench, create_optimizer, engine, list_optimizers, tensorlist  # noqa: E402


class Traffic(TorchDispatchMode):
    """Counts the data-moving operations dispatched under it, the bytes they touch, the kernel
    launches they would make on a GPU (``launches``): one for a foreach operation whose lists match
    tensor by tensor in shape, one per tensor where they do not (torch's per-tensor fallback, as for
    a list of 0-d scale tensors or a broadcast), one for any other operation; a foreach launch
    covers a bounded number of tensors and blocks, so very long lists and large tensors take a few
    more, not counted here. And ``syncs``: the reads of values on the host (``item()``, ``bool()``,
    :func:`shine.tensorlist.host_values`), except of the tensors in ``on_host`` (step counters,
    which stay on the host whatever the device)."""

    def __init__(self, on_host: tuple[torch.Tensor, ...] = ()) -> None:
        super().__init__()
        self.ops, self.bytes, self.launches, self.syncs = 0, 0, 0, 0
        self.on_host = {id(t) for t in on_host}

    def __enter__(self):
        self._host_values = tensorlist.host_values

        def counted(x):
            self.syncs += 1
            return self._host_values(x)
        tensorlist.host_values = counted
        return super().__enter__()

    def __exit__(self, *exc):
        tensorlist.host_values = self._host_values
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._schema.name == "aten::_local_scalar_dense" and id(args[0]) not in self.on_host:
            self.syncs += 1
        if func.is_view or func._schema.name in ("aten::lift_fresh", "aten::_local_scalar_dense"):
            return out
        # each tensor once, however often it is passed (addcmul_(v, g, g) reads g once)
        reads = list({id(t): t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}.values())
        written = {id(t): t for t in tree_leaves(out) if isinstance(t, torch.Tensor)}
        values = dict(zip((a.name for a in func._schema.arguments), args)) | (kwargs or {})
        for arg in func._schema.arguments:  # what the op updates in place (it may return nothing)
            if arg.alias_info is not None and arg.alias_info.is_write:
                written.update((id(t), t) for t in tree_leaves(values.get(arg.name)) if isinstance(t, torch.Tensor))
        written = list(written.values())
        touched = sum(t.numel() * t.element_size() for t in reads + written)
        if any(t.numel() > 1 for t in reads + written):
            self.ops += 1
            self.launches += _launches(func, args)
        self.bytes += touched
        return out


def _launches(func, args) -> int:
    """GPU kernel launches of one operation (see :class:`Traffic`)."""
    lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
    if not func._schema.name.startswith("aten::_foreach_") or not lists:
        return 1
    shapes = [t.shape for t in lists[0]]
    return 1 if all([t.shape for t in other] == shapes for other in lists[1:]) else len(shapes)


def count(build, params) -> tuple[int, int, int, float]:
    """(operations, GPU launches, synchronisations, words per parameter) of the third step of
    ``build()`` on ``params``."""
    opt = build()
    for _ in range(2):
        opt.step()
    steps = tuple(s["step"] for s in opt.state.values() if isinstance(s.get("step"), torch.Tensor))
    with Traffic(on_host=steps) as traffic:
        opt.step()
    return traffic.ops, traffic.launches, traffic.syncs, traffic.bytes / 4 / sum(p.numel() for p in params)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--form", choices=("cpu", "gpu"), default="gpu")
    parser.add_argument("--layers", type=int, default=2, help="GPT-2 blocks (default 2)")
    parser.add_argument("--width", type=int, default=128, help="GPT-2 width (default 128)")
    parser.add_argument("--only", nargs="+", default=None, help="shine optimizers (default: all)")
    parser.add_argument("--nonfinite", default="ignore", help="shine's non-finite check (default: ignore)")
    args = parser.parse_args(argv)
    if args.form == "gpu":
        tensorlist.PER_TENSOR_DEVICES = frozenset()
        engine.FOREACH_GROUP_NUMEL = {}
    params = bench.make_params(bench.gpt2_shapes(args.layers, args.width, vocab=1000, context=128), torch.float32)
    rows = {"torch AdamW(foreach=True)": lambda: torch.optim.AdamW(params, lr=1e-3, foreach=True),
            "torch AdamW(fused=True)": lambda: torch.optim.AdamW(params, lr=1e-3, fused=True)}
    for name in args.only or list_optimizers():
        rows[name] = (lambda n: lambda: create_optimizer(params, n, fused=False, nonfinite=args.nonfinite))(name)
    print(f"{len(params)} tensors, {sum(p.numel() for p in params):,} parameters, {args.form} form, "
          f"multi-tensor path, nonfinite={args.nonfinite}")
    print(f"{'optimizer':28s} {'operations':>10s} {'launches':>9s} {'syncs':>6s} {'words/param':>12s}")
    for name, build in rows.items():
        ops, launches, syncs, words = count(build, params)
        print(f"{name:28s} {ops:10d} {launches:9d} {syncs:6d} {words:12.1f}")


if __name__ == "__main__":
    main()
