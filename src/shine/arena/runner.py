"""Training runs of the arena, one (optimizer, lr, seed) at a time, logged as each one finishes.

Every optimizer trains the same model from the same initialisation on the same batches for a
given seed (a paired comparison), under the recipe of the papers: linear warmup, cosine decay,
global gradient-norm clip 1.0 (the optimizers' ``max_grad_norm``, inside the step).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import shine

from . import parallel
from .data import ByteCorpus
from .model import build_model

# The arena's settings per optimizer: "lr" is the default learning rate for the default task
# (tuned as README.md's "How the default learning rates were chosen" says); everything else goes to
# shine.create_optimizer.
ARENA_OPTIMIZERS: dict[str, dict[str, Any]] = {
    "adamw": {"lr": 2e-3, "betas": (0.9, 0.95), "weight_decay": 0.1},
    "c-adamw": {"lr": 4e-3, "betas": (0.9, 0.95), "weight_decay": 0.1},
    "lion": {"lr": 8e-4, "betas": (0.9, 0.99), "weight_decay": 1.0},
    "c-lion": {"lr": 8e-4, "betas": (0.9, 0.99), "weight_decay": 1.0},
    "mars-adamw": {"lr": 4e-3, "weight_decay": 0.01, "lr_1d": 3e-3},
    "c-mars-adamw": {"lr": 4e-3, "weight_decay": 0.01, "lr_1d": 3e-3},
    "came": {"lr": 1.25e-4, "weight_decay": 0.1},
    "mars-came": {"lr": 2.5e-4, "weight_decay": 0.1},
    "c-mars-came": {"lr": 2.5e-4, "weight_decay": 0.1},
}
#: What ``shine arena`` compares when not told: the papers' optimizers and their cautious forms.
DEFAULT_OPTIMIZERS: tuple[str, ...] = ("adamw", "c-adamw", "lion", "c-lion", "mars-adamw", "c-mars-adamw", "came")
SWEEP_FACTORS = (0.5, 1.0, 2.0)  # --sweep: the lr grid around each optimizer's centre lr
WARMUP_FRACTION = 0.1
MIN_LR_FRACTION = 0.1  # the cosine decays to this fraction of the peak lr
GRAD_CLIP = 1.0
EVAL_POINTS = 10  # validation losses per run
EVAL_WINDOWS = 256  # fixed validation windows (each --seq-len bytes)
LOG_NAME = "runs.jsonl"


@dataclass(frozen=True)
class Task:
    """What every run trains on; runs of different tasks never mix in one output folder."""

    data: str  # an absolute path, or "default"
    model: str
    steps: int
    batch_size: int
    seq_len: int
    device: str
    nproc: int = 1  # processes training each run under FSDP2 (--nproc)
    data_sha256: str = ""  # of the corpus's bytes: a file changed since is another task

    @property
    def warmup_steps(self) -> int:
        return max(1, round(self.steps * WARMUP_FRACTION))

    @property
    def eval_every(self) -> int:
        return max(1, self.steps // EVAL_POINTS)


@dataclass
class ArenaConfig:
    """A whole arena: the task, the lr grid of each optimizer, the seeds and the output folder."""

    task: Task
    lr_grids: dict[str, tuple[float, ...]]  # optimizer -> lrs to try, in the order given
    seeds: int
    out_dir: Path
    resume: bool = False

    def planned_runs(self) -> list[tuple[str, float, int]]:
        """(optimizer, lr, seed) in run order: seed-major, so an interrupted arena still compares all."""
        return [(name, lr, seed) for seed in range(self.seeds) for name, grid in self.lr_grids.items() for lr in grid]


def optimizer_hyper(name: str) -> dict[str, Any]:
    """The arena's create_optimizer keywords for `name` besides lr (none for optimizers it has not tuned)."""
    return {k: v for k, v in ARENA_OPTIMIZERS.get(name, {}).items() if k != "lr"}


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """The schedule's multiplier of the peak lr at 0-based `step`: linear warmup, then cosine."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))


def set_threads() -> int:
    """Use as many intra-op threads as there are idle CPUs this process may run on; return that number.

    On a busy machine, threads that wait for each other make a small model many times slower
    (measured here: 2.4 s per step instead of 35 ms with 2 threads on 2 loaded cores), so CPUs
    already busy by the 1-minute load average are left out. OMP_NUM_THREADS still caps it.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    busy = math.floor(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    torch.set_num_threads(max(1, min(torch.get_num_threads(), cpus - busy)))
    return torch.get_num_threads()


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: str) -> float:
    """Mean validation loss over the fixed validation windows."""
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        total += model.loss(x.to(device), y.to(device)).item() * x.shape[0]
        count += x.shape[0]
    model.train()
    return total / count


