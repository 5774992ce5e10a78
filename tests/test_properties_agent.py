"""Property tests of what the agent reads from its clients' side.

ssh command lines from /proc, known_hosts files, process information, and
the addresses in its configuration.  None of them may raise anything but
the documented ConfigError, because the agent reads them while it handles
a sign request.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncssh
from hypothesis import example, given
from hypothesis import strategies as st

from tests.support.mutations import decoded_or_rejected, mutated, utf8_text
from tpmsigner.commands.signer import parse_listen
from tpmsigner.errors import ConfigError
from tpmsigner.protocol.messages import SignRequest, decode_message, encode_message
from tpmsigner_agent.config import parse_address, parse_signer_address
from tpmsigner_agent.destination import SshTarget, parse_ssh_command, verified_host_name
from tpmsigner_agent.peer import MAX_COMMAND_LINE, PeerCredentials, process_arguments, process_info

HOME = "/home/property"
# ssh(1) options, with and without an argument, as OpenSSH 9.2 accepts them.
SSH_FLAGS = ["-4", "-6", "-A", "-a", "-C", "-f", "-G", "-g", "-K", "-k", "-M", "-N", "-n", "-q", "-s", "-T", "-t", "-v", "-X", "-x", "-Y", "-y"]
SSH_OPTIONS_WITH_ARGUMENT = ["-B", "-b", "-c", "-D", "-E", "-e", "-F", "-I", "-i", "-J", "-L", "-l", "-m", "-O", "-o", "-P", "-p", "-Q", "-R", "-S", "-W", "-w"]
# Values that look like numbers to str.isdigit() but not all to int().
PORT_TEXTS = ["22", "0", "65535", "65536", "2222", "²", "٣", "1" * 5000, "-1", " 22", "22 ", ""]
OPTION_VALUES = [
    "Port=2222",
    "Port 2222",
    "port=²",
    "Port=" + "9" * 5000,
    "UserKnownHostsFile=~/kh /tmp/kh2",
    "UserKnownHostsFile",
    "HostKeyAlias=alias",
    "hostkeyalias",
    "=",
    "",
]
DESTINATIONS = [
    "host",
    "user@host",
    "user@host@other",
    "ssh://host",
    "ssh://user@host:2222/path",
    "ssh://[::1]:22",
    "ssh://[::1",
    "ssh://host:²",
    "ssh://[::1]:" + "1" * 5000,
    "ssh://",
    "-",
    "",
]


@st.composite
def ssh_command_lines(draw: st.DrawFn) -> list[str]:
    """Return an argv of ssh with options, a destination and a remote command."""
    arguments = [draw(st.sampled_from(["ssh", "/usr/bin/ssh", "scp", "ssh-keygen"]))]
    for _ in range(draw(st.integers(0, 5))):
        match draw(st.sampled_from(["flag", "option", "joined", "port", "end"])):
            case "flag":
                arguments.append(draw(st.sampled_from(SSH_FLAGS)))
            case "option":
                arguments += [draw(st.sampled_from(SSH_OPTIONS_WITH_ARGUMENT)), draw(st.sampled_from(OPTION_VALUES) | utf8_text(12))]
            case "joined":
                arguments.append(draw(st.sampled_from(["-o", "-p", "-l"])) + draw(st.sampled_from(OPTION_VALUES + PORT_TEXTS)))
            case "port":
                arguments += ["-p", draw(st.sampled_from(PORT_TEXTS))]
            case _:
                arguments.append("--")
    arguments.append(draw(st.sampled_from(DESTINATIONS) | utf8_text(16)))
    arguments += draw(st.lists(utf8_text(8), max_size=2))
    return arguments


@given(st.one_of(ssh_command_lines(), st.lists(utf8_text(12), max_size=6)))
@example(["ssh", "-p", "²", "host"]).via("a superscript digit passes str.isdigit() but not int()")
@example(["ssh", "-o", "Port=" + "1" * 5000, "host"]).via("a port over int()'s 4300-digit limit")
@example(["ssh", "ssh://host:٣"]).via("an Arabic-Indic digit in a URI port")
@example(["ssh", "-p"]).via("an option without its argument")
def test_ssh_command_line_gives_target_or_none(arguments: list[str]) -> None:
    target = parse_ssh_command(arguments, HOME)

    if target is None:
        return
    assert isinstance(target, SshTarget)
    assert target.port is None or 1 <= target.port <= 65535
    assert target.known_hosts_files
    assert all(isinstance(path, str) for path in target.known_hosts_files)


@given(st.sampled_from(["2222", "22", "65535"]))
def test_ssh_port_option_is_read(port: str) -> None:
    for arguments in (["ssh", "-p", port, "host"], ["ssh", "-p" + port, "host"], ["ssh", "-o", f"Port={port}", "host"]):
        target = parse_ssh_command(arguments, HOME)
        assert target is not None
        assert target.port == int(port)


# ---- known_hosts files ------------------------------------------------------

HOST_KEY = asyncssh.generate_private_key("ssh-ed25519")
OTHER_KEY = asyncssh.generate_private_key("ecdsa-sha2-nistp256")


def _hashed(name: str, salt: bytes) -> str:
    digest = hmac.new(salt, name.encode(), hashlib.sha1).digest()
    return f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"


@st.composite
def known_hosts_lines(draw: st.DrawFn) -> str:
    """Return one known_hosts line, sshd(8) "SSH_KNOWN_HOSTS FILE FORMAT"."""
    key = draw(st.sampled_from([HOST_KEY, OTHER_KEY]))
    name = draw(st.sampled_from(["host", "[host]:2222", "*.example", "!host", "h?st", "10.0.0.1"]))
    names = draw(st.sampled_from([name, f"{name},other", _hashed(name, draw(st.binary(min_size=20, max_size=20)))]))
    marker = draw(st.sampled_from(["", "@cert-authority ", "@revoked "]))
    key_text = key.export_public_key("openssh").decode().split()
    return f"{marker}{names} {key_text[0]} {key_text[1]}" + draw(st.sampled_from(["", " comment"]))


known_hosts_files = st.lists(known_hosts_lines() | st.sampled_from(["", "# comment", "   "]), max_size=5).map(
    lambda lines: ("\n".join(lines) + "\n").encode()
)


@contextlib.contextmanager
def file_with(content: bytes) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="tpms-prop-") as name:
        path = Path(name) / "known_hosts"
        path.write_bytes(content)
        yield path


@given(
    st.one_of(known_hosts_files, mutated(known_hosts_files), st.binary(max_size=200)),
    st.sampled_from(["host", "other", "10.0.0.1", "x.example", "[host]"]),
    st.none() | st.sampled_from([22, 2222]),
)
@example(b"h 0\x00\x00\n", "host", None).via("found by atheris: asyncssh raised NameError for a DER-like key")
def test_known_hosts_file_gives_name_and_flag(content: bytes, host: str, port: int | None) -> None:
    with file_with(content) as path:
        name, verified = verified_host_name(SshTarget(host, port, (str(path),)), HOST_KEY.public_data)

    assert name == host
    assert isinstance(verified, bool)


@given(st.sampled_from(["host", "10.0.0.1"]), st.booleans())
def test_known_hosts_entry_verifies_its_host(host: str, hashed: bool) -> None:
    names = _hashed(host, os.urandom(20)) if hashed else host
    line = f"{names} {HOST_KEY.export_public_key('openssh').decode().strip()}\n"

    with file_with(line.encode()) as path:
        target = SshTarget(host, None, (str(path),))
        assert verified_host_name(target, HOST_KEY.public_data) == (host, True)
        assert verified_host_name(target, OTHER_KEY.public_data) == (host, False)


# ---- process information (agent/peer.py) --------------------------------------

argument_bytes = st.binary(min_size=1, max_size=40).filter(lambda value: b"\0" not in value)


@given(st.lists(argument_bytes | st.sampled_from([b"x" * 700, "ü".encode() * 300]), max_size=4))
def test_process_info_of_any_arguments_encodes(arguments: list[bytes]) -> None:
    # A real process with these arguments.  Its /proc cmdline is empty until
    # execve() has set up the new stack, so the test waits for sh to print a
    # line; sh then waits on its stdin until the test closes that pipe.
    argv = [b"/bin/sh", b"-c", b"echo ready; read line", b"sh", *arguments]
    process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == b"ready\n"
        credentials = PeerCredentials(process.pid, os.getuid(), os.getgid())
        read_arguments = process_arguments(credentials)
        info = process_info(credentials)
    finally:
        process.communicate(b"\n", timeout=10)

    assert read_arguments == [value.decode("utf-8", errors="replace") for value in argv]
    assert info.pid == process.pid
    assert info.executable.endswith("sh") or "dash" in info.executable
    assert len(info.command_line) <= MAX_COMMAND_LINE
    request = SignRequest(1, b"key", b"data", 0, info)
    assert decode_message(encode_message(request)).process == info


def test_process_info_of_gone_process_is_empty() -> None:
    process = subprocess.Popen(["/bin/true"])
    process.wait(timeout=10)

    info = process_info(PeerCredentials(process.pid, os.getuid(), os.getgid()))

    assert info.executable == ""
    assert info.command_line == ""


# ---- addresses in the configuration -------------------------------------------

address_texts = st.one_of(
    st.sampled_from(["127.0.0.1:7810", "[::1]:22", "[fe80::1%eth0]:1", "host:65535", "mdns", "-"]),
    st.tuples(
        st.sampled_from(["127.0.0.1", "[::1]", "[fe80::1]", "host", "", " h", "[", "a:b"]),
        st.sampled_from(PORT_TEXTS),
    ).map(lambda pair: f"{pair[0]}:{pair[1]}"),
    utf8_text(24),
)


@given(address_texts)
@example("host:" + "1" * 5000).via("a port over int()'s 4300-digit limit")
def test_address_gives_host_and_port_or_config_error(text: str) -> None:
    for parse, lowest in ((parse_address, 1), (parse_signer_address, 0), (parse_listen, 0)):
        parsed = decoded_or_rejected(parse, text, (ConfigError,))
        if parsed is not None:
            host, port = parsed
            assert isinstance(host, str)
            assert lowest <= port <= 65535
