"""Worker side of the distributed tests: a small model, the training loops, and a process launcher.

Everything runs on CPU with the gloo backend, on 127.0.0.1 only. ``launch`` spawns
``world`` processes once and runs one job in each (a job trains MANY optimizer
configurations, so the cost of starting a process group is paid once per test
file, not once per optimizer). Rank 0's return value comes back to the caller.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import shine

shine.engine.FUSED_MIN_TENSOR_NUMEL = 2  # the shapes here are tiny: the fused cases compile them all
shine.engine.FUSED_GROUP_SIZE = 2  # groups of two, a short one filled up (eight compile for longer)
STEPS = 5
BATCH = 12          # divisible by 1, 2, 3, 4 ranks: every rank gets an equal slice
LR = {"adamw": 1e-2, "lion": 3e-3, "mars-adamw": 1e-2, "mars-lion": 3e-3, "mars-shampoo": 2e-2, "came": 1e-2,
      "mars-came": 1e-2}
WEIGHT_DECAY = 0.1
CLIP = 0.05  # max_grad_norm of the -clip configurations


class Net(nn.Module):
    """Shapes that do not divide by 2 ranks: conv 3x2x3x3, matrices 5x3, 7x5 and 1x7, biases 3, 5, 7, 1.

    Sharded on dim 0 over 2 ranks the 1x7 matrix and the bias of 1 leave one rank an empty shard.
    """

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc1 = nn.Linear(3, 5)
        self.fc2 = nn.Linear(5, 7)
        self.out = nn.Linear(7, 1)

    def forward(self, x):
        h = self.conv(x).flatten(1)
        return self.out(torch.tanh(self.fc2(torch.tanh(self.fc1(h)))))


def batch(step: int, rank: int = 0, world: int = 1):
    """The global batch of ``step`` (same on every rank), and this rank's equal slice of it."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(BATCH, 2, 3, 3, generator=g)
    y = torch.randn(BATCH, 1, generator=g)
    n = BATCH // world
    return x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]


def new_model() -> Net:
    torch.manual_seed(0)
    return Net()


# ---- optimizer configurations -------------------------------------------------------
def configs() -> dict[str, tuple[str, dict[str, Any]]]:
    """label -> (registry name, extra keyword arguments): every registered optimizer, plus
    MARS and MARS-CAME exact mode, the CAME reference conv factoring, global gradient clipping (labels
    ending in ``-clip``; their bound is below this model's gradient norms, so it clips) and a MARS
    correction strong enough (``gamma=1``) that its clip binds (the norms of ``c`` are 1.4-16 over
    the 5 steps; with the default gamma they stay under 1, where a wrong norm would go unseen), and
    bf16 state (rounded to nearest: stochastic rounding draws other bits on a shard)."""
    out = {name: (name, {}) for name in shine.list_optimizers()}
    out["mars-adamw-exact"] = ("mars-adamw", {"approx": False})
    out["c-mars-shampoo-exact"] = ("c-mars-shampoo", {"approx": False})
    out["mars-came-exact"] = ("mars-came", {"approx": False})
    out["came-last2"] = ("came", {"factor_conv": "last2"})
    out["adamw-clip"] = ("adamw", {"max_grad_norm": CLIP})
    out["came-clip"] = ("came", {"max_grad_norm": CLIP})
    out["c-mars-adamw-gamma1"] = ("c-mars-adamw", {"gamma": 1.0})
    for name in ("c-adamw", "came"):
        out[f"{name}-bf16-state"] = (name, {"state_dtype": torch.bfloat16, "stochastic_rounding": False})
    return out


def _kwargs(name: str, extra: dict[str, Any]) -> dict[str, Any]:
    cls, kwargs = shine.registry.resolve(name)
    return {**kwargs, "lr": LR[name.removeprefix("c-")], **extra}


def make_optimizer(model: nn.Module, label: str, mode: str, **flags: Any) -> torch.optim.Optimizer:
    name, extra = configs()[label]
    if mode == "zero":
        from torch.distributed.optim import ZeroRedundancyOptimizer
        cls, _ = shine.registry.resolve(name)
        keys = ("weight_decay", "weight_decay_1d") if cls is shine.MARS else ("weight_decay",)
        groups = shine.registry.param_groups(model, WEIGHT_DECAY, keys)
        return ZeroRedundancyOptimizer(groups, optimizer_class=cls, **_kwargs(name, extra), **flags)
    return shine.create_optimizer(model, name, lr=LR[name.removeprefix("c-")], weight_decay=WEIGHT_DECAY,
                                  **extra, **flags)


