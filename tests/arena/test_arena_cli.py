"""`shine arena` end to end: --quick, --resume, Ctrl-C, and option errors."""

import json
import math
import subprocess
import sys

import pytest

from shine import cli
from shine.arena import command, runner

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL = ["--model", "nano", "--steps", "4", "--seq-len", "16", "--batch-size", "2", "--seeds", "1"]


def arena(*args, out):
    return cli.main(["arena", *args, "--out", str(out)])


def test_quick_run_writes_every_optimizer_table_and_figure(tmp_path, capsys):
    assert arena("--quick", out=tmp_path) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {row["optimizer"]: row for row in results["summary"]}
    assert set(rows) == set(runner.DEFAULT_OPTIMIZERS)
    assert results["complete"] and len(results["runs"]) == len(runner.DEFAULT_OPTIMIZERS)
    assert {run["threads"] for run in results["runs"]} == {results["task"]["threads"]}
    for row in rows.values():
        for key in ("val_loss_mean", "val_loss_std", "train_loss_mean", "time_per_step_ms", "tokens_per_s", "state_mb"):
            assert math.isfinite(row[key]), (row["optimizer"], key)
        assert row["val_loss_mean"] < math.log(256)  # learned something
        assert row["best_lr"] == runner.ARENA_OPTIMIZERS[row["optimizer"]]["lr"]
        assert row["state_mb"] > 0 and row["tokens_per_s"] > 0
        assert row["steps_to_baseline_loss"] is None or 0 < row["steps_to_baseline_loss"] <= command.QUICK["steps"]
    assert rows["adamw"]["steps_to_baseline_loss"] is not None  # AdamW reaches its own final loss
    assert rows["came"]["state_mb"] < rows["adamw"]["state_mb"] < rows["mars-adamw"]["state_mb"]
    table = (tmp_path / "results.md").read_text()
    assert "| optimizer | best lr | val loss (mean ± std) |" in table
    assert all(f"| {name} |" in table for name in runner.DEFAULT_OPTIMIZERS)
    assert table.splitlines()[4] in capsys.readouterr().out  # the table is printed too
    pytest.importorskip("matplotlib")
    png = (tmp_path / "loss_curves.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 1000


def test_same_arguments_give_the_same_losses(tmp_path):
    for out in ("a", "b"):
        assert arena("--optimizers", "adamw", *SMALL, "--threads", "1", out=tmp_path / out) == 0
    runs = [json.loads((tmp_path / out / "results.json").read_text())["runs"][0] for out in "ab"]
    assert runs[0]["train_losses"] == runs[1]["train_losses"]
    assert runs[0]["grad_norms"] == runs[1]["grad_norms"]
    norms = runs[0]["grad_norms"]  # the norm before the clip, one per step
    assert len(norms) == len(runs[0]["train_losses"]) and all(n > 0 for n in norms)


def test_pinned_threads_repeat_a_run_whatever_the_load(tmp_path, monkeypatch):
    """By default the thread count follows the load average, and the losses follow the thread
    count in their last digits; --threads pins it."""
    losses = []
    for out, load in (("idle", 0.0), ("busy", 5.0)):
        monkeypatch.setattr(runner.os, "getloadavg", lambda load=load: (load, load, load))
        assert arena("--optimizers", "c-adamw", *SMALL, "--threads", "2", out=tmp_path / out) == 0
        results = json.loads((tmp_path / out / "results.json").read_text())
        assert results["task"]["threads"] == 2
        losses.append(results["runs"][0]["train_losses"])
    assert losses[0] == losses[1]


def test_resume_skips_finished_runs(tmp_path, monkeypatch):
    assert arena("--optimizers", "adamw,lion", *SMALL, out=tmp_path) == 0
    calls = []
    train_run = command.train_run
    monkeypatch.setattr(command, "train_run", lambda *a, **k: calls.append(a[2:5]) or train_run(*a, **k))
    assert arena("--optimizers", "adamw,lion", *SMALL, "--seeds", "2", "--resume", out=tmp_path) == 0
    assert calls == [("adamw", runner.ARENA_OPTIMIZERS["adamw"]["lr"], 1), ("lion", runner.ARENA_OPTIMIZERS["lion"]["lr"], 1)]
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert sorted((r["optimizer"], r["seed"]) for r in runs) == [("adamw", 0), ("adamw", 1), ("lion", 0), ("lion", 1)]


def test_resume_refuses_a_different_task(tmp_path, capsys):
    assert arena("--optimizers", "adamw", *SMALL, out=tmp_path) == 0
    assert arena("--optimizers", "adamw", *SMALL, "--steps", "5", "--resume", out=tmp_path) == 2
    assert "another task (steps: 4 there, 5 now)" in capsys.readouterr().err  # names the setting


def test_a_new_arena_says_it_discards_the_runs_logged_in_its_folder(tmp_path, capsys):
    assert arena("--optimizers", "adamw", *SMALL, out=tmp_path) == 0
    capsys.readouterr()
    assert arena("--optimizers", "adamw", *SMALL, out=tmp_path) == 0
    assert "discarding the 1 run logged there (--resume keeps them)" in capsys.readouterr().err


def test_resume_refuses_a_data_file_changed_since(tmp_path, capsys):
    """The task holds the corpus's SHA-256: a file rewritten since is another task (its runs had
    been ranked with the new ones)."""
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    assert arena("--optimizers", "adamw", *SMALL, "--data", str(text), out=tmp_path / "out") == 0
    text.write_text("pack my box with five dozen liquor jugs! " * 40)
    assert arena("--optimizers", "adamw", *SMALL, "--data", str(text), "--resume", out=tmp_path / "out") == 2
    assert "another task" in capsys.readouterr().err


def test_resume_after_a_torn_or_empty_log(tmp_path, monkeypatch):
    """A last line torn by a kill is dropped (the next record had been appended onto it, and that run
    then trained on every resume), and an empty log starts a new one (records had been appended
    without a task line)."""
    assert arena("--optimizers", "adamw,lion", *SMALL, out=tmp_path) == 0
    log = tmp_path / runner.LOG_NAME
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:2]) + "\n" + lines[2][:40])  # lion's record torn
    calls = []
    train_run = command.train_run
    monkeypatch.setattr(command, "train_run", lambda *a, **k: calls.append(a[2]) or train_run(*a, **k))
    for _ in range(2):
        assert arena("--optimizers", "adamw,lion", *SMALL, "--resume", out=tmp_path) == 0
    assert calls == ["lion"]
    assert all(json.loads(line) for line in log.read_text().splitlines())
    log.write_text("")
    assert arena("--optimizers", "adamw", *SMALL, "--resume", out=tmp_path) == 0
    assert arena("--optimizers", "adamw", *SMALL, "--resume", out=tmp_path) == 0
    assert calls == ["lion", "adamw"]


