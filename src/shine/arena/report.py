"""What the arena shows: progress while it runs, then a summary table, results.json,
results.md and loss_curves.png.

tqdm and matplotlib are optional: without them the arena prints plain progress lines and
skips the figure.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

try:
    from tqdm import tqdm
except ImportError:  # optional: plain progress lines instead
    tqdm = None

try:
    import matplotlib
except ImportError:  # optional: no figure
    matplotlib = None

INSTALL_HINT = "pip install 'shine-optim[arena]'"


def missing_extras_notices() -> list[str]:
    """One line per optional package that is missing, saying what the arena does without it."""
    notices = []
    if tqdm is None:
        notices.append(f"note: tqdm is not installed, progress is shown as plain lines ({INSTALL_HINT})")
    if matplotlib is None:
        notices.append(f"note: matplotlib is not installed, no loss_curves.png is written ({INSTALL_HINT})")
    return notices


class Progress:
    """Progress of one run: a tqdm bar with the loss and ETA, else a plain line every tenth of the run."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc = total, desc
        self.done = 0
        self.start = time.perf_counter()
        self.bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True) if tqdm else None

    def update(self, loss: float) -> None:
        """Count one finished step with its training loss."""
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            self.bar.update()
        elif self.done % max(1, self.total // 10) == 0 or self.done == self.total:
            eta = (time.perf_counter() - self.start) / self.done * (self.total - self.done)
            print(f"{self.desc}: step {self.done}/{self.total}  loss {loss:.3f}  eta {eta:.0f}s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _mean_std(values: Sequence[float | None]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds; a diverged seed (None) makes the mean infinite."""
    if not values or any(v is None for v in values):
        return math.inf, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _mean_curve(curves: Sequence[Sequence[tuple[int, float | None]]]) -> list[tuple[int, float]]:
    """Pointwise mean over seeds of validation curves, up to the shortest one."""
    length = min(len(c) for c in curves)
    return [
        (curves[0][i][0], statistics.fmean(c[i][1] for c in curves))
        for i in range(length)
        if all(c[i][1] is not None for c in curves)
    ]


def steps_to_reach(curve: Sequence[tuple[int, float]], target: float) -> int | None:
    """First step at which a validation curve reaches `target`, interpolated linearly between evaluations."""
    prev_step, prev_loss = 0, math.inf
    for step, loss in curve:
        if loss <= target:
            if math.isinf(prev_loss):
                return step
            # up: the first whole step by which the interpolated curve has reached the target
            return math.ceil(prev_step + (prev_loss - target) / (prev_loss - loss) * (step - prev_step))
        prev_step, prev_loss = step, loss
    return None


def summarize(records: Sequence[dict[str, Any]], names: Sequence[str], baseline: str = "adamw") -> list[dict[str, Any]]:
    """One row per optimizer at its best lr (lowest mean final validation loss), best row first.

    Each row keeps its whole lr grid. A row "ties" the best when its mean differs by less than
    two standard deviations (the larger of the two rows'), as the project's notes on fair
    comparisons ask.
    """
    rows = []
    for name in names:
        runs = [r for r in records if r["optimizer"] == name]
        if not runs:
            continue
        grid = []
        for lr in sorted({r["lr"] for r in runs}):
            mean, std = _mean_std([r["final_val_loss"] for r in runs if r["lr"] == lr])
            grid.append({"lr": lr, "val_loss_mean": mean, "val_loss_std": std, "seeds": sum(r["lr"] == lr for r in runs)})
        best = min(grid, key=lambda g: g["val_loss_mean"])
        best_runs = [r for r in runs if r["lr"] == best["lr"]]
        train_mean, _ = _mean_std([r["final_train_loss"] for r in best_runs])
        rows.append(
            {
                "optimizer": name,
                "best_lr": best["lr"],
                "val_loss_mean": best["val_loss_mean"],
                "val_loss_std": best["val_loss_std"],
                "train_loss_mean": train_mean,
                "seeds": best["seeds"],
                "time_per_step_ms": 1e3 * statistics.fmean(r["time_per_step_s"] for r in best_runs),
                "tokens_per_s": statistics.fmean(r["tokens_per_s"] for r in best_runs),
                "state_mb": max(r["state_mb"] for r in best_runs),
                "val_curve": _mean_curve([r["val_curve"] for r in best_runs]),
                "lr_grid": grid,
                "best_lr_at_edge": _edge(grid, best),
            }
        )
    rows.sort(key=lambda row: row["val_loss_mean"])
    target = next((row["val_loss_mean"] for row in rows if row["optimizer"] == baseline), math.inf)
    for row in rows:
        row["steps_to_baseline_loss"] = steps_to_reach(row["val_curve"], target) if math.isfinite(target) else None
        row["delta_vs_best"] = row["val_loss_mean"] - rows[0]["val_loss_mean"]
        row["tie_with_best"] = row["delta_vs_best"] < 2 * max(row["val_loss_std"], rows[0]["val_loss_std"])
    return rows


def _edge(grid: Sequence[dict[str, Any]], best: dict[str, Any]) -> str | None:
    """``"lowest"`` or ``"highest"`` where the best of a grid of several lrs is at that end of it
    (its optimum may then lie beyond), else ``None``; a grid that diverged everywhere has no best."""
    if len(grid) < 2 or not math.isfinite(best["val_loss_mean"]):
        return None
    return "lowest" if best is grid[0] else "highest" if best is grid[-1] else None


def edge_notices(rows: Sequence[dict[str, Any]]) -> list[str]:
    """A line for each optimizer whose best lr is the lowest or highest of its grid, naming the next
    lr beyond it (the grid's own ratio between its last two lrs) to add with ``--lr``."""
    lines = []
    for r in rows:
        edge = r.get("best_lr_at_edge")
        if edge is None:
            continue
        lrs = [g["lr"] for g in r["lr_grid"]]
        end, inner = (lrs[0], lrs[1]) if edge == "lowest" else (lrs[-1], lrs[-2])
        beyond = float(f"{end * end / inner:.3g}")
        lines.append(f"{r['optimizer']}: its best lr {end:.6g} is the {edge} of the {len(lrs)} tried, so a "
                     f"{'lower' if edge == 'lowest' else 'higher'} one may do better; try adding {beyond:.6g} "
                     f"(--lr {r['optimizer']}={','.join(f'{lr:.6g}' for lr in sorted([*lrs, beyond]))})")
    return lines


def notices(records: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]) -> list[str]:
    """What the reports say below their tables: :func:`edge_notices` and :func:`threads_notice`."""
    threads = threads_notice(records)
    return edge_notices(rows) + ([threads] if threads else [])


def threads_notice(records: Sequence[dict[str, Any]]) -> str | None:
    """A line where the reported runs ran with different numbers of threads (an arena resumed with
    another ``--threads``, or on a machine whose load changed its default): their times per step
    and tokens per second then compare only runs of one thread count. Runs logged before the
    count was recorded are left out."""
    counts = sorted({r["threads"] for r in records if r.get("threads") is not None})
    if len(counts) < 2:
        return None
    by_count = ", ".join(f"{sum(r.get('threads') == n for r in records)} with {n}" for n in counts)
    return (f"the runs reported ran with different numbers of threads ({by_count}): ms/step and tokens/s "
            f"compare only runs of one thread count (each run's is in results.json)")


def _loss(mean: float, std: float, seeds: int) -> str:
    if math.isinf(mean):
        return "diverged"
    return f"{mean:.4f} ± {std:.4f}" if seeds > 1 else f"{mean:.4f}"


def _vs_best(row: dict[str, Any]) -> str:
    if row["delta_vs_best"] == 0:
        return "best"
    if math.isnan(row["delta_vs_best"]) or math.isinf(row["delta_vs_best"]):
        return "-"
    return f"+{row['delta_vs_best']:.4f}" + (" (tie)" if row["tie_with_best"] else "")


def markdown_table(rows: Sequence[dict[str, Any]], baseline: str = "adamw") -> str:
    """The summary as a Markdown table (read as is in a terminal too)."""
    header = [
        "optimizer", "best lr", "val loss (mean ± std)", "vs best", "train loss", "seeds",
        "ms/step", "tokens/s", "opt. state MB", f"steps to {baseline} val loss",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [
            r["optimizer"], f"{r['best_lr']:.6g}", _loss(r["val_loss_mean"], r["val_loss_std"], r["seeds"]), _vs_best(r),
            "-" if math.isinf(r["train_loss_mean"]) else f"{r['train_loss_mean']:.4f}", str(r["seeds"]),
            f"{r['time_per_step_ms']:.1f}", f"{r['tokens_per_s']:,.0f}", f"{r['state_mb']:.2f}",
            "-" if r["steps_to_baseline_loss"] is None else str(r["steps_to_baseline_loss"]),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_lr_grid(rows: Sequence[dict[str, Any]]) -> str:
    """Every lr tried, per optimizer, with the chosen one marked."""
    lines = ["| optimizer | lr | val loss (mean ± std) | seeds | chosen |", "|---|---|---|---|---|"]
    for r in rows:
        for g in r["lr_grid"]:
            chosen = "✓" if g["lr"] == r["best_lr"] else ""
            lines.append(
                f"| {r['optimizer']} | {g['lr']:.6g} | {_loss(g['val_loss_mean'], g['val_loss_std'], g['seeds'])} | {g['seeds']} | {chosen} |"
            )
    return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    """Replace NaN and infinities, which JSON lacks, by null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


#: The files :func:`write_reports` writes into the output folder.
REPORTS = ("results.json", "results.md", "loss_curves.png")


def remove_reports(out_dir: Path) -> None:
    """Delete an earlier arena's reports from ``out_dir`` (a new arena there starts its run log over)."""
    for name in REPORTS:
        (out_dir / name).unlink(missing_ok=True)


def write_reports(out_dir: Path, header: dict[str, Any], records: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]) -> list[Path]:
    """Write results.json, results.md and (with matplotlib) loss_curves.png; return the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / REPORTS[0], out_dir / REPORTS[1]
    json_path.write_text(json.dumps(_json_safe({**header, "summary": rows, "runs": records}), indent=1) + "\n")
    task = header["task"]
    md_path.write_text(
        "# shine arena results\n\n"
        f"Task: {task['data']}, model `{task['model']}`, {task['steps']} steps of "
        f"{task['batch_size']} x {task['seq_len']} bytes on {task['device']}. "
        "Validation loss in nats per byte, final step, mean ± std over seeds, each optimizer at "
        "its best lr. Differences under two standard deviations are ties.\n\n"
        + ("" if header.get("complete", True) else
           f"**Partial**: interrupted after {len(records)} finished run(s); `--resume` runs the rest.\n\n")
        + f"{markdown_table(rows)}\n\n## Learning rates tried\n\n{markdown_lr_grid(rows)}\n"
        + "".join(f"\n- {notice}\n" for notice in notices(records, rows))
    )
    written = [json_path, md_path]
    png = plot_curves(out_dir / REPORTS[2], records, rows)
    return written + ([png] if png else [])


def _moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values, so the curve starts at step 1."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_curves(path: Path, records: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]) -> Path | None:
    """Train (smoothed) and validation loss vs step, one line per optimizer at its best lr,
    the seeds' range shaded; cautious variants dashed in their base optimizer's colour.
    Returns None without matplotlib.
    """
    if matplotlib is None:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(13, 5))
    families = sorted({row["optimizer"].removeprefix("c-") for row in rows})
    colours = dict(zip(families, plt.get_cmap("tab10").colors))
    window = max(1, max((len(r["train_losses"]) for r in records), default=1) // 25)
    first_val: list[float] = []
    for row in rows:
        runs = [r for r in records if (r["optimizer"], r["lr"], r["diverged"]) == (row["optimizer"], row["best_lr"], False)]
        if not runs:
            continue
        style = {
            "color": colours[row["optimizer"].removeprefix("c-")],
            "linestyle": "--" if row["optimizer"].startswith("c-") else "-",
        }
        train = [_moving_average(r["train_losses"], window) for r in runs]
        val = [[loss for _, loss in r["val_curve"]] for r in runs]
        first_val += [curve[0] for curve in val]
        label = f"{row['optimizer']} (lr {row['best_lr']:.3g})"
        for ax, steps, curves in (
            (ax_train, range(1, len(train[0]) + 1), train),
            (ax_val, [s for s, _ in runs[0]["val_curve"]], val),
        ):
            columns = list(zip(*curves))
            ax.plot(steps, [statistics.fmean(c) for c in columns], label=label, **style)
            ax.fill_between(steps, [min(c) for c in columns], [max(c) for c in columns], color=style["color"], alpha=0.15)
    ax_train.set_title(f"train loss (moving average over {window} steps)")
    ax_val.set_title("validation loss")
    for ax in (ax_train, ax_val):
        if first_val:  # zoom past the first drop from ln(256), where the optimizers differ
            ax.set_ylim(top=1.05 * max(first_val))
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/byte)")
        ax.grid(alpha=0.3)
    ax_val.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
