"""What the agent loads at start: nothing of the TPM stack and no asyncssh.

The agent has no key, so it has no use for tpm2-pytss or the key store,
and asyncssh is imported in the background after the socket is ready
(agent/run.py).  Each of them adds tens of milliseconds to the agent's
start and megabytes to its memory, so a module-level import of one of them
in the agent's start-up path is a regression.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY_MODULES = ("asyncssh", "tpm2_pytss", "tpmsigner.store", "tpmsigner.tpm", "cryptography.x509")


@pytest.mark.parametrize("module", ["tpmsigner_agent.cli", "tpmsigner_agent.run"])
def test_agent_start_skips_heavy_modules(module: str) -> None:
    program = (
        f"import json, sys, {module}\n"
        f"print(json.dumps(sorted(name for name in {HEAVY_MODULES!r} if name in sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(result.stdout) == []


def test_heavy_module_check_detects_an_import() -> None:
    # Control: the same check finds asyncssh once something imports it.
    program = (
        "import json, sys, tpmsigner_agent.run, asyncssh\n"
        f"print(json.dumps(sorted(name for name in {HEAVY_MODULES!r} if name in sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=True
    )
    assert "asyncssh" in json.loads(result.stdout)
