"""bench/run.py's contract without running a benchmark: a missing peer is named with the setup hint and a
clean non-zero exit (no traceback), and every row carries the machine it ran on (CPU, flags, cores, load)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from bench import classify, run
from bench.common import INT8_FLAGS, SETUP_HINT, machine


def test_missing_peer_names_it_and_the_setup_hint(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(classify, "PEER_PYTHON", str(tmp_path / "no-venv" / "bin" / "python"))
    monkeypatch.setattr(classify, "run", lambda quick: pytest.fail("the bench ran without its peer"))
    monkeypatch.setattr(run, "ensure_models", lambda mod: pytest.fail("models built before the peer check"))
    rc = run.main(["classify", "--quick"])
    err = capsys.readouterr().err
    assert rc == run.MISSING_PEER != 0
    assert "sentence-transformers" in err and str(tmp_path / "no-venv") in err
    assert SETUP_HINT in err and "bash bench/setup" in err
    assert "Traceback" not in err


def test_every_row_carries_the_machine(monkeypatch, capsys, tmp_path):
    fake = types.ModuleType("bench.fake")
    fake.run = lambda quick: [{"name": "fake", "ours": 3.0, "peer": 2.0, "unit": "x/s"},
                              {"name": "fake_no_peer", "ours": 1.0, "peer": None, "unit": "x/s"}]
    monkeypatch.setitem(sys.modules, "bench.fake", fake)
    monkeypatch.setattr(run, "NAMES", (*run.NAMES, "fake"))
    out = tmp_path / "rows.json"
    assert run.main(["fake", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert rows == json.loads(capsys.readouterr().out)
    assert [r["ratio"] for r in rows] == [1.5, None]
    for row in rows:
        m = row["machine"]
        assert m["cpu_model"] and m["cores"] >= 1 and len(m["load_avg"]) == 3
        assert set(m["cpu_flags"]) == set(INT8_FLAGS) and all(isinstance(v, bool) for v in m["cpu_flags"].values())
        assert {"avx2", "avx512_vnni", "avx_vnni", "amx_int8"} <= set(m["cpu_flags"])


def test_machine_reads_this_cpu():
    m = machine()
    flags = Path("/proc/cpuinfo").read_text().split()
    assert m["cpu_flags"]["avx2"] == ("avx2" in flags)
