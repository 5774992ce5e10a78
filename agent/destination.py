"""The destination of a login: session bindings, and host names from known_hosts.

ssh binds each agent connection to the session it authenticates
(session-bind@openssh.com, see ``tpmsigner.protocol.sessionbind``).  Here
the agent keeps those bindings per connection, checks each userauth request
against the last one, and looks the bound host key up in the user's
known_hosts under the names the requesting ssh was given on its command
line.
"""

from __future__ import annotations

import logging
import os
import pwd
from dataclasses import dataclass, field


from tpmsigner.protocol.sessionbind import BindingEvidence, SessionBind
from tpmsigner.protocol.signeddata import SignedDataInfo

logger = logging.getLogger(__name__)

# OpenSSH's ssh-agent keeps at most this many bindings per connection and
# accepts session identifiers of at most this many bytes
# (AGENT_MAX_SESSION_IDS and AGENT_MAX_SID_LEN in ssh-agent.c).
MAX_BINDINGS = 16
MAX_SESSION_ID_LENGTH = 128

# ssh's options that take an argument (ssh(1), OpenSSH 9.2 getopt string).
_SSH_OPTIONS_WITH_ARGUMENT = set("BbcDEeFIiJLlmOoPpQRSWw")


class BindingRejected(Exception):
    """A session-bind request or a sign request breaks the binding rules."""


@dataclass
class ConnectionBindings:
    """The session bindings of one agent connection, oldest first."""

    bindings: list[SessionBind] = field(default_factory=list)

    def add(self, bind: SessionBind) -> None:
        """Record a verified binding, with the rules of OpenSSH's process_ext_session_bind."""
        if len(bind.session_id) > MAX_SESSION_ID_LENGTH:
            raise BindingRejected(f"the session identifier is longer than {MAX_SESSION_ID_LENGTH} bytes")
        for earlier in self.bindings:
            if not earlier.is_forwarding:
                # A connection bound for authentication serves that one
                # login; rebinding it would let it speak for two hosts.
                raise BindingRejected("the connection is already bound to a session for authentication")
            if earlier.session_id == bind.session_id:
                if earlier.host_key == bind.host_key:
                    return
                raise BindingRejected("the session identifier is already bound to another host key")
        if len(self.bindings) >= MAX_BINDINGS:
            raise BindingRejected(f"more than {MAX_BINDINGS} session bindings on one connection")
        self.bindings.append(bind)

    def check_login(self, info: SignedDataInfo) -> tuple[SessionBind | None, bool]:
        """Return (binding, forwarded) for a userauth request, or raise BindingRejected.

        Without bindings (an old ssh, or another client) there is nothing to
        check and the login stays unverified.
        """
        if not self.bindings:
            return None, False
        last = self.bindings[-1]
        if info.session_id != last.session_id:
            raise BindingRejected("the userauth request is for another session than the one bound")
        if info.host_key is not None and info.host_key != last.host_key:
            raise BindingRejected("the userauth request names another host key than the bound one")
        forwarded = any(earlier.is_forwarding for earlier in self.bindings[:-1]) or last.is_forwarding
        return last, forwarded


@dataclass(frozen=True)
class SshTarget:
    """The destination and known_hosts files named on an ssh command line."""

    host: str
    port: int | None
    known_hosts_files: tuple[str, ...]


