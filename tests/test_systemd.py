"""The shipped unit passes `systemd-analyze verify` with no warnings and scores <= 2.0 on exposure."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "edge-agent.service"
ANALYZE = shutil.which("systemd-analyze")
pytestmark = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed (.ci/setup installs it)")


def test_unit_verifies_clean(tmp_path: Path) -> None:
    # verify checks that ExecStart exists: point the install prefix at this venv, change nothing else.
    text = UNIT.read_text()
    assert "/opt/edge-agent/.venv/bin/edge-agent" in text
    unit = tmp_path / "edge-agent.service"
    unit.write_text(text.replace("/opt/edge-agent/.venv", sys.prefix))
    assert (Path(sys.prefix) / "bin" / "edge-agent").exists()
    r = subprocess.run([ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "" and r.stderr.strip() == "", r.stderr


def test_unit_settings() -> None:
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "StateDirectory=edge-agent",
        "NoNewPrivileges=yes",
    ):
        assert line in text
    assert re.search(r"^WatchdogSec=\d+", text, re.M)


def test_unit_exposure_at_most_2() -> None:
    r = subprocess.run([ANALYZE, "security", "--offline=true", str(UNIT)], capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout + r.stderr)
    assert m, r.stdout[-500:]
    assert float(m.group(1)) <= 2.0
