"""Socket activation without systemd: the test plays systemd's part.

The test creates the listening socket, and a small wrapper puts it on file
descriptor 3, sets LISTEN_PID to its own pid and LISTEN_FDS=1, then execs
``tpmsigner-agent run``, which keeps that pid, as systemd does before it
execs a service (sd_listen_fds(3)).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import wait_until
from tests.support.chain import AGENT_COMMAND, Chain, ManagedProcess

PIN = "4711-activation"
NOBODY = 65534

# argv: FD LISTEN_PID COMMAND... ; an empty LISTEN_PID means "this process".
_ACTIVATE = """\
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ["LISTEN_PID"] = sys.argv[2] or str(os.getpid())
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_FDNAMES"] = "agent.sock"
os.execvp(sys.argv[3], sys.argv[3:])
"""


def listening_socket(path: Path) -> socket.socket:
    """Create the socket as tpmsigner-agent.socket would: AF_UNIX stream, mode 0600, listening."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, 0o600)
    sock.listen(16)
    return sock


def start_activated(
    chain: Chain, sock: socket.socket, *run_args: str, listen_pid: str = "", name: str = "activated-agent"
) -> ManagedProcess:
    """Start ``tpmsigner-agent run`` with ``sock`` as systemd's fd 3; the agent joins chain's teardown."""
    log_file = chain.workdir / f"{name}.log"
    argv = [
        sys.executable,
        "-c",
        _ACTIVATE,
        str(sock.fileno()),
        listen_pid,
        *AGENT_COMMAND,
        "--home",
        str(chain.agent_home),
        "run",
        *run_args,
    ]
    with open(log_file, "wb") as log:
        process = subprocess.Popen(
            argv,
            env=chain.environment(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            pass_fds=(sock.fileno(),),
            start_new_session=True,
        )
    agent = ManagedProcess(name, process, log_file)
    chain.agent = agent
    return agent


def wait_for_log(agent: ManagedProcess, marker: str) -> None:
    def logged() -> bool:
        if not agent.is_running():
            raise AssertionError(f"the agent exited with {agent.process.returncode}:\n{agent.log_text()}")
        return marker in agent.log_text()

    wait_until(logged, 15, f"the agent to log {marker!r}")


def ssh_add(chain: Chain, socket_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ssh-add", *args],
        env={**chain.environment(), "SSH_AUTH_SOCK": str(socket_path)},
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_activated_agent_serves_the_passed_socket(chain: Chain, short_tmp_path: Path) -> None:
    public_line = chain.keygen("work", PIN)
    chain.pair()
    chain.start_signer()
    path = short_tmp_path / "activated.sock"
    sock = listening_socket(path)

    # No -D: with a socket from systemd the agent must not fork.
    agent = start_activated(chain, sock)
    sock.close()
    wait_for_log(agent, f"agent listening on {path}")
    listed = ssh_add(chain, path, "-L")

    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.strip() == public_line
    assert agent.is_running()
    assert "serving the socket passed by systemd in the foreground" in agent.log_text()

    agent.stop()
    assert agent.process.returncode == 0
    # The socket belongs to the .socket unit, which removes it.
    assert path.is_socket()
    assert "agent stopped" in agent.log_text()


def test_activated_agent_ignores_socket_option(chain: Chain, short_tmp_path: Path) -> None:
    chain.pair()
    path = short_tmp_path / "activated.sock"
    sock = listening_socket(path)
    other = short_tmp_path / "other.sock"

    agent = start_activated(chain, sock, "-D", "--socket", str(other))
    sock.close()
    wait_for_log(agent, f"agent listening on {path}")

    assert f"ignoring --socket {other}" in agent.log_text()
    assert not other.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="running a client as another uid needs root")
def test_activated_socket_still_checks_peer_uid(chain: Chain, short_tmp_path: Path) -> None:
    public_line = chain.keygen("work", PIN)
    chain.pair()
    chain.start_signer()
    path = short_tmp_path / "activated.sock"
    sock = listening_socket(path)
    agent = start_activated(chain, sock, "-D")
    sock.close()
    wait_for_log(agent, "agent listening on")
    # A socket unit with a loose SocketMode= must not open the agent to others.
    short_tmp_path.chmod(0o755)
    path.chmod(0o777)

    listed = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "ssh-add", "-L"],
        env={**chain.environment(), "SSH_AUTH_SOCK": str(path)},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert listed.returncode != 0
    assert public_line not in listed.stdout
    assert f"refused an agent connection from uid {NOBODY}" in agent.log_text()
    assert ssh_add(chain, path, "-L").stdout.strip() == public_line