def test_ctrl_c_keeps_finished_runs_and_resume_runs_the_rest(tmp_path, monkeypatch, capsys):
    train_run = command.train_run

    def interrupted_second_run(*args, **kwargs):
        if args[2] == "lion":
            raise KeyboardInterrupt
        return train_run(*args, **kwargs)

    monkeypatch.setattr(command, "train_run", interrupted_second_run)
    assert arena("--optimizers", "adamw", "lion", *SMALL, out=tmp_path) == 130
    assert "add --resume" in capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    assert not results["complete"] and [r["optimizer"] for r in results["runs"]] == ["adamw"]
    assert "**Partial**: interrupted after 1 finished run(s)" in (tmp_path / "results.md").read_text()
    monkeypatch.setattr(command, "train_run", train_run)
    assert arena("--optimizers", "adamw", "lion", *SMALL, "--resume", out=tmp_path) == 0
    assert [r["optimizer"] for r in json.loads((tmp_path / "results.json").read_text())["runs"]] == ["adamw", "lion"]
    assert "Partial" not in (tmp_path / "results.md").read_text()


def test_a_new_arena_in_a_used_folder_removes_the_old_reports(tmp_path, monkeypatch):
    """Without --resume the run log starts over, and the reports of the arena before go with it (an
    interrupted new arena had left them beside a log that no longer held their runs)."""
    assert arena("--optimizers", "adamw", *SMALL, out=tmp_path) == 0
    assert (tmp_path / "results.md").exists()

    def interrupted():
        raise KeyboardInterrupt
    monkeypatch.setattr(command, "set_threads", interrupted)  # stopped once the log is made, before any run
    with pytest.raises(KeyboardInterrupt):
        arena("--optimizers", "adamw", *SMALL, out=tmp_path)
    assert not (tmp_path / "results.md").exists() and not (tmp_path / "results.json").exists()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("adamw", "expected NAME=LR"),
        ("=1e-3", "expected NAME=LR"),
        ("adamw=", "expected NAME=LR"),
        ("adamw=fast", "not a number"),
        ("adamw=1e-3,x", "not a number"),
        ("adamw=-1e-3", "positive and finite"),
        ("adamw=nan", "positive and finite"),
        ("adamv=1e-3", "did you mean adamw"),
    ],
)
def test_lr_parsing_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        command.parse_lr_specs([spec], ["adamw", "lion"])


