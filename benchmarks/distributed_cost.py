"""Cost of the ways shine can compute whole-tensor quantities on FSDP2 (Shard(0) DTensor) parameters.

    python benchmarks/distributed_cost.py [--world 2]

CPU, gloo, 127.0.0.1; one thread per rank. Prints the median wall time per call (ms) on rank 0 of:
- Newton-Schulz (MARS-Shampoo): DTensor matmuls on the shards vs gather once + iterate whole + keep the shard;
- CAME factored step: DTensor reductions vs gathering gradient and momentum whole vs the local
  shards with their sums over rows completed by ``ShardSums`` (what shine does);
- a mean over an unevenly sharded dim: ``mean`` vs ``sum / n``;
- AdamW over many tensors: DTensor foreach vs the same kernels on the local shards;
- whole optimizer steps on 64 sharded matrices, for each optimizer kind.
"""
from __future__ import annotations

import argparse
import socket
import statistics
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _time(fn, reps=5):
    fn()
    times = []
    for _ in range(reps):
        dist.barrier()
        t = time.perf_counter()
        fn()
        dist.barrier()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def worker(rank, world, port):
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from shine import rules
    from shine.distributed import ShardSums, whole_tensor, reduced_zeros
    mesh = init_device_mesh("cpu", (world,))
    say = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    torch.manual_seed(0)

    say("newton-schulz (5 steps, fp32)        shape        dtensor-ms  gather-ms  one-process-ms")
    for shape in [(256, 256), (1024, 1024), (2048, 512), (1023, 4096)]:
        m = distribute_tensor(torch.randn(shape), mesh, [Shard(0)])
        dt = _time(lambda: rules.newton_schulz5(m))
        ga = _time(lambda: whole_tensor(rules.newton_schulz5)(m))
        full = m.full_tensor()
        single = _time(lambda: rules.newton_schulz5(full))
        say(f"{'':38s}{str(shape):13s}{dt:10.1f}{ga:11.1f}{single:15.1f}")

    say("came factored step                   shape        dtensor-ms  gather-ms  local-shards-ms")
    for shape in [(1024, 1024), (2047, 2048)]:
        p = distribute_tensor(torch.zeros(shape), mesh, [Shard(0)])
        g = distribute_tensor(torch.randn(shape), mesh, [Shard(0)])
        view = shape
        st = [torch.zeros_like(p), reduced_zeros(p, view, -1, torch.float32), reduced_zeros(p, view, -2, torch.float32),
              reduced_zeros(p, view, -1, torch.float32), reduced_zeros(p, view, -2, torch.float32)]
        kw = dict(beta1=0.9, beta2=0.999, beta3=0.9999, eps1=1e-30, eps2=1e-16, clip_threshold=1.0)
        dt = _time(lambda: rules.formed(rules.came_factored(g, *st, **kw)))
        whole = [t.full_tensor() for t in st]

        def gathered():  # what giving each rank whole tensors costs: gather grad + momentum, step, keep shard
            x = g.full_tensor()
            m = st[0].full_tensor()
            u = rules.formed(rules.came_factored(x, m, *whole[1:], **kw))
            return distribute_tensor(u, mesh, [Shard(0)], src_data_rank=None)
        ga = _time(gathered)
        local = [t.to_local() for t in st]
        lo = _time(lambda: rules.formed(rules.came_factored(g.to_local(), *local, **kw, across=ShardSums(g))))
        say(f"{'':38s}{str(shape):13s}{dt:10.1f}{ga:11.1f}{lo:17.1f}")

    say("mean over a sharded dim (2047x2048)   mean-ms  sum/n-ms")
    x = distribute_tensor(torch.randn(2047, 2048), mesh, [Shard(0)])
    a = _time(lambda: x.mean(dim=0).full_tensor())
    b = _time(lambda: (x.sum(dim=0) / x.shape[0]).full_tensor())
    say(f"{'':38s}{a:7.1f}{b:10.1f}")

    say("adamw foreach, 64 tensors 256x256     dtensor-ms  local-shards-ms")
    ps = [distribute_tensor(torch.randn(256, 256), mesh, [Shard(0)]) for _ in range(64)]
    gs = [torch.randn_like(q) for q in ps]
    ms = [torch.zeros_like(q) for q in ps]
    vs = [torch.zeros_like(q) for q in ps]
    from shine.tensorlist import TensorList
    loc = lambda ts: TensorList(t.to_local() for t in ts)

    def step(P, G, M, V):
        u = rules.adamw(G, M, V, beta1=0.9, beta2=0.999, eps=1e-8, bias_correction1=0.1, bias_correction2_sqrt=0.0316)
        rules.apply_update(P, u, lr=1e-3, decay=1.0)
    dt = _time(lambda: step(TensorList(ps), TensorList(gs), TensorList(ms), TensorList(vs)))
    lo = _time(lambda: step(loc(ps), loc(gs), loc(ms), loc(vs)))
    say(f"{'':38s}{dt:10.1f}{lo:17.1f}")

    import shine
    say("optimizer step, 64 tensors 256x256    ms")
    for name in ("adamw", "c-adamw", "lion", "c-lion", "mars-adamw", "c-mars-adamw", "mars-lion", "came"):
        params = [torch.nn.Parameter(distribute_tensor(torch.randn(256, 256), mesh, [Shard(0)])) for _ in range(64)]
        for q in params:
            q.grad = distribute_tensor(torch.randn(256, 256), mesh, [Shard(0)])
        opt = shine.create_optimizer(params, name, lr=1e-3)
        say(f"{'':38s}{name:14s}{_time(opt.step):8.1f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--world", type=int, default=2)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(args.world, port), nprocs=args.world)