def train_run(
    corpus: ByteCorpus,
    task: Task,
    optimizer: str,
    lr: float,
    seed: int,
    on_step: Callable[[float], None] = lambda loss: None,
) -> dict[str, Any]:
    """Train one model with one optimizer at one lr and seed; return the run's record.

    A run whose training loss, or gradient, turns non-finite stops there and is marked diverged
    (the optimizer skips that step instead of raising: ``nonfinite="skip"``).
    """
    torch.manual_seed(seed)
    model = build_model(task.model, task.seq_len).to(task.device)
    parallel.shard(model, model.blocks)
    hyper = optimizer_hyper(optimizer)
    # the global-norm clip inside the step: clip_grad_norm_'s numbers without its passes over the gradients
    opt = shine.create_optimizer(model, optimizer, lr=lr, max_grad_norm=GRAD_CLIP, nonfinite="skip", **hyper)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, task.steps, task.warmup_steps))
    batches = corpus.train_batches(task.batch_size, task.seq_len, seed)
    val_batches = corpus.val_batches(task.batch_size, task.seq_len, EVAL_WINDOWS)
    train_losses: list[float] = []
    grad_norms: list[float] = []  # the global gradient norm before the clip, each step
    val_curve: list[tuple[int, float]] = []
    train_time = 0.0
    for step in range(1, task.steps + 1):
        x, y = (parallel.local_slice(t).to(task.device) for t in next(batches))
        start = time.perf_counter()
        loss = model.loss(x, y)
        loss_value = parallel.global_mean(loss)
        if not math.isfinite(loss_value):  # diverged: stop before a non-finite gradient reaches the optimizer
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with warnings.catch_warnings():  # the skip ends the run: reported as diverged, not warned of
            warnings.filterwarnings("ignore", ".*non-finite gradient, step skipped", RuntimeWarning)
            opt.step()
        if opt.skipped_steps:  # a non-finite gradient (every rank agrees): diverged
            break
        sched.step()
        if task.device != "cpu":
            torch.cuda.synchronize(task.device)  # so the timing covers the step's kernels
        train_time += time.perf_counter() - start
        train_losses.append(loss_value)
        grad_norms.append(opt.last_grad_norm)
        on_step(loss_value)
        if step % task.eval_every == 0 or step == task.steps:
            val_curve.append((step, evaluate(model, val_batches, task.device)))
    diverged = not (val_curve and val_curve[-1][0] == task.steps and math.isfinite(val_curve[-1][1]))
    steps_done = max(1, len(train_losses))
    tail = train_losses[-max(1, len(train_losses) // 10) :]
    return {
        "optimizer": optimizer,
        "lr": lr,
        "seed": seed,
        "hyper": hyper,
        "diverged": diverged,
        "final_val_loss": None if diverged else val_curve[-1][1],
        "final_train_loss": None if diverged else sum(tail) / len(tail),
        "val_curve": [(s, _finite_or_none(v)) for s, v in val_curve],
        "train_losses": train_losses,
        "grad_norms": grad_norms,
        "clipped_fraction": sum(n > GRAD_CLIP for n in grad_norms) / steps_done,
        "threads": torch.get_num_threads(),  # what its time per step was measured with
        "time_per_step_s": train_time / steps_done,
        "tokens_per_s": task.batch_size * task.seq_len * steps_done / max(train_time, 1e-9),
        "state_mb": parallel.global_sum(shine.optimizer_state_bytes(opt), task.device) / 1e6,  # every process's shard
    }


class RunLog:
    """The finished runs of an output folder: a JSON-lines file, task first, one line per run.

    Lines are appended as runs finish, so an interrupted arena loses only the run in progress.
    """

    def __init__(self, out_dir: Path, task: Task, resume: bool) -> None:
        self.path = out_dir / LOG_NAME
        self.records: list[dict[str, Any]] = []
        header = {"task": asdict(task)}
        logged = self.path.read_text().splitlines() if self.path.exists() else []
        #: runs of an earlier arena in this folder that a new one (no ``resume``) starts over from
        self.discarded = 0 if resume else sum(map(_is_complete_json, logged[1:]))
        lines = logged if resume else []
        if lines:
            if not _is_complete_json(lines[0]) or json.loads(lines[0]) != header:
                raise ValueError(
                    f"--resume: {self.path} holds runs of another task ({_task_difference(lines[0], header)}); "
                    "use the same arguments, another --out, or drop --resume"
                )
            complete = [line for line in lines[1:] if _is_complete_json(line)]
            self.records = [json.loads(line) for line in complete]
            if len(complete) < len(lines) - 1:  # drop a torn line, so that the next record starts a line
                self.path.write_text("\n".join([lines[0], *complete]) + "\n")
        else:  # a new log (an empty one too: it has no header to resume from)
            out_dir.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(header) + "\n")

    def has(self, optimizer: str, lr: float, seed: int) -> bool:
        """Whether this run has already finished."""
        return any((r["optimizer"], r["lr"], r["seed"]) == (optimizer, lr, seed) for r in self.records)

    def add(self, record: dict[str, Any]) -> None:
        """Keep a finished run, in memory and on disk."""
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _task_difference(saved_line: str, header: dict[str, Any]) -> str:
    """What differs between the task of a log's first line and ``header``'s, setting by setting."""
    loaded = json.loads(saved_line) if _is_complete_json(saved_line) else None
    saved = loaded.get("task") if isinstance(loaded, dict) else None
    if not isinstance(saved, dict):
        return saved_line[:300]
    now = header["task"]
    return "; ".join(f"{key}: {saved.get(key)!r} there, {now.get(key)!r} now"
                     for key in sorted(set(saved) | set(now)) if saved.get(key) != now.get(key))


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN or infinity: a diverged loss is stored as null."""
    return value if math.isfinite(value) else None


def _is_complete_json(line: str) -> bool:
    """False for the torn last line a killed process may leave."""
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True
