"""`shine arena`: its command-line options and the loop that runs and reports a whole arena."""

from __future__ import annotations

import argparse
import difflib
import math
import os
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

import shine

from . import parallel, report
from .data import ByteCorpus, load_corpus
from .model import MODEL_PRESETS, build_model
from .runner import ARENA_OPTIMIZERS, DEFAULT_OPTIMIZERS, SWEEP_FACTORS, ArenaConfig, RunLog, Task, optimizer_hyper, set_threads, train_run

HELP = "compare optimizers on a small byte-level GPT (or your text) and report the numbers"

# Sizes of a default run (under 10 minutes on 2 CPU cores) and of --quick (well under 2 minutes).
DEFAULTS = {"model": "tiny", "steps": 300, "batch_size": 16, "seq_len": 64, "seeds": 3}
QUICK = {"model": "nano", "steps": 60, "batch_size": 16, "seq_len": 64, "seeds": 1}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the options of `shine arena`."""
    size = lambda key: f"(default {DEFAULTS[key]}; --quick: {QUICK[key]})"  # noqa: E731
    parser.add_argument("--data", metavar="PATH", help="a text file or a folder of text files (default: Python's pydoc topics)")
    parser.add_argument(
        "--optimizers", metavar="NAME", nargs="+", action="extend",
        help=f"optimizers to compare, space- or comma-separated, from shine.list_optimizers() (default: {','.join(DEFAULT_OPTIMIZERS)})",
    )  # fmt: skip
    parser.add_argument("--steps", type=_positive_int, help=f"training steps per run {size('steps')}")
    parser.add_argument("--batch-size", type=_positive_int, help=f"sequences per step {size('batch_size')}")
    parser.add_argument("--seq-len", type=_positive_int, help=f"bytes per sequence {size('seq_len')}")
    parser.add_argument("--model", choices=sorted(MODEL_PRESETS), help=f"model size preset {size('model')}")
    parser.add_argument("--seeds", type=_positive_int, help=f"seeds per (optimizer, lr) {size('seeds')}")
    parser.add_argument(
        "--lr", metavar="NAME=LR[,LR...]", action="append", default=[],
        help="learning rate of one optimizer (repeat for others); several values form its lr grid",
    )  # fmt: skip
    parser.add_argument(
        "--sweep", action="store_true",
        help=f"try each optimizer at its lr times {', '.join(f'{f:.3g}' for f in SWEEP_FACTORS)}; keep the best, report all "
             "(an optimizer given several lrs by --lr keeps those)",
    )  # fmt: skip
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda when present; default)")
    parser.add_argument("--nproc", type=_positive_int, default=1,
                        help="train each run under FSDP2 on N processes (gloo on CPU, nccl on GPUs; default 1)")
    parser.add_argument("--threads", type=_positive_int,
                        help="torch threads per process (default: one per idle core by the 1-minute load average); "
                             "losses differ in their last digits between thread counts, so pin it to repeat a run")
    parser.add_argument("--out", metavar="DIR", type=Path, default=Path("arena_out"), help="output folder (default ./arena_out)")
    parser.add_argument("--resume", action="store_true", help="skip the runs already finished in DIR")
    parser.add_argument("--quick", action="store_true", help="a smoke test in well under 2 minutes: nano model, 60 steps, 1 seed")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def check_optimizer(name: str, known: list[str]) -> None:
    """ValueError naming the close matches, unless shine knows `name`."""
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise ValueError(f"unknown optimizer {name!r}; {hint}known: {', '.join(known)}")


def parse_lr_specs(specs: list[str], known: list[str]) -> dict[str, tuple[float, ...]]:
    """Turn `--lr NAME=LR[,LR...]` options into lr lists; ValueError says what is malformed."""
    grids: dict[str, tuple[float, ...]] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        if not sep or not name or not values:
            raise ValueError(f"--lr {spec!r}: expected NAME=LR or NAME=LR1,LR2,... (e.g. --lr adamw=3e-3)")
        check_optimizer(name, known)
        if name in grids:
            raise ValueError(f"--lr {spec!r}: {name} was given twice; list several values as {name}=LR1,LR2")
        try:
            lrs = tuple(float(v) for v in values.split(","))
        except ValueError:
            raise ValueError(f"--lr {spec!r}: {values!r} is not a number or comma-separated numbers") from None
        if not all(math.isfinite(lr) and lr > 0 for lr in lrs):
            raise ValueError(f"--lr {spec!r}: learning rates must be positive and finite")
        grids[name] = tuple(dict.fromkeys(lrs))  # an lr given twice (1e-3,0.001) is one lr, not two seeds
    return grids


def lr_grids(names: list[str], given: dict[str, tuple[float, ...]], sweep: bool) -> dict[str, tuple[float, ...]]:
    """Each optimizer's lrs: a list from --lr as given; else its --lr value or arena default,
    times SWEEP_FACTORS with --sweep."""
    grids = {}
    for name in names:
        if len(given.get(name, ())) > 1:
            grids[name] = given[name]
            continue
        if name not in given and name not in ARENA_OPTIMIZERS:
            raise ValueError(f"the arena has no default lr for {name}; give one with --lr {name}=LR")
        centre = given[name][0] if name in given else ARENA_OPTIMIZERS[name]["lr"]
        grids[name] = tuple(centre * f for f in SWEEP_FACTORS) if sweep else (centre,)
    return grids


def build_config(args: argparse.Namespace) -> ArenaConfig:
    """Check the options against each other and against shine's optimizers; ValueError if they clash."""
    known = shine.list_optimizers()
    sizes = {key: getattr(args, key) or (QUICK if args.quick else DEFAULTS)[key] for key in DEFAULTS}
    names = list(dict.fromkeys(n.strip() for opt in (args.optimizers or DEFAULT_OPTIMIZERS) for n in opt.split(",")
                               if n.strip()))
    if not names:
        raise ValueError("--optimizers: no optimizer named")
    for name in names:
        check_optimizer(name, known)
    given = parse_lr_specs(args.lr, known)
    if extra := sorted(set(given) - set(names)):
        raise ValueError(f"--lr names {', '.join(extra)}, which --optimizers does not include")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"--device {device}: expected cpu, cuda, cuda:N or auto")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here")
    if sizes["batch_size"] % args.nproc:
        raise ValueError(f"--nproc {args.nproc}: the batch size {sizes['batch_size']} must divide by it")
    if device.startswith("cuda") and args.nproc > torch.cuda.device_count():
        raise ValueError(f"--nproc {args.nproc}: only {torch.cuda.device_count()} GPU(s) here")
    task = Task(
        data="default" if args.data is None else str(Path(args.data).resolve()),
        model=sizes["model"],
        steps=sizes["steps"],
        batch_size=sizes["batch_size"],
        seq_len=sizes["seq_len"],
        device=device,
        nproc=args.nproc,
    )
    return ArenaConfig(task, lr_grids(names, given, args.sweep), sizes["seeds"], args.out, args.resume)