def test_an_lr_given_twice_is_one_lr_and_repeated_optimizer_options_add_up(tmp_path):
    """``--lr adamw=1e-3,0.001`` is one lr (it had trained seed 0 twice, reported as two seeds with
    no spread), and ``--optimizers`` given twice takes both lists (it had kept the last)."""
    assert command.parse_lr_specs(["adamw=1e-3,0.001,2e-3"], ["adamw"]) == {"adamw": (1e-3, 2e-3)}
    assert arena("--optimizers", "adamw", "--optimizers", "lion", "--lr", "adamw=1e-3,0.001", *SMALL, out=tmp_path) == 0
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert sorted((r["optimizer"], r["seed"]) for r in runs) == [("adamw", 0), ("lion", 0)]


def test_lr_grids_from_values_defaults_and_sweep():
    given = command.parse_lr_specs(["adamw=1e-3", "lion=1e-4,2e-4"], ["adamw", "lion", "came"])
    assert given == {"adamw": (1e-3,), "lion": (1e-4, 2e-4)}
    assert command.lr_grids(["adamw", "lion", "came"], given, sweep=False) == {
        "adamw": (1e-3,), "lion": (1e-4, 2e-4), "came": (runner.ARENA_OPTIMIZERS["came"]["lr"],),
    }  # fmt: skip
    swept = command.lr_grids(["adamw"], given, sweep=True)["adamw"]
    assert swept == tuple(1e-3 * f for f in runner.SWEEP_FACTORS)
    with pytest.raises(ValueError, match="no default lr for mars-lion"):
        command.lr_grids(["mars-lion"], {}, sweep=False)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lr", "adamw=1e-3", "--lr", "adamw=2e-3"], "given twice"),
        (["--optimizers", "adamw", "--lr", "lion=1e-4"], "does not include"),
        (["--optimizers", "adamx"], "did you mean adamw"),
        (["--device", "tpu"], "expected cpu, cuda"),
    ],
)
def test_option_errors_exit_with_status_2(args, message, tmp_path, capsys):
    assert arena(*args, out=tmp_path) == 2
    assert message in capsys.readouterr().err


def test_python_dash_m_shine_lists_the_arena():
    result = subprocess.run([sys.executable, "-m", "shine", "arena", "--help"], capture_output=True, text=True, check=True)
    assert "--sweep" in result.stdout and "--resume" in result.stdout


def test_data_option_trains_on_a_given_text_file(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 100)
    assert arena("--optimizers", "adamw", *SMALL, "--data", str(text), out=tmp_path / "out") == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["task"]["data"] == str(text) and results["task"]["corpus"] == str(text)


def test_a_non_finite_gradient_marks_the_run_diverged(tmp_path, capsys):
    """An lr so high that the gradient turns non-finite before the loss does is a diverged run in
    the table, as a non-finite loss is (it had ended the whole arena with the optimizer's error);
    lrs that differ in their fourth digit print apart."""
    assert arena("--optimizers", "adamw", *SMALL, "--lr", "adamw=1e-3,1.0004e-3,1e4", out=tmp_path) == 0
    runs = {r["lr"]: r for r in json.loads((tmp_path / "results.json").read_text())["runs"]}
    assert runs[1e4]["diverged"] and not runs[1e-3]["diverged"]
    table = (tmp_path / "results.md").read_text()
    assert "| adamw | 10000 | diverged |" in table and "| 0.0010004 |" in table
    assert "3 runs (1 optimizer, seeds: 1)" in capsys.readouterr().out


def test_an_output_folder_inside_the_data_folder_is_not_data(tmp_path):
    """``--out`` inside ``--data``'s folder: the arena's own log and reports are not read as text
    (they had changed the data, and so the losses, from one run to the next)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 100)
    losses = []
    for _ in range(2):
        assert arena("--optimizers", " adamw", *SMALL, "--data", str(corpus), out=corpus / "out") == 0
        losses.append(json.loads((corpus / "out" / "results.json").read_text())["summary"][0]["val_loss_mean"])
    assert losses[0] == losses[1]

