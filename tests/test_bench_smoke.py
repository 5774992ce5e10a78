"""The benchmark harness runs and its listings are correct (no timing is asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_list_identities_bench_runs() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "list_identities.py"), "--counts", "3", "--repeats", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )

    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 3 |")]
    assert len(rows) == 2
    assert "`ssh-add -L`" in rows[0]
    assert "`tpmsigner list`" in rows[1]
