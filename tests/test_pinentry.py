"""The pinentry approver with Debian's real pinentry-tty on a pseudo-terminal.

The signer runs with the pseudo-terminal as its controlling terminal, as if
``tpmsigner serve --approver pinentry:/usr/bin/pinentry-tty`` ran in a
terminal window.  The test reads the prompt and types at it.  pinentry-tty
1.2.1 reads in non-canonical mode: Enter ends the PIN, and Ctrl-D (or end of
file) cancels.
"""

from __future__ import annotations

import json
import subprocess
import termios
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import wait_until
from tests.support.chain import Chain
from tests.support.terminal import PseudoTerminal

PIN = "4711-pinentry"
PINENTRY_TTY = "/usr/bin/pinentry-tty"
APPROVER = f"pinentry:{PINENTRY_TTY}"
CTRL_D = b"\x04"
PROMPT = r"\nPIN: $"


@pytest.fixture
def terminal() -> Iterator[PseudoTerminal]:
    screen = PseudoTerminal()
    yield screen
    screen.close()


def start_signing(chain: Chain, public_line: str, namespace: str = "file") -> subprocess.Popen[str]:
    """Start ``ssh-keygen -Y sign`` through the agent; the signature waits for the prompt."""
    pub_file = chain.workdir / "work.pub"
    pub_file.write_text(public_line + "\n")
    message = chain.workdir / "message.txt"
    message.write_text("to be signed\n")
    return subprocess.Popen(
        ["ssh-keygen", "-Y", "sign", "-n", namespace, "-f", str(pub_file), str(message)],
        env=chain.agent_environment(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def start_chain(chain: Chain, terminal: PseudoTerminal, approval_timeout: float = 20.0) -> str:
    public_line = chain.keygen("work", PIN)
    chain.pair()
    chain.start_signer(approver=APPROVER, controlling_tty=terminal.terminal, approval_timeout=approval_timeout)
    chain.start_agent()
    return public_line


def last_audit_record(chain: Chain) -> dict[str, object]:
    return json.loads(chain.signer_audit_log.read_text().splitlines()[-1])


def echo_is_on(terminal: PseudoTerminal) -> bool:
    local_modes = termios.tcgetattr(terminal.terminal)[3]
    return bool(local_modes & termios.ECHO) and bool(local_modes & termios.ICANON)


def signer_children(chain: Chain) -> list[int]:
    assert chain.signer is not None
    children = Path(f"/proc/{chain.signer.process.pid}/task/{chain.signer.process.pid}/children")
    return [int(pid) for pid in children.read_text().split()]


def test_typed_pin_signs_login(chain: Chain, sshd_factory, terminal: PseudoTerminal) -> None:
    public_line = start_chain(chain, terminal)
    sshd = sshd_factory(authorized_keys=[public_line])

    login = subprocess.Popen(
        sshd.ssh_command(chain.agent_socket, "echo logged-in"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    terminal.expect(PROMPT)
    terminal.write(PIN.encode() + b"\n")
    stdout, stderr = login.communicate(timeout=60)

    assert login.returncode == 0, stderr
    assert stdout.strip() == "logged-in"
    shown = terminal.drain()
    assert "Signature request #1\n" in shown
    assert "device: test-laptop\n" in shown
    assert "key: work (SHA256:" in shown
    assert "purpose: ssh-login\n" in shown
    assert f"destination: {sshd.user}@127.0.0.1 (verified)\n" in shown
    assert f"-p {sshd.port} {sshd.user}@127.0.0.1 'echo logged-in'\n" in shown
    assert PIN not in shown
    assert chain.signer is not None
    assert PIN not in chain.signer.log_text()
    assert last_audit_record(chain)["outcome"] == "approved"
    assert echo_is_on(terminal)


def test_ctrl_d_cancels_and_refuses(chain: Chain, terminal: PseudoTerminal) -> None:
    public_line = start_chain(chain, terminal)

    signing = start_signing(chain, public_line)
    terminal.expect(PROMPT)
    terminal.write(CTRL_D)
    _, stderr = signing.communicate(timeout=30)

    assert signing.returncode != 0, stderr
    assert chain.signer is not None
    signer_log = chain.signer.log_text()
    assert "request #1: cancelled in the pinentry" in signer_log
    assert "request #1: denied by the approver" in signer_log
    assert "signed with" not in signer_log
    assert last_audit_record(chain)["outcome"] == "denied"
    assert "purpose: sshsig:file\n" in terminal.drain()
    assert echo_is_on(terminal)


def test_unanswered_prompt_times_out(chain: Chain, terminal: PseudoTerminal) -> None:
    public_line = start_chain(chain, terminal, approval_timeout=3.0)

    signing = start_signing(chain, public_line)
    terminal.expect(PROMPT)
    _, stderr = signing.communicate(timeout=30)

    assert signing.returncode != 0, stderr
    assert chain.signer is not None
    assert "request #1: no approval within 3 s: denied" in chain.signer.log_text()
    assert last_audit_record(chain)["outcome"] == "timed_out"
    # pinentry-tty is killed in the middle of reading, so the signer turns
    # the terminal's echo back on itself and writes what happened.
    terminal.expect(r"request #1 expired or was withdrawn; nothing was signed")
    assert echo_is_on(terminal)
    wait_until(lambda: not signer_children(chain), 5, "the killed pinentry to be reaped")


def test_peer_text_cannot_inject_commands(chain: Chain, terminal: PseudoTerminal) -> None:
    public_line = start_chain(chain, terminal)
    # The sshsig namespace is chosen by whoever asks for the signature and
    # is shown as the purpose, and again in the process command line.
    namespace = "ns\x1b[2J\nSETPROMPT injected:"

    signing = start_signing(chain, public_line, namespace=namespace)
    terminal.expect(PROMPT)
    terminal.write(CTRL_D)
    signing.communicate(timeout=30)

    shown = terminal.drain()
    assert "purpose: sshsig:ns\\x1b[2J\\x0aSETPROMPT injected:\n" in shown
    assert "\x1b" not in shown
    assert "injected: " not in shown.replace("SETPROMPT injected:", "")
    assert signing.returncode != 0


def test_missing_pinentry_stops_serve(chain: Chain) -> None:
    missing = chain.workdir / "no-such-pinentry"

    result = chain.tpmsigner(
        "serve", "--listen", f"127.0.0.1:{chain.signer_port}", "--approver", f"pinentry:{missing}", check=False
    )

    assert result.returncode == 1
    assert f"pinentry program {str(missing)!r} was not found" in result.stderr
    assert "apt install pinentry-tty" in result.stderr


def test_pinentry_without_terminal_or_display_stops_serve(chain: Chain, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)

    # chain.tpmsigner runs without a controlling terminal, as under systemd.
    result = chain.tpmsigner("serve", "--listen", f"127.0.0.1:{chain.signer_port}", "--approver", APPROVER, check=False)

    assert result.returncode == 1
    assert "needs a terminal or a graphical session" in result.stderr