def _inner(opt):
    return getattr(opt, "optim", opt)  # ZeroRedundancyOptimizer keeps the rank's optimizer in .optim


def train(model: nn.Module, opt, steps: range, rank: int = 0, world: int = 1) -> list[float]:
    """Plain data-parallel training on this rank's slice; MARS exact mode stashes the next batch's gradient."""
    losses = []
    exact = any(not g.get("approx", True) for g in opt.param_groups)
    for t in steps:
        if exact:
            opt.zero_grad()
            x, y = batch(t + 1, rank, world)
            nn.functional.mse_loss(model(x), y).backward()
            _inner(opt).stash_grad()
        opt.zero_grad()
        x, y = batch(t, rank, world)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        loss = loss.detach().clone()
        if world > 1:  # the whole batch's loss: the mean of the equal slices'
            dist.all_reduce(loss)
            loss /= world
        losses.append(loss.item())
    return losses


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Whole parameters (gathered from DTensor shards) as float64, keyed by name without wrappers."""
    out = {}
    for name, p in model.named_parameters():
        p = p.detach()
        if hasattr(p, "full_tensor"):
            p = p.full_tensor()
        out[name.removeprefix("module.")] = p.double().clone()
    return out


def shard(model: nn.Module, world: int, hybrid: bool = False) -> nn.Module:
    """FSDP2: every layer and the root sharded on dim 0 over all ranks; ``hybrid``: HSDP, sharded
    over pairs of ranks and replicated across the pairs (placements ``(Replicate(), Shard(0))``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = (init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("replicate", "shard")) if hybrid
            else init_device_mesh("cpu", (world,)))
    for layer in (model.conv, model.fc1, model.fc2, model.out):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def wrap(model: nn.Module, mode: str, world: int) -> nn.Module:
    if mode in ("ddp", "zero"):
        return nn.parallel.DistributedDataParallel(model)
    if mode == "fsdp1":
        return model
    if mode == "hsdp":
        return shard(model, world, hybrid=True)
    if mode.startswith("fsdp"):
        return shard(model, world)
    assert mode == "single", mode
    return model


FLAGS = {"fsdp": {}, "fsdp-per_tensor": {"foreach": False}, "fsdp-fused": {"fused": True},
         "fsdp-gpu-form": {}}


@contextlib.contextmanager
def gpu_form(mode: str):
    """For ``mode == "fsdp-gpu-form"``: the multi-tensor path as GPUs run it (the CPU otherwise
    prefers per-tensor kernels): caution's mask and kept fraction as multi-tensor kernels, and
    factored CAME's passes over groups of matrices (of at most 60 elements: the conv kernel alone,
    the three linear weights together)."""
    if mode != "fsdp-gpu-form":
        yield
        return
    saved = shine.tensorlist.PER_TENSOR_DEVICES, shine.engine.FACTORED_GROUP_NUMEL
    shine.tensorlist.PER_TENSOR_DEVICES, shine.engine.FACTORED_GROUP_NUMEL = frozenset(), 60
    try:
        yield
    finally:
        shine.tensorlist.PER_TENSOR_DEVICES, shine.engine.FACTORED_GROUP_NUMEL = saved


def run_one(label: str, mode: str, rank: int = 0, world: int = 1, steps: int = STEPS):
    model = wrap(new_model(), mode, world)
    opt = make_optimizer(model, label, mode, **FLAGS.get(mode, {}))
    with gpu_form(mode):
        losses = train(model, opt, range(steps), rank, world)
    return full_params(model), losses, shine.optimizer_state_bytes(_inner(opt))


def reference(labels, steps: int = STEPS):
    """Single-process runs on the whole batch."""
    return {label: run_one(label, "single", steps=steps) for label in labels}


# ---- jobs run inside the process group -------------------------------------------------------
def job_equivalence(rank: int, world: int, cases: list[tuple[str, str]]):
    """Train every (label, mode) case; returns {case: (params, losses, state bytes) or the error text}."""
    results = {}
    for label, mode in cases:
        if os.environ.get("SHINE_DIST_VERBOSE"):
            print(f"[rank {rank}] {mode} {label}", flush=True)
        try:
            results[(label, mode)] = run_one(label, mode, rank, world)
        except Exception as err:  # noqa: BLE001 - reported to the test, which decides
            results[(label, mode)] = f"{type(err).__name__}: {err}\n{traceback.format_exc()}"
        dist.barrier()
    return results


