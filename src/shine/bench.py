"""``shine bench``: time one optimizer step on a GPT-2-shaped parameter set, for every optimizer and path.

Everything is timed in ONE process, against ``torch.optim.AdamW(fused=True)`` timed in the same
run: each timed step of a row alternates with a fused-AdamW step, and the ratio is the quotient
of the two medians, so it survives a shared, noisy machine better than absolute times. For each row it prints the median step time in ns per
parameter, the effective bandwidth (the bytes the step must move at least: read p, g and the
state, write p and the state) as GB/s and as a fraction of a measured in-place bandwidth, the
optimizer-state bytes per parameter (:func:`shine.optimizer_state_bytes`) and the first-step
time (for ``fused`` that is the compile, cached on disk by inductor: see
``benchmarks/README.md``). Where pytorch-optimizer, timm or came-pytorch are installed, their
MARS, CAME and cautious AdamW are timed beside shine's. A JSON of every figure is written.

    python benchmarks/step_speed.py                 # GPT-2 small, every optimizer and path
    shine bench --scale medium --paths fused foreach --only adamw came
"""
from __future__ import annotations

import argparse
import gc
import importlib
import importlib.machinery
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import types
import warnings
from collections.abc import Sequence
from typing import Any, Callable

import torch

from .engine import PATHS as ENGINE_PATHS

HELP = "time optimizer steps on GPT-2-shaped parameters (ns/param, GB/s, state bytes, ratio to fused AdamW)"

#: GPT-2 sizes: (layers, width). Vocabulary 50257, context 1024, tied embeddings.
SCALES = {"tiny": (2, 128), "small": (12, 768), "medium": (24, 1024), "large": (36, 1280), "xl": (48, 1600)}
PATHS = ENGINE_PATHS[::-1]  # the table's order: fused first
#: The shine optimizers timed (registry names; the cautious MARS-Lion, MARS-Shampoo and MARS-CAME
#: are left out to keep a run short: C-MARS-AdamW times caution on MARS).
SHINE = ("adamw", "c-adamw", "lion", "c-lion", "mars-adamw", "c-mars-adamw", "mars-lion", "mars-shampoo", "came",
         "c-came", "mars-came")
#: The ``max_grad_norm`` of the clipping rows. It sits above the norm of the benchmark's gradients
#: (about 11 for GPT-2 small, 40 for xl), because the rows share their gradients and
#: ``clip_grad_norm_`` writes them; a clip that binds costs the same.
CLIP = 100.0
#: Extra fused rows: the cost of the non-finite check, clipping inside the step (whose norm is
#: also the non-finite check), and bf16 state (stochastic rounding, its default, and to nearest).
EXTRAS = {
    "adamw nonfinite=ignore": ("adamw", {"nonfinite": "ignore"}),
    "adamw max_grad_norm": ("adamw", {"max_grad_norm": CLIP}),
    "mars-adamw max_grad_norm": ("mars-adamw", {"max_grad_norm": CLIP}),
    "came max_grad_norm": ("came", {"max_grad_norm": CLIP}),
    "mars-adamw nonfinite=ignore": ("mars-adamw", {"nonfinite": "ignore"}),
    "came nonfinite=ignore": ("came", {"nonfinite": "ignore"}),
    "adamw state=bf16": ("adamw", {"state_dtype": torch.bfloat16}),
    "adamw state=bf16 nearest": ("adamw", {"state_dtype": torch.bfloat16, "stochastic_rounding": False}),
    "mars-adamw state=bf16": ("mars-adamw", {"state_dtype": torch.bfloat16}),
    "came state=bf16": ("came", {"state_dtype": torch.bfloat16}),
}


def gpt2_shapes(n_layer: int, width: int, vocab: int = 50257, context: int = 1024) -> list[tuple[int, ...]]:
    """The parameter shapes of a GPT-2 (HF layout: Conv1D weights are [in, out]; lm_head tied to wte)."""
    d = width
    shapes: list[tuple[int, ...]] = [(vocab, d), (context, d)]
    for _ in range(n_layer):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,),  # ln_1, attn.c_attn, attn.c_proj
                   (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]  # ln_2, mlp.c_fc, mlp.c_proj
    return shapes + [(d,), (d,)]  # ln_f