def train_all(corpus: ByteCorpus, task: Task, todo: list[tuple[str, float, int]], log: RunLog) -> bool:
    """Train and log each (optimizer, lr, seed) in `todo`; False if Ctrl-C stopped it first."""
    try:
        for i, (name, lr, seed) in enumerate(todo, 1):
            if not parallel.is_main():  # other ranks of an --nproc run train silently
                train_run(corpus, task, name, lr, seed)
                continue
            progress = report.Progress(task.steps, f"[{i}/{len(todo)}] {name} lr={lr:.3g} seed={seed}")
            try:
                log.add(train_run(corpus, task, name, lr, seed, progress.update))
            finally:
                progress.close()
    except KeyboardInterrupt:
        return False
    return True


def _counted(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def run(args: argparse.Namespace) -> int:
    """Run `shine arena`: train every planned run not yet done, then print and write the reports.

    Ctrl-C stops after the finished runs are reported; `--resume` picks up from there.
    Returns the process exit status.
    """
    try:
        config = build_config(args)
        corpus = load_corpus(args.data, config.task.seq_len, exclude=Path(config.out_dir))
        task = config.task = replace(config.task, data_sha256=corpus.sha256)
        log = RunLog(config.out_dir, task, config.resume)
        if log.discarded:
            print(f"shine arena: a new arena in {config.out_dir}: discarding the {_counted(log.discarded, 'run')} "
                  f"logged there (--resume keeps them)", file=sys.stderr)
        if not os.access(config.out_dir, os.W_OK):  # found before training, not when the first run is logged
            raise OSError(f"--out {config.out_dir}: not writable")
        if not config.resume:  # a new arena: an earlier one's reports there would not match its run log
            report.remove_reports(config.out_dir)
    except (ValueError, OSError) as err:
        print(f"shine arena: error: {err}", file=sys.stderr)
        return 2
    rank, size = parallel.world()
    if task.nproc > 1 and size == 1:  # the launcher: every process runs this function again
        return parallel.launch(task.nproc, task.device, run, args)
    threads = args.threads or max(1, set_threads() // size)
    torch.set_num_threads(threads)
    plan = config.planned_runs()
    todo = [key for key in plan if not log.has(*key)]
    if rank:  # other ranks of an --nproc run: train, then leave the reports to rank 0
        train_all(corpus, task, todo, log)
        return 0
    n_params = sum(p.numel() for p in build_model(task.model, task.seq_len).parameters())
    print(
        f"shine arena: {corpus.source} ({len(corpus.train) / 1e3:.0f} KB train, {len(corpus.val) / 1e3:.0f} KB validation), "
        f"model {task.model} ({n_params / 1e6:.2f} M params), {task.steps} steps x {task.batch_size} x {task.seq_len} bytes, "
        f"{_counted(len(plan), 'run')} ({_counted(len(config.lr_grids), 'optimizer')}, seeds: {config.seeds}"
        + (f", {len(plan) - len(todo)} already done" if len(todo) < len(plan) else "")
        + f") on {task.device}, threads: {threads}"
    )
    for notice in report.missing_extras_notices():
        print(notice)
    interrupted = not train_all(corpus, task, todo, log)
    planned = set(plan)
    records = [r for r in log.records if (r["optimizer"], r["lr"], r["seed"]) in planned]
    if not records:
        print("shine arena: interrupted before any run finished; nothing to report")
        return 130
    rows = report.summarize(records, list(config.lr_grids))
    header: dict[str, Any] = {
        "task": asdict(task) | {"corpus": corpus.source, "threads": threads},
        "seeds": config.seeds,
        "lr_grids": config.lr_grids,
        "hyper": {name: optimizer_hyper(name) for name in config.lr_grids},
        "complete": len(records) == len(plan),
    }
    paths = report.write_reports(config.out_dir, header, records, rows)
    print("\n" + report.markdown_table(rows))
    if any(len(grid) > 1 for grid in config.lr_grids.values()):
        print("\n" + report.markdown_lr_grid(rows))
    for notice in report.notices(records, rows):
        print(f"note: {notice}")
    print("\nwritten: " + ", ".join(str(p) for p in paths))
    if interrupted:
        print(f"interrupted: {len(records)} of {len(plan)} runs finished and are reported; add --resume to run the rest")
        return 130
    return 0
