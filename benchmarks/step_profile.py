"""Where a CUDA optimizer step's time goes: wall time against the time its kernels run.

An optimizer step on a GPU is memory-bound only if its kernels keep the device busy; when the
host spends longer launching them (Python, guards, one launch per tensor), the step is
host-bound and the kernels' time is not what limits it. For each optimizer this prints, on
GPT-2-shaped parameters, the median wall time of a step, the summed device time of its kernels
(torch.profiler), the number of kernels launched, and the bytes the step must move over that
kernel time (effective bandwidth while the kernels run). ``--per-tensor-form`` also times each multi-tensor
row in the CPU's form (per-tensor kernels for caution's mask and CAME's passes), to weigh the
GPU's multi-tensor form against it in one process; ``--launch-per-scale`` each cautious, MARS and
CAME multi-tensor row as that form was before its per-tensor scales went to the host as numbers
and CAME's matrices of one shape in stacks; ``--single-fused`` each fused row with one tensor per
compiled call (``engine.FUSED_GROUP_SIZE`` 1), as before groups.
``--host N`` also prints, per row, the N host-side operations that took the most self CPU time
(where a host-bound step spends it); ``--kernels N`` the N kernels that took the most device time.
``--small-first`` first steps each optimizer on two small tensors, so that its compiled graphs are
planned for their sizes, as a model's first tensors (or the CUDA tests) would plan them.

    python benchmarks/step_profile.py --only adamw came --scale small --host 12
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import statistics
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from shine import bench, create_optimizer, engine, optimizer_state_bytes, tensorlist  # noqa: E402
from shine.rules import came  # noqa: E402


@contextlib.contextmanager
def variant(form: str):
    """``"per-tensor form"``: the multi-tensor path in the form the CPU takes (per-tensor kernels
    for caution's mask and CAME's passes; ``tensorlist.PER_TENSOR_DEVICES``). ``"single"``: the
    fused path with one tensor per compiled call (``engine.FUSED_GROUP_SIZE`` 1). ``"launch per
    scale"``: the GPU form without its per-tensor scales as host numbers and CAME's stacks
    (``tensorlist.HOST_SCALARS``, ``rules.came.STACKED``, ``engine.FACTORED_GROUP_NUMEL`` 2^24), as
    it was before them. ``""``: as is."""
    saved = (tensorlist.PER_TENSOR_DEVICES, engine.FUSED_GROUP_SIZE, tensorlist.HOST_SCALARS, came.STACKED,
             engine.FACTORED_GROUP_NUMEL)
    if form == "per-tensor form":
        tensorlist.PER_TENSOR_DEVICES = saved[0] | {"cuda"}
    elif form == "single":
        engine.FUSED_GROUP_SIZE = 1
    elif form == "launch per scale":
        tensorlist.HOST_SCALARS, came.STACKED, engine.FACTORED_GROUP_NUMEL = False, False, 1 << 24
    try:
        yield
    finally:
        (tensorlist.PER_TENSOR_DEVICES, engine.FUSED_GROUP_SIZE, tensorlist.HOST_SCALARS, came.STACKED,
         engine.FACTORED_GROUP_NUMEL) = saved


def profile_step(build, params, steps: int = 10, host: int = 0, top_kernels: int = 0) -> dict[str, float]:
    opt = build()
    now = bench.clock(params[0].device)
    for _ in range(3):  # compile and warm up
        opt.step()
    walls = []
    for _ in range(steps):
        t = now()
        opt.step()
        walls.append(now() - t)
    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if host else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            opt.step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    state = optimizer_state_bytes(opt)
    return {"wall_s": statistics.median(walls), "kernel_s": sum(e.time_range.elapsed_us() for e in kernels) / 1e6 / steps,
            "kernels": len(kernels) / steps, "min_bytes": bench._min_bytes(params, state),
            "host_table": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=host) if host else "",
            "kernel_table": _kernel_table(kernels, steps, top_kernels)}


def _kernel_table(kernels, steps: int, top: int) -> str:
    """The ``top`` kernels by summed device time: microseconds and launches per step, and name."""
    time_us, launches = collections.Counter(), collections.Counter()
    for e in kernels:
        time_us[e.name] += e.time_range.elapsed_us()
        launches[e.name] += 1
    return "".join(f"    {us / steps:>9.0f} us {launches[name] / steps:>5.1f}x  {name[:90]}\n"
                   for name, us in time_us.most_common(top))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=list(bench.SCALES), default="small")
    parser.add_argument("--only", nargs="+", default=["adamw", "c-adamw", "lion", "mars-adamw", "came"])
    parser.add_argument("--paths", nargs="+", default=["fused", "foreach"], choices=["fused", "foreach"])
    parser.add_argument("--host", type=int, default=0, metavar="N", help="print each row's N costliest host operations")
    parser.add_argument("--kernels", type=int, default=0, metavar="N",
                        help="print each row's N kernels that took the most device time")
    parser.add_argument("--small-first", action="store_true",
                        help="compile each optimizer on two small tensors before timing it")
    parser.add_argument("--per-tensor-form", action="store_true",
                        help="also time the cautious and CAME foreach rows in the CPU's per-tensor form")
    parser.add_argument("--launch-per-scale", action="store_true",
                        help="also time the cautious, MARS and CAME foreach rows without per-tensor scales as host "
                             "numbers and CAME's stacks (the GPU form before them)")
    parser.add_argument("--single-fused", action="store_true",
                        help="also time each fused row with one tensor per compiled call")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("step_profile.py needs a CUDA device")
    params = bench.make_params(bench.gpt2_shapes(*bench.SCALES[args.scale]), torch.float32, device="cuda")
    if args.small_first:
        small = bench.make_params([(8192,), (96, 96)], torch.float32, device="cuda")
        for name in args.only:
            create_optimizer(small, name, fused=True).step()
    print(f"{'optimizer':<26} {'path':<8} {'wall us':>8} {'kernel us':>9} {'kernels':>7} {'GB/s in kernels':>15}")
    rows = [("torch AdamW(fused=True)", "torch", "", lambda: torch.optim.AdamW(params, lr=1e-3, fused=True))]
    for name in args.only:
        for path in args.paths:
            build = lambda name=name, path=path: create_optimizer(params, name, fused=path == "fused")  # noqa: E731
            rows.append((name, path, "", build))
            if path == "foreach" and args.per_tensor_form and ("came" in name or name.startswith("c-")):
                rows.append((f"{name} (per-tensor form)", path, "per-tensor form", build))
            scaled = "came" in name or "mars" in name or name.startswith("c-")
            if path == "foreach" and args.launch_per_scale and scaled:
                rows.append((f"{name} (launch per scale)", path, "launch per scale", build))
            if path == "fused" and args.single_fused:
                rows.append((f"{name} (single)", path, "single", build))
    for label, path, form, build in rows:
        with variant(form):
            r = profile_step(build, params, host=args.host, top_kernels=args.kernels)
        print(f"{label:<26} {path:<8} {r['wall_s'] * 1e6:>8.0f} {r['kernel_s'] * 1e6:>9.0f} {r['kernels']:>7.0f} "
              f"{r['min_bytes'] / r['kernel_s'] / 1e9:>15.0f}", flush=True)
        print(r["kernel_table"] + r["host_table"], end="\n" if r["host_table"] else "", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
