"""benchmarks/side_by_side.py: shine next to the other implementations installed here."""

import re

import pytest


def test_came_rows_show_the_same_algorithm(side_by_side, capsys):
    """With came-pytorch installed (a test dependency), its CAME rows report float64 rounding for
    every parameter kind: shine's CAME is the published one."""
    pytest.importorskip("came_pytorch")
    side_by_side.main(["--steps", "3"])
    rows = [line for line in capsys.readouterr().out.splitlines() if "came-pytorch" in line]
    assert len(rows) == 2  # weight decay 0 and 0.1
    for row in rows:
        diffs = [float(x) for x in re.findall(r"\d\.\de[+-]\d\d", row)]
        assert len(diffs) == len(side_by_side.KINDS) and max(diffs) < 1e-13, row


def test_a_different_algorithm_shows(side_by_side):
    """The measure is not blind: MARS with another gamma moves every MARS-updated kind by far more
    than rounding, and the same optimizer twice by nothing."""
    import shine

    ours = side_by_side.trajectory(lambda ps: shine.MARS(ps, lr=3e-3, foreach=False), 5)
    again = side_by_side.trajectory(lambda ps: shine.MARS(ps, lr=3e-3, foreach=False), 5)
    other = side_by_side.trajectory(lambda ps: shine.MARS(ps, lr=3e-3, gamma=0.05, foreach=False), 5)
    assert side_by_side.relative_differences(ours, again) == [0.0] * len(side_by_side.KINDS)
    moved = dict(zip(side_by_side.KINDS, side_by_side.relative_differences(ours, other)))
    assert moved["matrix"] > 1e-6 and moved["tall"] > 1e-6
    assert moved["vector"] == 0.0 and moved["conv"] == 0.0  # AdamW's, as in the official code
