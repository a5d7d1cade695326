"""``shine bench`` (benchmarks/step_speed.py): its rows, figures and JSON on a tiny GPT-2."""
import json

import pytest
import torch

from shine import bench


def test_bench_rows_and_json(tmp_path, capsys):
    """Every requested (optimizer, path) row is timed against fused AdamW in the same run, with
    state bytes from the optimizer (AdamW 8 per parameter, CAME far less) and consistent figures."""
    out = tmp_path / "speed.json"
    argv = ["--device", "cpu", "--scale", "tiny", "--only", "adamw", "came", "--paths", "foreach", "per_tensor",
            "--no-extras", "--no-external", "--steps", "2", "--json", str(out)]
    assert bench.main(argv) == 0
    figures = json.loads(out.read_text())
    meta, rows = figures["meta"], {(r["optimizer"], r["path"]): r for r in figures["rows"]}
    assert meta["params"] == sum(torch.Size(s).numel() for s in bench.gpt2_shapes(*bench.SCALES["tiny"]))
    assert meta["device"] == "cpu"
    assert {("adamw", "foreach"), ("adamw", "per_tensor"), ("came", "foreach"), ("came", "per_tensor"),
            ("torch AdamW(fused=True)", "torch")} <= set(rows)
    assert rows["adamw", "foreach"]["state_bytes_per_param"] == pytest.approx(8.0, abs=0.01)
    assert rows["came", "foreach"]["state_bytes_per_param"] < 4.4
    for r in rows.values():
        assert r["median_s"] > 0 and r["ns_per_param"] == pytest.approx(r["median_s"] * 1e9 / meta["params"])
        assert r["ratio_to_fused_adamw"] == pytest.approx(r["median_s"] / r["baseline_median_s"])
        assert r["bandwidth_fraction"] == pytest.approx(r["gb_per_s"] / meta["in_place_gb_per_s"])
    assert "came" in capsys.readouterr().out


def test_bench_device_defaults_to_cuda_when_present(monkeypatch):
    """``--device auto`` (the default) times the GPU where there is one, else the CPU."""
    seen = []
    monkeypatch.setattr(bench, "make_params", lambda shapes, dtype, device: seen.append(device) or 1 / 0)
    for cuda in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU", raising=False)
        with pytest.raises(ZeroDivisionError):
            bench.main(["--scale", "tiny", "--json", ""])
    assert [d.type for d in seen] == ["cpu", "cuda"]


def test_bench_refuses_a_missing_or_unknown_device():
    """--device names a device type this machine lacks, or no device: a clear exit, not a traceback."""
    with pytest.raises(SystemExit, match="--device foo: not a device"):
        bench.main(["--device", "foo", "--scale", "tiny", "--json", ""])
    with pytest.raises(SystemExit, match="--device meta: no meta device is available"):
        bench.main(["--device", "meta", "--scale", "tiny", "--json", ""])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no cuda device is available"):
            bench.main(["--device", "cuda", "--scale", "tiny", "--json", ""])