# ---- launcher ------------------------------------------------------------------------------
def _entry(rank: int, world: int, store: str, job: Callable, args: tuple, out: str) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        result = job(rank, world, *args)
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def launch(job: Callable, world: int, *args: Any) -> Any:
    """Run ``job(rank, world, *args)`` in ``world`` fresh processes (gloo on 127.0.0.1, meeting
    through a file store: a port picked beforehand could be taken by the time they bind it);
    rank 0's result."""
    if Path("/sys/class/net/lo").exists():
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        mp.spawn(_entry, args=(world, os.path.join(tmp, "store"), job, args, out), nprocs=world, join=True)
        return torch.load(out, weights_only=False)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 for an empty or all-zero pair)."""
    scale = b.abs().max().item() if b.numel() else 0.0
    return (a - b).abs().max().item() / scale if scale else float((a - b).abs().max().item() if a.numel() else 0.0)


# ---- checkpoints (torch.distributed.checkpoint) ------------------------------------------------
CKPT_AT = 3      # steps before the checkpoint
CKPT_STEPS = 6   # steps in all


def _model_and_optimizer(label: str, mode: str, world: int):
    model = wrap(new_model(), mode, world)
    return model, make_optimizer(model, label, mode)


def save_checkpoint(model, opt, path: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)


def load_checkpoint(model, opt, path: str) -> None:
    """The documented resume recipe: create the state, read the checkpoint into it, set it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    if any(not g.get("approx", True) for g in opt.param_groups):
        # get_state_dict would create the state with a fake step, which MARS exact mode refuses;
        # the other optimizers go through that torch default here, so both recipes are tested
        opt.init_state()
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def checkpoint_run(label: str, mode: str, root: str, rank: int = 0, world: int = 1, save_tag: str | None = None,
                   load_tag: str | None = None):
    """Train CKPT_STEPS steps, or resume from ``load_tag`` at CKPT_AT; save at CKPT_AT under ``save_tag``.

    Returns the final whole parameters and the optimizer's state-dict step counts."""
    model, opt = _model_and_optimizer(label, mode, world)
    start = 0
    if load_tag is not None:
        load_checkpoint(model, opt, os.path.join(root, f"{label}-{load_tag}"))
        start = CKPT_AT
    if start == 0:
        train(model, opt, range(CKPT_AT), rank, world)
        if save_tag is not None:
            save_checkpoint(model, opt, os.path.join(root, f"{label}-{save_tag}"))
    train(model, opt, range(CKPT_AT, CKPT_STEPS), rank, world)
    return full_params(model)


def job_checkpoint(rank: int, world: int, labels: list[str], root: str):
    """Per label on FSDP2: an uninterrupted run that saves at CKPT_AT ("fsdp{world}"), a resume from it,
    and a resume from the single-process checkpoint "single" written by the caller."""
    results = {}
    for label in labels:
        try:
            results[label] = {
                "straight": checkpoint_run(label, "fsdp", root, rank, world, save_tag=f"fsdp{world}"),
                "resumed": checkpoint_run(label, "fsdp", root, rank, world, load_tag=f"fsdp{world}"),
                "from_single": checkpoint_run(label, "fsdp", root, rank, world, load_tag="single"),
            }
        except Exception as err:  # noqa: BLE001
            results[label] = f"{type(err).__name__}: {err}\n{traceback.format_exc()}"
        dist.barrier()
    return results


# ---- non-finite gradients on one shard ----------------------------------------------------
def job_nonfinite(rank: int, world: int, labels: list[str]):
    """A NaN in ONE rank's shard of one gradient: every rank must skip, or raise the same error,
    alike. {label: (each rank's skipped steps, parameters unchanged, each rank's error when raising)}."""
    results = {}
    for label in labels:
        model = wrap(new_model(), "fsdp", world)
        name, extra = configs()[label]
        opt = shine.create_optimizer(model, name, lr=LR[name.removeprefix("c-")], nonfinite="skip", **extra)
        train(model, opt, range(2), rank, world)
        before = full_params(model)
        errors = []
        for mode in ("skip", "raise"):
            opt.nonfinite = mode
            opt.zero_grad()
            x, y = batch(2, rank, world)
            nn.functional.mse_loss(model(x), y).backward()
            if rank == world - 1:
                model.fc2.weight.grad.to_local()[0, 0] = float("nan")
            try:
                opt.step()
            except Exception as err:  # every rank must raise this one, naming what it can see
                errors.append(type(err).__name__ + (": another process" if "another process" in str(err) else ""))
        after = full_params(model)
        skipped = torch.tensor([opt.skipped_steps])
        gathered = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
        dist.all_gather(gathered, skipped)
        raised = [None] * world
        dist.all_gather_object(raised, errors)
        results[label] = ([int(s) for s in gathered], all(torch.equal(before[k], after[k]) for k in before), raised)
    return results


