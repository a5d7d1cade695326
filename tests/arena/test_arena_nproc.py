"""`shine arena --nproc 2`: every run under FSDP2 on 2 gloo processes gives one process's losses."""

import json

import pytest

from shine import cli

RUN = ["--model", "nano", "--steps", "6", "--seq-len", "16", "--batch-size", "4", "--seeds", "1",
       "--optimizers", "adamw", "came", "c-mars-adamw"]


def _runs(out):
    return {r["optimizer"]: r for r in json.loads((out / "results.json").read_text())["runs"]}


def test_nproc_matches_one_process(tmp_path):
    assert cli.main(["arena", *RUN, "--out", str(tmp_path / "one")]) == 0
    assert cli.main(["arena", *RUN, "--nproc", "2", "--out", str(tmp_path / "two")]) == 0
    one, two = _runs(tmp_path / "one"), _runs(tmp_path / "two")
    assert set(one) == set(two) == {"adamw", "came", "c-mars-adamw"}
    for name in one:
        # Sharded reductions add in another order (1e-7 relative); caution's mask turns such
        # differences into a few coordinates kept or dropped, which reach 1e-5 of the loss by step 6.
        rel = 1e-4 if name.startswith("c-") else 1e-5
        assert two[name]["train_losses"] == pytest.approx(one[name]["train_losses"], rel=rel), name
        assert two[name]["grad_norms"] == pytest.approx(one[name]["grad_norms"], rel=rel), name  # FSDP2's global norm
        assert two[name]["final_val_loss"] == pytest.approx(one[name]["final_val_loss"], rel=rel), name
        # the shards of all the ranks together (rank 0's alone had been reported, half the state): one
        # process's state, and a little more (CAME: 1.7% on this model), the step counts and CAME's
        # statistics along a split dim being whole on each rank
        assert one[name]["state_mb"] <= two[name]["state_mb"] < 1.05 * one[name]["state_mb"], name


def test_nproc_must_divide_the_batch(tmp_path, capsys):
    assert cli.main(["arena", *RUN, "--batch-size", "5", "--nproc", "2", "--out", str(tmp_path)]) == 2
    assert "must divide" in capsys.readouterr().err