def test_wrong_listen_pid_falls_back_to_own_socket(chain: Chain, short_tmp_path: Path) -> None:
    public_line = chain.keygen("work", PIN)
    chain.pair()
    chain.start_signer()
    passed = short_tmp_path / "not-for-us.sock"
    sock = listening_socket(passed)
    own = short_tmp_path / "own.sock"

    # pid 1 is never the agent's pid here: systemd meant the socket for another process.
    agent = start_activated(chain, sock, "-D", "--socket", str(own), listen_pid="1")
    sock.close()
    wait_for_log(agent, f"agent listening on {own}")

    assert "ignoring LISTEN_FDS: LISTEN_PID=1 names another process" in agent.log_text()
    assert ssh_add(chain, own, "-L").stdout.strip() == public_line
    agent.stop()
    assert not own.exists()
    assert passed.is_socket()


@pytest.mark.parametrize(
    ("make_socket", "message"),
    [
        (
            lambda path: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM),
            "a socket of family AF_UNIX and type SOCK_DGRAM; the agent needs an AF_UNIX SOCK_STREAM socket",
        ),
        (
            lambda path: socket.socket(socket.AF_INET, socket.SOCK_STREAM),
            "a socket of family AF_INET and type SOCK_STREAM",
        ),
        (lambda path: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), "a UNIX socket that is not listening"),
    ],
    ids=["datagram", "inet", "not-listening"],
)
def test_unsuitable_passed_socket_is_rejected(chain: Chain, short_tmp_path: Path, make_socket, message: str) -> None:
    chain.pair()
    sock = make_socket(short_tmp_path / "bad.sock")

    agent = start_activated(chain, sock, "-D")
    sock.close()
    agent.process.wait(timeout=30)

    assert agent.process.returncode == 1
    assert message in agent.log_text()
    assert "Traceback" not in agent.log_text()


def test_passed_file_that_is_not_a_socket_is_rejected(chain: Chain, tmp_path: Path) -> None:
    chain.pair()
    plain = open(tmp_path / "plain-file", "wb")

    agent = start_activated(chain, plain, "-D")  # type: ignore[arg-type]  # any object with fileno()
    plain.close()
    agent.process.wait(timeout=30)

    assert agent.process.returncode == 1
    assert "socket activation passed file descriptor 3, but it is not a socket" in agent.log_text()


def test_activation_variables_are_not_inherited(tmp_path: Path, short_tmp_path: Path) -> None:
    # The agent starts no program itself, so a small script calls the same
    # function and then runs env(1) as a child.
    script = (
        "import subprocess\n"
        "from tpmsigner_agent.activation import take_activated_socket\n"
        "sock = take_activated_socket()\n"
        "print('socket', sock.getsockname(), flush=True)\n"
        "subprocess.run(['env'], check=True)\n"
    )
    path = short_tmp_path / "activated.sock"
    sock = listening_socket(path)

    result = subprocess.run(
        [sys.executable, "-c", _ACTIVATE, str(sock.fileno()), "", sys.executable, "-c", script],
        pass_fds=(sock.fileno(),),
        capture_output=True,
        text=True,
        timeout=30,
    )
    sock.close()

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"socket {path}"
    assert not [line for line in lines if line.startswith(("LISTEN_PID=", "LISTEN_FDS=", "LISTEN_FDNAMES="))]