# ---- collectives of a step on local shards ----------------------------------------------------
def job_collectives(rank: int, world: int, labels: list[str]):
    """{label: the all-reduce calls of one FSDP2 step}: optimizers that step the local shards
    complete their sums in one all-reduce per bucket and sum, whatever the number of tensors."""
    results = {}
    for label in labels:
        model = wrap(new_model(), "fsdp", world)
        results[label] = step_collectives(model, make_optimizer(model, label, "fsdp"), rank, world)
    return results


def step_collectives(model: nn.Module, opt, rank: int = 0, world: int = 1) -> int:
    """The all-reduce calls of one step of ``opt``, after a first step (which makes the state)."""
    train(model, opt, range(1), rank, world)
    x, y = batch(1, rank, world)
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    with counted(dist, "all_reduce") as calls:
        opt.step()
    return len(calls)


@contextlib.contextmanager
def counted(owner: Any, name: str):
    """The list of the calls (still made) of ``owner.name`` while inside, one entry each."""
    real, calls = getattr(owner, name), []
    setattr(owner, name, lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    try:
        yield calls
    finally:
        setattr(owner, name, real)


def job_orthogonalisations(rank: int, world: int, mode: str = "fsdp"):
    """The Newton-Schulz iterations each rank runs in one FSDP2 (or HSDP) step of MARS-Shampoo
    (the ranks of a shard group take turns over the bucket's matrices)."""
    from shine.rules import mars
    model = wrap(new_model(), mode, world)
    opt = make_optimizer(model, "mars-shampoo", mode)
    train(model, opt, range(1), rank, world)
    with counted(mars, "newton_schulz5") as calls:
        train(model, opt, range(1, 2), rank, world)
    counts = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([len(calls)]))
    return [int(c) for c in counts]


def job_hybrid(rank: int, world: int, cases: list[tuple[str, str]]):
    """The 4-rank cases of test_ddp_fsdp_zero in one process group: HSDP, and FSDP2 over tensor
    parallelism on a 2x2 mesh (:func:`fsdp_tp_run`)."""
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
    return {"equivalence": job_equivalence(rank, world, cases),
            "orthogonalisations": job_orthogonalisations(rank, world, "hsdp"),
            "fsdp_tp": _on_mesh(fsdp_tp_run, mesh, sorted({label for label, _ in cases}))}


# ---- tensor-parallel placements: Shard(0) and Shard(1) in one bucket ---------------------------
#: (shape, the dim it is sharded on): column- and row-wise matrices as tensor parallelism splits
#: them, a 3-D tensor split along its middle dim, a vector; none divides by 2 ranks.
TP_LAYOUT = [((6, 5), 1), ((5, 7), 0), ((3, 5, 2), 1), ((7,), 0)]


def tp_run(label: str, mesh=None) -> list[torch.Tensor]:
    """STEPS steps of ``label`` (plain hyperparameters: one group) on parameters laid out as
    :data:`TP_LAYOUT` over ``mesh`` (whole tensors without one), every rank given the same whole
    gradients; the whole parameters after, as float64."""
    from torch.distributed.tensor import Shard, distribute_tensor
    name, extra = configs()[label]
    place = (lambda t, dim: distribute_tensor(t, mesh, [Shard(dim)])) if mesh is not None else (lambda t, dim: t)
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(place(torch.randn(shape, generator=gen), dim)) for shape, dim in TP_LAYOUT]
    opt = shine.create_optimizer(params, name, lr=LR[name.removeprefix("c-")], weight_decay=WEIGHT_DECAY, **extra)
    for _ in range(STEPS):
        for p, (shape, dim) in zip(params, TP_LAYOUT):
            p.grad = place(torch.randn(shape, generator=gen), dim)
        opt.step()
    return [(p.detach().full_tensor() if mesh is not None else p.detach()).double() for p in params]


def job_tensor_parallel(rank: int, world: int, labels: list[str]):
    """{label: tp_run over all ranks, or the error text}."""
    from torch.distributed.device_mesh import init_device_mesh
    return _on_mesh(tp_run, init_device_mesh("cpu", (world,)), labels)


