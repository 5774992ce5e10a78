"""The systemd user units in contrib/systemd, checked with ``systemd-analyze verify --user``.

Nothing is started or enabled: systemd-analyze only loads the unit files.
HOME and XDG_RUNTIME_DIR point at a temporary directory whose
``.local/bin`` holds the programs of this checkout, because verify also
checks that each ExecStart= program exists.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT_DIR = Path(__file__).resolve().parent.parent / "contrib" / "systemd"
UNITS = ["tpmsigner-agent.socket", "tpmsigner-agent.service", "tpmsigner-serve.service"]

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is missing; scripts/setup installs systemd"
)


def verify(tmp_path: Path, unit_files: list[Path]) -> subprocess.CompletedProcess[str]:
    home = tmp_path / "home"
    runtime = tmp_path / "runtime"
    (home / ".local" / "bin").mkdir(parents=True, exist_ok=True)
    runtime.mkdir(mode=0o700, exist_ok=True)
    for program in ("tpmsigner", "tpmsigner-agent"):
        link = home / ".local" / "bin" / program
        if not link.exists():
            link.symlink_to(Path(sys.executable).parent / program)
    environment = {**os.environ, "HOME": str(home), "XDG_RUNTIME_DIR": str(runtime)}
    return subprocess.run(
        ["systemd-analyze", "verify", "--user", *map(str, unit_files)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


def unit_text(name: str) -> str:
    return (UNIT_DIR / name).read_text()


def test_units_verify_cleanly(tmp_path: Path) -> None:
    result = verify(tmp_path, [UNIT_DIR / name for name in UNITS])

    assert result.returncode == 0, result.stderr
    about_ours = [line for line in result.stderr.splitlines() if "tpmsigner" in line]
    assert about_ours == []


def test_verify_reports_a_broken_unit(tmp_path: Path) -> None:
    # The check above can fail: a misspelt setting is reported.
    broken = tmp_path / "tpmsigner-serve.service"
    broken.write_text(unit_text("tpmsigner-serve.service").replace("ProtectSystem=strict", "ProtectSystem=strictly"))

    result = verify(tmp_path, [broken])

    assert "tpmsigner-serve.service" in result.stderr
    assert "strictly" in result.stderr


def test_socket_unit_is_private_to_the_user() -> None:
    lines = unit_text("tpmsigner-agent.socket").splitlines()

    assert "ListenStream=%t/tpmsigner-agent/agent.sock" in lines
    assert "SocketMode=0600" in lines
    assert "DirectoryMode=0700" in lines
    assert "WantedBy=sockets.target" in lines


def test_agent_service_runs_in_foreground() -> None:
    lines = unit_text("tpmsigner-agent.service").splitlines()

    assert "ExecStart=%h/.local/bin/tpmsigner-agent run -D" in lines
    assert "Requires=tpmsigner-agent.socket" in lines
    assert "NoNewPrivileges=yes" in lines


def test_serve_service_is_hardened_and_uses_command_approver() -> None:
    lines = unit_text("tpmsigner-serve.service").splitlines()

    for setting in (
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "ProtectSystem=strict",
        "ProtectHome=read-only",
        "ReadWritePaths=%h/.local/share/tpmsigner",
    ):
        assert setting in lines
    assert "Environment=TPMSIGNER_APPROVER=command:%h/.config/tpmsigner/approve" in lines
    assert not any(line.startswith("PrivateDevices=") for line in lines), "the signer needs /dev/tpmrm0"


# ---- the approver that the serve unit suggests ------------------------------------------

# Stands in for the ssh-askpass window, which needs a display: it records the
# prompt and answers from a file, as a person would type or cancel.
_ASKPASS_SOURCE = """\
#!/bin/sh
printf '%s\\n---\\n' "$1" >> '{directory}/prompts'
answer=$(cat '{directory}/answer')
[ "$answer" = cancel ] && exit 1
printf '%s\\n' "$answer"
"""


@pytest.fixture
def askpass(tmp_path: Path, monkeypatch) -> Path:
    directory = tmp_path / "askpass"
    directory.mkdir()
    program = directory / "fake-ssh-askpass"
    program.write_text(_ASKPASS_SOURCE.format(directory=directory))
    program.chmod(0o755)
    monkeypatch.setenv("SSH_ASKPASS", str(program))
    return directory


def test_askpass_approver_shows_request_and_passes_pin(chain, sshd_factory, askpass: Path) -> None:
    pin = "4711-askpass"
    public_line = chain.keygen("work", pin)
    chain.pair()
    (askpass / "answer").write_text(pin + "\n")
    chain.start_signer(approver=f"command:{UNIT_DIR / 'approve-askpass'}")
    chain.start_agent()
    sshd = sshd_factory(authorized_keys=[public_line])

    approved = subprocess.run(sshd.ssh_command(chain.agent_socket, "echo in"), capture_output=True, text=True, timeout=60)
    (askpass / "answer").write_text("cancel\n")
    cancelled = subprocess.run(sshd.ssh_command(chain.agent_socket, "echo in"), capture_output=True, text=True, timeout=60)

    assert approved.returncode == 0, approved.stderr
    assert approved.stdout.strip() == "in"
    assert cancelled.returncode == 255
    prompts = (askpass / "prompts").read_text().split("\n---\n")
    first = prompts[0]
    assert first.startswith("tpmsigner: enter the PIN of key work (SHA256:")
    assert "device: test-laptop" in first
    assert "purpose: ssh-login" in first
    assert f"destination: {sshd.user}@127.0.0.1 (verified)" in first
    assert pin not in (askpass / "prompts").read_text()