def make_params(shapes, dtype: torch.dtype, seed: int = 0, device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """Parameters with gradients, drawn on the CPU (the same numbers on every device) and moved to ``device``."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes:
        p = (0.02 * torch.randn(s, generator=gen)).to(device, dtype).requires_grad_(True)
        p.grad = (1e-3 * torch.randn(s, generator=gen)).to(device, dtype)
        params.append(p)
    return params


def clock(device: torch.device) -> Callable[[], float]:
    """A wall clock that first waits for the device's queued work (kernels run asynchronously on
    accelerators, so a plain clock would time their launches)."""
    if device.type == "cpu":
        return time.perf_counter
    module = getattr(torch, device.type)

    def synchronized() -> float:
        module.synchronize(device)
        return time.perf_counter()
    return synchronized


def in_place_bandwidth(n: int, repeat: int = 5, device: torch.device = torch.device("cpu")) -> float:
    """GB/s (bytes read + written) of the faster of two in-place fp32 kernels over ``n`` elements
    on ``device``, ``x *= 1`` and ``x += y``, each the median of ``repeat``.

    In place, as an optimizer step writes: a copy into another buffer can cost more than the
    bytes it must move (on the 2-core VM, 35 GB/s against 53-55 for these two in the same
    process, and torch's fused AdamW 55-57: the CPU reads a destination line before writing it).
    """
    x, y = torch.randn(n, device=device), torch.randn(n, device=device)
    now = clock(device)

    def rate(kernel: Callable[[], Any], words: int) -> float:
        kernel()
        times = []
        for _ in range(repeat):
            t = now()
            kernel()
            times.append(now() - t)
        return 4 * words * n / statistics.median(times) / 1e9
    return max(rate(lambda: x.mul_(1.0), 2), rate(lambda: x.add_(y), 3))


def _timm_module(name: str):
    """Import ``timm.optim.<name>`` without ``timm/__init__`` (which needs torchvision)."""
    if "timm" not in sys.modules:
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.origin is None:
            return None
        root = os.path.dirname(spec.origin)
        for pkg, path in (("timm", root), ("timm.optim", os.path.join(root, "optim"))):
            module = types.ModuleType(pkg)
            module.__path__ = [path]
            module.__spec__ = importlib.machinery.ModuleSpec(pkg, None, is_package=True)
            module.__spec__.submodule_search_locations = [path]
            sys.modules[pkg] = module
    return importlib.import_module(f"timm.optim.{name}")


def external_optimizers() -> dict[str, Callable[[list], torch.optim.Optimizer]]:
    """Other libraries' MARS / CAME / cautious AdamW that are installed here, at their defaults."""
    found: dict[str, Callable] = {}
    try:
        import pytorch_optimizer as po
        found["pytorch-optimizer MARS"] = lambda ps: po.MARS(ps, lr=3e-3)
        found["pytorch-optimizer CAME"] = lambda ps: po.CAME(ps, lr=2e-4)
    except ImportError:
        pass
    try:
        import came_pytorch
        found["came-pytorch CAME"] = lambda ps: came_pytorch.CAME(ps, lr=2e-4, betas=(0.9, 0.999, 0.9999),
                                                                  eps=(1e-30, 1e-16))
    except ImportError:
        pass
    try:
        mars, adamw = _timm_module("mars"), _timm_module("adamw")
        if mars is not None:
            found["timm Mars"] = lambda ps: mars.Mars(ps, lr=3e-3)
            found["timm C-AdamW"] = lambda ps: adamw.AdamWLegacy(ps, lr=1e-3, caution=True)
    except Exception as err:  # a broken install must not stop the benchmark
        warnings.warn(f"timm optimizers unavailable: {err}")
    return found


def _inductor_cache_files() -> int | None:
    """How many files inductor's on-disk cache holds (0: this run's compiles are all cold);
    ``None`` where this torch keeps it elsewhere."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
    except ImportError:
        return None
    return sum(len(files) for _, _, files in os.walk(cache_dir()))


def _min_bytes(params, state_bytes: int) -> int:
    """Bytes of one pass over what a step touches: read and write p and the state, read g. The
    floor of a one-pass step (AdamW, Lion); a step with a read-only pre-pass (the non-finite
    check, caution's kept fraction, MARS's clip, clipping) or several passes (CAME) moves more,
    so its GB/s by this count understate the bandwidth it reaches."""
    pbytes = sum(p.numel() * p.element_size() for p in params)
    return 2 * pbytes + pbytes + 2 * state_bytes


class ClippedTorchAdamW(torch.optim.AdamW):
    """``torch.nn.utils.clip_grad_norm_`` then ``torch.optim.AdamW(fused=True)``: the step that
    shine's ``max_grad_norm`` rows replace."""

    def __init__(self, params, max_norm: float, **kwargs: Any):
        super().__init__(params, fused=True, **kwargs)
        self.max_norm = max_norm

    def step(self, closure=None):
        torch.nn.utils.clip_grad_norm_([p for g in self.param_groups for p in g["params"]], self.max_norm)
        return super().step(closure)


def time_optimizer(build: Callable[[], torch.optim.Optimizer], params, steps: int,
                   baseline: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """First-step time (that includes a compile) and the median of ``steps`` further steps.

    With a ``baseline`` optimizer, each timed step alternates with one baseline step, and the
    row also gets ``baseline_median_s``: the ratio of the two medians then compares steps
    taken under the same load, which a shared machine needs.
    """
    from .registry import optimizer_state_bytes
    now = clock(params[0].device)
    opt = build()
    t = now()
    opt.step()
    first = now() - t
    times, base_times = [], []
    for _ in range(steps):
        if baseline is not None:
            t = now()
            baseline.step()
            base_times.append(now() - t)
        t = now()
        opt.step()
        times.append(now() - t)
    state = optimizer_state_bytes(opt)
    del opt
    gc.collect()
    result = {"first_step_s": first, "median_s": statistics.median(times), "min_s": min(times),
              "state_bytes": state, "min_bytes": _min_bytes(params, state)}
    if base_times:
        result["baseline_median_s"] = statistics.median(base_times)
        result["baseline_min_s"] = min(base_times)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scale", choices=list(SCALES), default="small", help="GPT-2 size (default: small)")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS), help="execution paths")
    parser.add_argument("--only", nargs="+", metavar="NAME", choices=SHINE, default=None,
                        help=f"shine optimizers to time (default: all of {', '.join(SHINE)})")
    parser.add_argument("--steps", type=int, default=7, help="timed steps per row (median; default 7)")
    parser.add_argument("--param-dtype", choices=("fp32", "bf16"), default="fp32", help="parameter dtype")
    parser.add_argument("--no-external", action="store_true", help="skip other libraries' optimizers")
    parser.add_argument("--no-extras", action="store_true",
                        help="skip the nonfinite='ignore', max_grad_norm and state_dtype=bf16 fused rows")
    parser.add_argument("--device", default="auto",
                        help="where the parameters live: cpu, cuda, cuda:N, ..., or auto (cuda when present; default)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all usable cores)")
    parser.add_argument("--json", default="step_speed.json", help="where to write the figures ('' for none)")


def run(args: argparse.Namespace) -> int:
    from .registry import create_optimizer

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise SystemExit(f"shine bench: --device {args.device}: not a device (cpu, cuda, cuda:N, ...)") from None
    module = getattr(torch, device.type, None)
    if device.type != "cpu" and not (module is not None and hasattr(module, "is_available") and module.is_available()):
        raise SystemExit(f"shine bench: --device {args.device}: no {device.type} device is available here")
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.param_dtype]
    shapes = gpt2_shapes(*SCALES[args.scale])
    params = make_params(shapes, dtype, device=device)
    n = sum(p.numel() for p in params)
    bandwidth = in_place_bandwidth(n, device=device)
    cache_files = _inductor_cache_files()
    device_name = "cpu" if device.type == "cpu" else module.get_device_name(device)
    where = f"{threads} threads" if device.type == "cpu" else device_name
    print(f"GPT-2 {args.scale}: {n / 1e6:.1f}M parameters in {len(params)} tensors, {args.param_dtype}; "
          f"torch {torch.__version__}, {where}; in-place bandwidth {bandwidth:.1f} GB/s", flush=True)

    base_opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
    base_opt.step()

    def timed(build: Callable[[], torch.optim.Optimizer]) -> dict[str, Any]:
        return time_optimizer(build, params, args.steps, baseline=base_opt)

    rows: list[dict[str, Any]] = []
    header = (f"{'optimizer':<30} {'path':<10} {'ns/param':>9} {'GB/s':>6} {'%bw':>6} {'state B/p':>9} "
              f"{'vs fused AdamW':>14} {'(min/min)':>9} {'1st step s':>10}")
    print(header)
    print("-" * len(header))

    def emit(name: str, path: str, r: dict[str, Any]) -> None:
        row = {"optimizer": name, "path": path, "ns_per_param": r["median_s"] * 1e9 / n,
               "gb_per_s": r["min_bytes"] / r["median_s"] / 1e9, "state_bytes_per_param": r["state_bytes"] / n,
               "ratio_to_fused_adamw": r["median_s"] / r["baseline_median_s"],
               "min_ratio_to_fused_adamw": r["min_s"] / r["baseline_min_s"], **r}
        row["bandwidth_fraction"] = row["gb_per_s"] / bandwidth
        rows.append(row)
        print(f"{name:<30} {path:<10} {row['ns_per_param']:>9.2f} {row['gb_per_s']:>6.1f} "
              f"{100 * row['bandwidth_fraction']:>5.0f}% {row['state_bytes_per_param']:>9.2f} "
              f"{row['ratio_to_fused_adamw']:>14.2f} {row['min_ratio_to_fused_adamw']:>9.2f} "
              f"{r['first_step_s']:>10.2f}", flush=True)

    emit("torch AdamW(fused=True)", "torch", timed(lambda: torch.optim.AdamW(params, lr=1e-3, fused=True)))
    emit("torch AdamW(foreach=True)", "torch", timed(lambda: torch.optim.AdamW(params, lr=1e-3, foreach=True)))
    emit("torch clip_grad_norm_+AdamW", "torch", timed(lambda: ClippedTorchAdamW(params, CLIP, lr=1e-3)))
    flags = {"fused": dict(fused=True), "foreach": dict(fused=False), "per_tensor": dict(fused=False, foreach=False)}
    for name in args.only or SHINE:
        for path in args.paths:
            emit(name, path, timed(lambda: create_optimizer(params, name, **flags[path])))
        if "fused" in args.paths:
            emit(name, "auto", timed(lambda: create_optimizer(params, name)))
    if not args.no_extras and "fused" in args.paths:
        for label, (name, extra) in EXTRAS.items():
            if args.only and name not in args.only:
                continue
            emit(label, "fused", timed(lambda: create_optimizer(params, name, **extra, fused=True)))
    if not args.no_external:
        for label, build in external_optimizers().items():
            try:
                emit(label, "theirs", timed(lambda: build(params)))
            except Exception as err:  # report and go on
                print(f"{label:<30} failed: {type(err).__name__}: {err}")
    print("vs fused AdamW: median step over the median torch.optim.AdamW(fused=True) step, the two "
          "alternating step by step; (min/min): fastest over fastest, less sensitive to other load")
    print("GB/s, %bw: by the bytes of one pass (read and write p and state, read g), which steps with a "
          "pre-pass or several passes exceed; %bw against the in-place bandwidth measured once at the start")
    print(f"1st step s: includes compiling for the first row that compiles each graph ({cache_files} files "
          f"in the inductor cache at the start); later rows reuse the graphs")
    if args.param_dtype == "bf16":
        print("bf16 parameters: torch's fused AdamW keeps bf16 state, shine fp32 unless state_dtype (state B/p)")
    if args.json:
        meta = {"scale": args.scale, "params": n, "tensors": len(params), "param_dtype": args.param_dtype,
                "threads": threads, "torch": torch.__version__, "machine": platform.machine(),
                "device": device_name,
                "in_place_gb_per_s": bandwidth, "steps": args.steps,
                "inductor_cache_files_at_start": cache_files,
                "fused_adamw_ns_per_param": statistics.median(r["baseline_median_s"] for r in rows) * 1e9 / n}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``benchmarks/step_speed.py``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="shine bench", description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv))
