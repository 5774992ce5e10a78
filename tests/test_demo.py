"""scripts/demo, run as a new user runs it: on a terminal, and with its output piped to a file.

The demo starts its own swtpm, signer, agent and sshd on 127.0.0.1 and
stops them before it exits.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.support.swtpm import REPO_ROOT
from tests.support.terminal import TerminalProcess

DEMO = REPO_ROOT / "scripts" / "demo"
# The demo takes a few seconds, but scripts/setup inside it may install packages on a new machine.
DEMO_TIMEOUT = 300.0
BOLD = "\x1b[1m"
ESCAPE = "\x1b"


@pytest.fixture
def demo_environment(tmp_path: Path) -> dict[str, str]:
    """The test's environment, with the agent's state directory under tmp_path."""
    return {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}


def test_demo_piped_prints_plain_text(demo_environment: dict[str, str], tmp_path: Path) -> None:
    result = subprocess.run(
        [str(DEMO)],
        env=demo_environment,
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )

    assert result.returncode == 0, result.stderr
    assert "==> Starting swtpm, a software TPM, on 127.0.0.1\n" in result.stdout
    assert "with a key that never left the TPM" in result.stdout
    assert ESCAPE not in result.stdout
    # The agent's audit log stays in the demo's temporary directory, out
    # of the user's own log under $XDG_STATE_HOME.
    assert not (tmp_path / "state").exists()


def test_demo_on_terminal_prints_bold_titles(demo_environment: dict[str, str]) -> None:
    terminal = TerminalProcess([str(DEMO)], env=demo_environment)
    try:
        status = terminal.wait(timeout=DEMO_TIMEOUT)
    finally:
        terminal.close()

    assert status == 0, terminal.output
    assert f"{BOLD}==> Starting swtpm, a software TPM, on 127.0.0.1" in terminal.output
    assert "with a key that never left the TPM" in terminal.output
