"""The arena's reports: choosing the best lr, ties, steps-to-target, and life without tqdm/matplotlib."""

import json
import math

import pytest

from shine.arena import report


def record(optimizer, lr, seed, final, curve=None):
    curve = curve or ([(10, final + 1.0), (20, final)] if final else [(10, 4.0)])
    return {
        "optimizer": optimizer, "lr": lr, "seed": seed, "diverged": final is None,
        "final_val_loss": final, "final_train_loss": final, "val_curve": curve,
        "train_losses": [3.0, 2.0], "time_per_step_s": 0.01, "tokens_per_s": 1000.0, "state_mb": 1.0,
    }  # fmt: skip


RECORDS = [
    record("adamw", 1e-3, 0, 2.0), record("adamw", 1e-3, 1, 2.2),
    record("adamw", 3e-3, 0, 1.9), record("adamw", 3e-3, 1, 1.9),
    record("lion", 1e-4, 0, 1.95, [(10, 2.5), (20, 1.95)]), record("lion", 1e-4, 1, 1.97, [(10, 2.3), (20, 1.97)]),
    record("came", 1e-3, 0, None), record("came", 1e-3, 1, 1.5),
]  # fmt: skip


def test_summary_keeps_the_best_lr_the_grid_and_ranks_rows():
    rows = {r["optimizer"]: r for r in report.summarize(RECORDS, ["adamw", "lion", "came"])}
    assert rows["adamw"]["best_lr"] == 3e-3 and len(rows["adamw"]["lr_grid"]) == 2
    assert rows["adamw"]["val_loss_mean"] == pytest.approx(1.9) and rows["adamw"]["delta_vs_best"] == 0
    assert rows["lion"]["delta_vs_best"] == pytest.approx(0.06)
    assert not rows["lion"]["tie_with_best"]  # 0.06 > 2 * 0.014
    assert math.isinf(rows["came"]["val_loss_mean"])  # a diverged seed is never hidden by the others
    assert [r["optimizer"] for r in report.summarize(RECORDS, ["came", "lion", "adamw"])] == ["adamw", "lion", "came"]


def test_steps_to_reach_interpolates_between_evaluations():
    curve = [(10, 3.0), (20, 2.0), (30, 1.0)]
    assert report.steps_to_reach(curve, 1.5) == 25
    assert report.steps_to_reach(curve, 1.97) == 21  # 20.3 by interpolation: reached by step 21, not 20
    assert report.steps_to_reach(curve, 3.5) == 10
    assert report.steps_to_reach(curve, 0.5) is None
    rows = {r["optimizer"]: r for r in report.summarize(RECORDS, ["adamw", "lion"])}
    assert rows["adamw"]["steps_to_baseline_loss"] == 20
    assert rows["lion"]["steps_to_baseline_loss"] is None  # 1.96 never reaches 1.9
    without_baseline = report.summarize(RECORDS, ["lion"])
    assert without_baseline[0]["steps_to_baseline_loss"] is None


def test_plain_progress_lines_without_tqdm(monkeypatch, capsys):
    monkeypatch.setattr(report, "tqdm", None)
    progress = report.Progress(20, "adamw")
    for _ in range(20):
        progress.update(1.234)
    progress.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 10 and lines[-1].startswith("adamw: step 20/20  loss 1.234")
    assert any("tqdm" in n for n in report.missing_extras_notices())


def test_reports_without_matplotlib_skip_only_the_figure(monkeypatch, tmp_path):
    monkeypatch.setattr(report, "matplotlib", None)
    rows = report.summarize(RECORDS, ["adamw", "lion", "came"])
    header = {"task": {"data": "x", "model": "nano", "steps": 20, "batch_size": 2, "seq_len": 8, "device": "cpu"}}
    paths = report.write_reports(tmp_path, header, RECORDS, rows)
    assert [p.name for p in paths] == ["results.json", "results.md"]
    assert json.loads((tmp_path / "results.json").read_text())["summary"][2]["val_loss_mean"] is None
    assert "| came | 0.001 | diverged |" in (tmp_path / "results.md").read_text()
    assert any("matplotlib" in n for n in report.missing_extras_notices())


def test_a_best_lr_at_the_edge_of_its_grid_is_pointed_out(tmp_path):
    """The optimum may lie beyond the grid when the best lr is its lowest or highest: the summary
    says which end, and a notice names the lr beyond it to add (in the grid's own ratio); a best lr
    inside the grid, a grid of one lr and a grid that diverged everywhere get none."""
    records = RECORDS + [
        record("lion", 3e-4, 0, 2.1), record("lion", 1e-3, 0, 2.3),  # best 1e-4: the lowest
        record("mars", 1e-3, 0, 2.0), record("mars", 2e-3, 0, 1.8), record("mars", 4e-3, 0, 1.9),  # inside
        record("sgd", 1e-3, 0, None), record("sgd", 1e-2, 0, None),  # diverged everywhere
    ]  # fmt: skip
    rows = {r["optimizer"]: r for r in report.summarize(records, ["adamw", "lion", "came", "mars", "sgd"])}
    assert {name: r["best_lr_at_edge"] for name, r in rows.items()} == {
        "adamw": "highest", "lion": "lowest", "came": None, "mars": None, "sgd": None}
    notices = report.edge_notices(list(rows.values()))
    assert notices == [
        "adamw: its best lr 0.003 is the highest of the 2 tried, so a higher one may do better; "
        "try adding 0.009 (--lr adamw=0.001,0.003,0.009)",
        "lion: its best lr 0.0001 is the lowest of the 3 tried, so a lower one may do better; "
        "try adding 3.33e-05 (--lr lion=3.33e-05,0.0001,0.0003,0.001)",
    ]
    header = {"task": {"data": "x", "model": "nano", "steps": 20, "batch_size": 2, "seq_len": 8, "device": "cpu"}}
    report.write_reports(tmp_path, header, records, list(rows.values()))
    assert f"- {notices[1]}" in (tmp_path / "results.md").read_text()


def test_runs_of_different_thread_counts_are_pointed_out(tmp_path):
    """Runs timed with different numbers of threads (an arena resumed with another --threads) get a
    note that their times compare only within one count; runs of one count, or logged before the
    count was recorded, get none."""
    threaded = [dict(r, threads=2) for r in RECORDS[:4]] + [dict(r, threads=1) for r in RECORDS[4:]]
    assert report.threads_notice(threaded) == (
        "the runs reported ran with different numbers of threads (4 with 1, 4 with 2): ms/step and "
        "tokens/s compare only runs of one thread count (each run's is in results.json)")
    assert report.threads_notice([dict(r, threads=2) for r in RECORDS]) is None
    assert report.threads_notice(RECORDS + [dict(RECORDS[0], threads=2)]) is None
    rows = report.summarize(threaded, ["adamw", "lion", "came"])
    header = {"task": {"data": "x", "model": "nano", "steps": 20, "batch_size": 2, "seq_len": 8, "device": "cpu"}}
    report.write_reports(tmp_path, header, threaded, rows)
    assert f"- {report.threads_notice(threaded)}" in (tmp_path / "results.md").read_text()
