"""The benchmark harness runs, and every path it times signs correctly.

``python -m bench --quick`` goes through every phase with tiny counts.  It
starts swtpm, signs through the TPM2_Sign floor, through OpenSSH's agent
with tpm2-pkcs11 (behind tpm2-abrmd on a private D-Bus bus) and with a key
file, and through tpmsigner with an in-process and a ``command:`` approver.
Then it runs concurrent clients, listings, ssh logins, agent starts and the
memory phase.  No timing is asserted: the figures belong to bench/run
(docs/benchmarks.md).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SIGN_PATHS = {"floor", "pkcs11", "file", "inproc", "command"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, str]:
    output = tmp_path_factory.mktemp("bench")
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--output", str(output)],
        cwd=REPO,
        env={**os.environ, "TSS2_LOG": "all+NONE"},
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return json.loads((output / "results.json").read_text()), output, result.stdout


@pytest.mark.timeout(660)
def test_every_sign_path_verifies(quick_run) -> None:
    results, _, _ = quick_run
    assert set(results["sign"]) == SIGN_PATHS
    for path, summary in results["sign"].items():
        assert summary["count"] > 0, path
        assert summary["verified"] == summary["count"], path
        assert len(results["sign_samples"][path]) == summary["count"]


@pytest.mark.timeout(660)
def test_floor_sessions_all_verify(quick_run) -> None:
    # The floor's key signed with a password, an ESAPI session with and
    # without parameter encryption, and tpmsigner's own session.
    results, _, _ = quick_run
    sessions = results["floor_sessions"]
    assert len(sessions) == 4
    assert any("tpmsigner.tpmsession" in name for name in sessions)
    for name, summary in sessions.items():
        assert summary["count"] > 0, name
        assert summary["verified"] == summary["count"], name


@pytest.mark.timeout(660)
def test_concurrent_clients_all_verify(quick_run) -> None:
    results, _, _ = quick_run
    rows = results["throughput"]["rows"]
    assert [row["clients"] for row in rows] == results["options"]["clients"]
    for row in rows:
        assert row["failed"] == 0
        assert row["verified"] == row["signatures"] >= row["clients"]


@pytest.mark.timeout(660)
def test_other_phases_measured(quick_run) -> None:
    results, _, _ = quick_run
    # The listing phase checks that ssh-add -L printed exactly the identities.
    assert [row["identities"] for row in results["listing"]["rows"]] == results["options"]["counts"]
    # Every login succeeded, or the run would have stopped.
    assert results["logins"]["inproc"]["count"] == results["logins"]["file"]["count"] == results["options"]["logins"]
    assert results["startup"]["tpmsigner-agent"]["count"] == results["options"]["starts"]
    memory = results["memory"]
    assert memory["agents"] == results["options"]["memory_agents"]
    assert memory["signer_mib"] > 0
    assert memory["agent_max_mib"] > 0


@pytest.mark.timeout(660)
def test_report_has_every_section(quick_run) -> None:
    _, output, stdout = quick_run
    report = (output / "results.md").read_text()
    assert report in stdout
    for heading in (
        "### Figures against their targets",
        "### Sign latency",
        "### Throughput",
        "### Listing identities",
        "### `ssh ... true` on loopback",
        "### Start to first answered listing",
        "### Resident memory",
    ):
        assert heading in report
    # A quick run claims no target as met or missed.
    assert "not measurements" in report
    assert "| met |" not in report
    assert "not met" not in report
    if importlib.util.find_spec("matplotlib") is not None:
        assert (output / "benchmarks-sign-latency.png").read_bytes().startswith(b"\x89PNG")


def test_quick_run_refuses_write_docs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--write-docs"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2
    assert "cannot --write-docs" in result.stderr