def parse_ssh_command(arguments: list[str], home: str) -> SshTarget | None:
    """Find the destination host, the port and the known_hosts files of an ssh command line."""
    if not arguments or os.path.basename(arguments[0]) != "ssh":
        return None

    port: int | None = None
    known_hosts: list[str] = []
    host_key_alias = None
    destination = None
    index = 1
    while index < len(arguments):
        argument = arguments[index]
        if argument == "--":
            index += 1
            destination = arguments[index] if index < len(arguments) else None
            break
        if argument.startswith("-") and len(argument) > 1:
            letter = argument[1]
            if letter in _SSH_OPTIONS_WITH_ARGUMENT:
                if len(argument) > 2:
                    value = argument[2:]
                    index += 1
                else:
                    value = arguments[index + 1] if index + 1 < len(arguments) else ""
                    index += 2
                if letter == "p" and (number := _port_number(value)) is not None:
                    port = number
                elif letter == "o":
                    # ssh keeps the first value it reads for each -o option.
                    name, _, option_value = value.replace("=", " ", 1).partition(" ")
                    name = name.lower()
                    option_value = option_value.strip()
                    if name == "port" and port is None:
                        port = _port_number(option_value)
                    elif name == "userknownhostsfile" and not known_hosts:
                        known_hosts.extend(option_value.split())
                    elif name == "hostkeyalias" and host_key_alias is None:
                        host_key_alias = option_value
                continue
            index += 1
            continue
        destination = argument
        break

    if not destination:
        return None
    if destination.startswith("ssh://"):
        destination = destination[len("ssh://") :]
        authority = destination.split("/", 1)[0]
        host_part = authority.rsplit("@", 1)[-1]
        if host_part.startswith("["):
            host, _, rest = host_part[1:].partition("]")
            if rest.startswith(":"):
                port = port or _port_number(rest[1:])
        else:
            host, _, port_text = host_part.partition(":")
            port = port or _port_number(port_text)
    else:
        host = destination.rsplit("@", 1)[-1]

    if not known_hosts:
        known_hosts = [os.path.join(home, ".ssh", "known_hosts"), os.path.join(home, ".ssh", "known_hosts2")]
    files = tuple(os.path.expanduser(path) if not path.startswith("~") else path.replace("~", home, 1) for path in known_hosts)
    return SshTarget(host=host_key_alias or host, port=port, known_hosts_files=files)


def _port_number(text: str) -> int | None:
    """Return a TCP port from 1 to 65535 written in ASCII digits, else None.

    str.isdigit() alone also accepts digits such as "²" that int() rejects.
    """
    if not (text.isascii() and text.isdigit() and len(text) <= 5):
        return None
    number = int(text)
    return number if 1 <= number <= 65535 else None


def verified_host_name(target: SshTarget | None, host_key: bytes) -> tuple[str, bool]:
    """Return (host name, verified) for a bound host key and the requesting ssh's target.

    The name is verified when a known_hosts file of the user lists exactly
    this key for that host (plain or hashed entries, asyncssh's matching).
    """
    if target is None:
        return "", False
    # Imported here, not at start: see verify_session_bind.
    import asyncssh

    for path in target.known_hosts_files:
        if not os.path.isfile(path):
            continue
        try:
            known_hosts = asyncssh.read_known_hosts(path)
        except (OSError, ValueError, asyncssh.KeyImportError, NameError) as exc:
            # NameError: asyncssh 2.24 without pyOpenSSL raises it for an
            # entry whose key field looks like DER ("0" then binary bytes),
            # because it calls an X.509 function it did not import.
            logger.warning("cannot read known_hosts file %s: %s", path, exc)
            continue
        # NOTE: asyncssh retries without the port when nothing matches
        # "[host]:port", which OpenSSH does not; a key listed for the bare
        # host name then counts for every port of that host.
        host_keys = known_hosts.match(target.host, "", target.port if target.port != 22 else None)[0]
        if any(key.public_data == host_key for key in host_keys):
            return target.host, True
    return target.host, False


def home_of(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_dir
    except KeyError:
        return "/nonexistent"


def evidence_for(
    bindings: ConnectionBindings, info: SignedDataInfo, arguments: list[str], uid: int | None
) -> BindingEvidence | None:
    """Build the evidence for a login request; raise BindingRejected if the rules are broken."""
    bind, forwarded = bindings.check_login(info)
    if bind is None:
        return None
    target = parse_ssh_command(arguments, home_of(uid if uid is not None else os.getuid()))
    host_name, verified = verified_host_name(target, bind.host_key)
    if forwarded:
        # The requesting process is the first hop's ssh; the name on its
        # command line is not the host this login goes to.
        host_name, verified = "", False
    return BindingEvidence(bind=bind, forwarded=forwarded, host_name=host_name, name_verified=verified)
