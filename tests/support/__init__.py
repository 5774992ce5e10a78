"""Helpers that start real peers for the tests: swtpm, sshd and ssh-agent.

Each helper starts a real program on 127.0.0.1 or on a Unix socket, waits
with a timeout until it is ready, and stops it again. The fixtures in
tests/conftest.py wrap them and fail a test that leaks a process.
"""

from .ports import LOCALHOST, free_port
from .processes import pid_is_running, wait_until
from .ssh_agent import OpenSshAgent, check_unix_socket_path
from .ssh_keys import SshKeyPair, generate_key_pair
from .sshd import Sshd
from .swtpm import Swtpm, start_swtpm

__all__ = [
    "LOCALHOST",
    "OpenSshAgent",
    "SshKeyPair",
    "Sshd",
    "Swtpm",
    "check_unix_socket_path",
    "free_port",
    "generate_key_pair",
    "pid_is_running",
    "start_swtpm",
    "wait_until",
]