def _on_mesh(run: Callable, mesh, labels: list[str]) -> dict[str, Any]:
    """{label: ``run(label, mesh)``, or the error text}."""
    results = {}
    for label in labels:
        try:
            results[label] = run(label, mesh)
        except Exception as err:  # noqa: BLE001 - reported to the test, which decides
            results[label] = f"{type(err).__name__}: {err}\n{traceback.format_exc()}"
    return results


# ---- tensor parallelism as torch applies it: parallelize_module ------------------------------
class ParallelNet(nn.Module):
    """:class:`Net`'s input, flattened, through a column-wise then a row-wise parallel layer (their
    widths divide by 2 ranks: ``DTensor.from_local`` between them assumes even shards) and a plain
    one, so that DTensor and plain parameters share the optimizer."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(18, 6)
        self.down = nn.Linear(6, 4)
        self.out = nn.Linear(4, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.down(torch.tanh(self.up(x.flatten(1))))))


def parallel_model(mesh=None) -> ParallelNet:
    """A :class:`ParallelNet`, its ``up`` layer ``ColwiseParallel`` and ``down`` layer
    ``RowwiseParallel`` over ``mesh`` (none without one)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    torch.manual_seed(0)
    model = ParallelNet()
    if mesh is not None:
        parallelize_module(model, mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})
    return model


def parallel_run(label: str, mesh=None) -> tuple[list[float], dict[str, torch.Tensor]]:
    """:func:`train` (the whole batch on every rank) on :func:`parallel_model`: the losses and the
    whole parameters after, as float64."""
    model = parallel_model(mesh)
    losses = train(model, make_optimizer(model, label, "tp"), range(STEPS))
    return losses, full_params(model)


def fsdp_tp_run(label: str, mesh) -> dict[str, torch.Tensor]:
    """FSDP2 over tensor parallelism on a 2-D mesh ``("dp", "tp")``: :func:`parallel_model` over
    ``"tp"``, its layers and root then ``fully_shard`` over ``"dp"`` (the row-wise layer's weight
    is split along both dims), each ``"dp"`` rank training on its half of the batch. The whole
    parameters after, as float64 (``train``'s losses are averaged over all ranks, not kept)."""
    from torch.distributed.fsdp import fully_shard
    model = parallel_model(mesh["tp"])
    for layer in (model.up, model.down, model.out):
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    train(model, make_optimizer(model, label, "tp"), range(STEPS), mesh["dp"].get_local_rank(), mesh["dp"].size())
    return full_params(model)


def job_parallelize_module(rank: int, world: int, labels: list[str]):
    """{label: parallel_run over all ranks, or the error text}, and under ``"collectives"`` the
    all-reduce calls of one CAME step of :func:`parallel_model`."""
    from torch.distributed.device_mesh import init_device_mesh
    model_mesh = init_device_mesh("cpu", (world,))
    model = parallel_model(model_mesh)
    return {**_on_mesh(parallel_run, model_mesh, labels),
            "collectives": step_collectives(model, make_optimizer(model, "came", "tp"))}


# ---- FSDP1 flat parameters: a clear error where the math needs shapes ------------------------
def job_fsdp1(rank: int, world: int, labels: list[str]):
    """{label: None (accepted) or the error message} for FSDP1-flattened parameters."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    model = FullyShardedDataParallel(new_model(), use_orig_params=True, device_id=torch.device("cpu"))
    out = {}
    for label in labels:
        try:
            make_optimizer(model, label, "fsdp1")
            out[label] = None
        except ValueError as err:
            out[label] = str(err)
    return out


def job_suite(rank: int, world: int, cases: list[tuple[str, str]], nonfinite_labels: list[str],
              fsdp1_labels: list[str], collective_labels: list[str], tp_labels: list[str]):
    """Everything of test_ddp_fsdp_zero in one process group."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        equivalence = job_equivalence(rank, world, cases)
    return {"equivalence": equivalence,
            "warnings": sorted({str(w.message) for w in caught if str(w.message).startswith("shine:")}),
            "nonfinite": job_nonfinite(rank, world, nonfinite_labels),
            "fsdp1": job_fsdp1(rank, world, fsdp1_labels),
            "collectives": job_collectives(rank, world, collective_labels),
            "orthogonalisations": job_orthogonalisations(rank, world),
            "tensor_parallel": job_tensor_parallel(rank, world, tp_labels),
            "parallelize_module": job_parallelize_module(rank, world, list(configs()))}
