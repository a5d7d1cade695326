"""shine's MARS, CAME and cautious AdamW next to other implementations, on the same numbers.

Each case builds the same float64 parameters (a matrix, a vector, a conv kernel, a tall matrix),
feeds shine's reference path and each installed implementation the same gradients for a number
of steps, and prints, per parameter kind, the largest difference of the parameters afterwards
relative to their largest magnitude. 1e-15 means the same algorithm (float64 rounding); anything
larger is a difference of algorithm, which ``benchmarks/README.md`` explains for each library.

Implementations compared where installed: pytorch-optimizer (``MARS``, ``CAME``), came-pytorch
(``CAME``), timm (``Mars``, ``AdamWLegacy(caution=True)``; imported without ``timm/__init__``,
which needs torchvision) and, given ``--official-mars PATH``, the official MARS optimizer file
(``MARS/optimizers/mars.py`` of a checkout of github.com/AGI-Arena/MARS; not shipped here).

    python benchmarks/side_by_side.py --official-mars ~/MARS/MARS/optimizers/mars.py
"""
from __future__ import annotations

import argparse
import importlib.util
import warnings
from typing import Any, Callable

import torch

import shine
from shine.bench import _timm_module

KINDS = {"matrix": (32, 24), "vector": (24,), "conv": (8, 4, 3, 3), "tall": (40, 8)}
Make = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


def trajectory(make: Make, steps: int, seed: int = 0) -> list[torch.Tensor]:
    """The parameters after ``steps`` steps of ``make``'s optimizer on fixed random gradients."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in KINDS.values()]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in KINDS.values()] for _ in range(steps)]
    opt = make(params)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params]


def relative_differences(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> list[float]:
    return [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours, theirs)]


def others(official_mars: str | None) -> dict[str, object]:
    """The other libraries' modules that are installed (name -> module)."""
    found: dict[str, object] = {}
    for name, load in (("pytorch-optimizer", lambda: __import__("pytorch_optimizer")),
                       ("came-pytorch", lambda: __import__("came_pytorch")),
                       ("timm", lambda: (_timm_module("mars"), _timm_module("adamw")))):
        try:
            module = load()
        except Exception:  # not installed, or broken: that column stays empty
            continue
        if module is not None and module != (None, None):
            found[name] = module
    if official_mars:
        spec = importlib.util.spec_from_file_location("official_mars", official_mars)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        found["official MARS"] = module
    return found


def cases(libs: dict[str, object]) -> list[tuple[str, Make, dict[str, Make]]]:
    """(case, shine's optimizer, {implementation: its optimizer}) with the same hyperparameters."""
    po, came, timm, official = (libs.get(k) for k in ("pytorch-optimizer", "came-pytorch", "timm", "official MARS"))
    out = []

    def add(case: str, ours: Make, **theirs: Make | None) -> None:
        theirs = {name.replace("_", "-"): make for name, make in theirs.items() if make is not None}
        if theirs:
            out.append((case, ours, theirs))

    def timm_mars(ps, lr: float, **kw: Any):
        """timm's Mars with shine's (the reference's) betas, 1-D betas and 1-D lr (timm's defaults
        differ: betas (0.9, 0.99) for every tensor, and a 1-D lr relative to lr)."""
        return timm[0].Mars(ps, lr=lr, betas=(0.95, 0.99), betas_1d=(0.9, 0.95), lr_1d_factor=3e-3 / lr, **kw)

    for wd in (0.0, 0.1):
        add(f"MARS-AdamW, weight_decay={wd}", lambda ps, wd=wd: shine.MARS(ps, lr=3e-3, weight_decay=wd, foreach=False),
            official_MARS=official and (lambda ps, wd=wd: official.MARS(ps, lr=3e-3, weight_decay=wd)),
            pytorch_optimizer=po and (lambda ps, wd=wd: po.MARS(ps, lr=3e-3, weight_decay=wd)),
            timm=timm and (lambda ps, wd=wd: timm_mars(ps, 3e-3, weight_decay=wd)))
    add("MARS-Lion, weight_decay=0.1",
        lambda ps: shine.MARS(ps, lr=3e-4, mars_type="lion", weight_decay=0.1, foreach=False),
        official_MARS=official and (lambda ps: official.MARS(ps, lr=3e-4, mars_type="mars-lion", weight_decay=0.1)),
        pytorch_optimizer=po and (lambda ps: po.MARS(ps, lr=3e-4, mars_type="lion", weight_decay=0.1)),
        timm=timm and (lambda ps: timm_mars(ps, 3e-4, mars_type="lion", weight_decay=0.1)))
    add("MARS-AdamW, optimize_1d=True, weight_decay=0.1",
        lambda ps: shine.MARS(ps, lr=3e-3, optimize_1d=True, weight_decay=0.1, foreach=False),
        official_MARS=official and (lambda ps: official.MARS(ps, lr=3e-3, optimize_1d=True, weight_decay=0.1)),
        pytorch_optimizer=po and (lambda ps: po.MARS(ps, lr=3e-3, optimize_1d=True, weight_decay=0.1)),
        timm=timm and (lambda ps: timm_mars(ps, 3e-3, optimize_1d=True, weight_decay=0.1)))
    add("C-MARS-AdamW", lambda ps: shine.MARS(ps, lr=3e-3, cautious=True, foreach=False),
        pytorch_optimizer=po and (lambda ps: po.MARS(ps, lr=3e-3, cautious=True)),
        timm=timm and (lambda ps: timm_mars(ps, 3e-3, caution=True)))
    for wd in (0.0, 0.1):  # factor_conv="last2": the reference factoring (shine's default flattens conv kernels)
        add(f"CAME, weight_decay={wd}",
            lambda ps, wd=wd: shine.CAME(ps, lr=2e-4, weight_decay=wd, factor_conv="last2", foreach=False),
            came_pytorch=came and (lambda ps, wd=wd: came.CAME(ps, lr=2e-4, weight_decay=wd, betas=(0.9, 0.999, 0.9999),
                                                               eps=(1e-30, 1e-16))),
            pytorch_optimizer=po and (lambda ps, wd=wd: po.CAME(ps, lr=2e-4, weight_decay=wd)))
    add("C-AdamW, weight_decay=0.01", lambda ps: shine.AdamW(ps, lr=1e-3, cautious=True, foreach=False),
        timm=timm and (lambda ps: timm[1].AdamWLegacy(ps, lr=1e-3, weight_decay=0.01, caution=True)))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="steps per trajectory (default 10)")
    parser.add_argument("--official-mars", metavar="PATH", help="the official MARS/optimizers/mars.py")
    args = parser.parse_args(argv)
    libs = others(args.official_mars)
    if not libs:
        print("none of pytorch-optimizer, came-pytorch or timm is installed, and no --official-mars: nothing to compare")
        return
    kinds = "  ".join(f"{k} {tuple(s)}".ljust(18) for k, s in KINDS.items())
    print(f"largest |shine - other| / largest |other| after {args.steps} steps, float64, per parameter kind")
    print(f"{'case':46s} {'other':20s} {kinds}")
    for case, ours, theirs in cases(libs):
        mine = trajectory(ours, args.steps)
        for name, make in theirs.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                other = trajectory(make, args.steps)
            diffs = "  ".join(f"{d:.1e}".ljust(18) for d in relative_differences(mine, other))
            print(f"{case:46s} {name:20s} {diffs}")


if __name__ == "__main__":
    main()
