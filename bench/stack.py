"""tpmsigner's side of the benchmark: homes, signers and agents.

Identities are created once, in one home, and copied into the homes of the
runs that need fewer of them: the key files are bound to the TPM, not to a
home, and ``tpm.json`` (the storage key's recorded name) is copied along.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import threading
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import tpmsigner
from tpmsigner.audit import AuditLog
from tpmsigner.protocol.channel import StaticKey, format_public_key
from tpmsigner.signer.approvers import ApprovalRequest, CallableApprover
from tpmsigner.signer.devices import DeviceRegistry
from tpmsigner.signer.server import SignerConfig, SignerServer
from tpmsigner.signer.worker import TpmWorker
from tpmsigner.store import KeyStore, TpmBinding
from tpmsigner_agent.config import AgentHome

from .daemons import Daemon

PIN = "bench-pin-4711"
SIGNER_COMMAND = [sys.executable, "-m", "tpmsigner.cli"]
AGENT_COMMAND = [sys.executable, "-m", "tpmsigner_agent.cli"]
LOCALHOST = "127.0.0.1"
# The file names `tpmsigner serve` uses in its home (tpmsigner/commands/signer.py).
NOISE_KEY_FILE = "noise-static-key.pem"
DEVICES_FILE = "devices.json"
AUDIT_FILE = "audit.jsonl"
SIGNER_READY = "signer listening on"
AGENT_READY = "agent listening on"


@dataclass
class Workspace:
    """Where one benchmark run keeps its files, and the TPM it uses."""

    root: Path
    socket_dir: Path   # short, for UNIX socket paths
    tcti: str

    def env(self) -> dict[str, str]:
        environment = dict(os.environ)
        environment.update(
            TPMSIGNER_TCTI=self.tcti,
            TSS2_LOG="all+NONE",
            XDG_STATE_HOME=str(self.root / "state"),
        )
        environment.pop("TPMSIGNER_HOME", None)
        environment.pop("TPMSIGNER_AGENT_HOME", None)
        return environment

    def path(self, name: str) -> Path:
        return self.root / name

    def log(self, name: str) -> Path:
        """Return a new log file path for a program called ``name``, never one used before."""
        number = 1
        while (self.root / f"{name}-{number}.log").exists():
            number += 1
        path = self.root / f"{name}-{number}.log"
        path.touch()
        return path

    def socket(self, name: str) -> Path:
        return self.socket_dir / f"{name}.sock"


def create_identities(tcti: str, home: Path, count: int) -> list[tpmsigner.Identity]:
    """Create ``count`` ECDSA P-256 identities named key-0000, key-0001, ... with PIN."""
    store = KeyStore(home)
    binding = TpmBinding(home)
    with tpmsigner.Tpm(tcti, parent_check=binding.check) as tpm:
        return [tpmsigner.create_identity(tpm, store, f"key-{n:04d}", PIN.encode()) for n in range(count)]


def copy_home(source: Path, target: Path, count: int) -> list[tpmsigner.Identity]:
    """Make ``target`` a signer home holding the first ``count`` identities of ``source``."""
    identities = KeyStore(source).list()[:count]
    keys = target / "keys"
    keys.mkdir(parents=True, mode=0o700)
    target.chmod(0o700)
    for identity in identities:
        for suffix in (".tss", ".json"):
            shutil.copy2(source / "keys" / (identity.label + suffix), keys / (identity.label + suffix))
    shutil.copy2(source / "tpm.json", target / "tpm.json")
    return identities


def pair(signer_home: Path, agent_home: Path, device_name: str, port: int) -> None:
    """Allow the agent on the signer and pin the signer in the agent, as allow/trust do."""
    agent_key = AgentHome(agent_home).static_key()
    DeviceRegistry(signer_home / DEVICES_FILE).allow(device_name, agent_key.public, replace=True)
    signer_key = StaticKey.load_or_create(signer_home / NOISE_KEY_FILE)
    AgentHome(agent_home).trust("bench-signer", f"{LOCALHOST}:{port}", format_public_key(signer_key.public), replace=True)


def start_agent(workspace: Workspace, agent_home: Path, socket_path: Path, name: str) -> Daemon:
    """Start `tpmsigner-agent run` in the foreground, as a separate process."""
    agent = Daemon.start(
        name,
        [
            *AGENT_COMMAND, "--home", str(agent_home), "run", "--socket", str(socket_path), "--foreground",
            "--audit-log", str(workspace.path(f"{name}-audit.jsonl")),
        ],
        workspace.log(name),
        workspace.env(),
    )
    _wait_or_stop(agent, AGENT_READY)
    return agent


def write_command_approver(path: Path, pin: str) -> Path:
    """Write the smallest honest `command:` approver: a shell script printing the PIN."""
    path.write_text(f"#!/bin/sh\nprintf '%s\\n' '{pin}'\n")
    path.chmod(0o700)
    return path


def start_serve(
    workspace: Workspace, home: Path, port: int, approver: Path, name: str, *extra_arguments: str
) -> Daemon:
    """Start `tpmsigner serve` with a `command:` approver, as a separate process."""
    signer = Daemon.start(
        name,
        [
            *SIGNER_COMMAND, "--home", str(home), "serve", "--listen", f"{LOCALHOST}:{port}",
            "--approver", f"command:{approver}", "--no-mdns", *extra_arguments,
        ],
        workspace.log(name),
        workspace.env(),
    )
    _wait_or_stop(signer, SIGNER_READY)
    return signer


def _wait_or_stop(daemon: Daemon, marker: str) -> None:
    """Wait for ``daemon`` to log ``marker``; stop it if it does not, so that nothing is left running."""
    try:
        daemon.wait_for_log(marker)
    except BaseException:
        daemon.stop()
        raise


class InProcessSigner:
    """A SignerServer in this process, on an event loop of its own thread.

    The approver is a CallableApprover around a coroutine that returns the
    PIN at once, so nothing but tpmsigner's own path is measured.  The TPM
    calls run on the TpmWorker thread, as in `tpmsigner serve`.
    """

    def __init__(self, home: Path, tcti: str, pin: str) -> None:
        self.home = home
        self.approvals = 0
        self._pin = pin
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bench-signer", daemon=True)
        binding = TpmBinding(home)
        self.worker = TpmWorker(tpmsigner.Tpm(tcti, parent_check=binding.check))
        self.server = SignerServer(
            store=KeyStore(home),
            worker=self.worker,
            static_key=StaticKey.load_or_create(home / NOISE_KEY_FILE),
            devices=DeviceRegistry(home / DEVICES_FILE),
            approver=CallableApprover(self._approve),
            config=SignerConfig(host=LOCALHOST, port=0),
            audit_log=AuditLog(home / AUDIT_FILE),
        )

    async def _approve(self, request: ApprovalRequest) -> str:
        self.approvals += 1
        return self._pin

    def _call(self, coroutine) -> object:
        future: Future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result(timeout=60)

    def start(self) -> int:
        """Start serving on a free loopback port and return the port."""
        self._thread.start()
        self._call(self.server.start())
        return self.server.port

    def release_tpm(self) -> None:
        """Close the TPM context, so that another client has every object slot; the next request reopens it."""
        self._call(self.worker.call(self.worker.tpm.close))

    def close(self) -> None:
        self._call(self.server.close())
        self.worker.close()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


def env_with(base: Mapping[str, str], **values: str) -> dict[str, str]:
    environment = dict(base)
    environment.update(values)
    return environment
