"""The phases of one benchmark run, against one swtpm.

The TPM emulator has no resource manager and three object slots, so only
one path talks to it at a time: every phase closes its TPM context (or
stops its signer) before the next one starts.
"""

from __future__ import annotations

import base64
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.ports import free_port
from tests.support.ssh_agent import OpenSshAgent
from tests.support.ssh_keys import generate_key_pair
from tests.support.sshd import Sshd
from tpmsigner.protocol.sshkeys import public_key_from_blob, verify_signature
from tpmsigner.store import KeyStore

from . import stack
from .agentclient import AgentClient
from .daemons import BenchSetupError, Daemon, run
from .floor import AUTHORIZATIONS, ENCRYPTED_SESSION, FloorSigner
from .pkcs11 import Pkcs11Agent
from .signdata import sshsig_data
from .stats import Summary

WARM_UP = 3
AGENT_START_TIMEOUT = 10.0


@dataclass
class Options:
    samples: int = 300              # sign latency samples per path
    rounds: int = 10                # the paths take turns this many times
    counts: list[int] = field(default_factory=lambda: [1, 10, 100, 1000])
    list_repeats: int = 20
    clients: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    load_signatures: int = 256
    logins: int = 30
    starts: int = 10
    memory_identities: int = 1000
    memory_agents: int = 50
    pkcs11: bool = True
    phases: tuple[str, ...] = ("sign", "throughput", "listing", "logins", "startup", "memory")


@dataclass
class SignTarget:
    """An agent socket and the key to ask it for."""

    name: str
    socket: Path
    key_blob: bytes


def blob_of_line(line: str) -> bytes:
    return base64.b64decode(line.split()[1])


def time_agent_signs(target: SignTarget, count: int, tag: str) -> tuple[list[float], int]:
    """Return (milliseconds per signature, signatures that verified) for ``count`` requests on one connection."""
    public_key = public_key_from_blob(target.key_blob)
    samples, signed = [], []
    with AgentClient(target.socket) as client:
        for index in range(WARM_UP + count):
            data = sshsig_data(f"{tag} {index}")
            started = time.perf_counter()
            signature = client.sign(target.key_blob, data)
            elapsed = time.perf_counter() - started
            if index >= WARM_UP:
                samples.append(elapsed * 1000)
                signed.append((data, signature))
    return samples, sum(1 for data, signature in signed if verify_signature(public_key, data, signature))


class BenchRun:
    """Sets up, measures and tears down; ``results`` is what the report shows."""

    def __init__(self, options: Options, workspace: stack.Workspace) -> None:
        self.options = options
        self.ws = workspace
        self.results: dict[str, object] = {}
        self._daemons: list[Daemon] = []
        self._cleanups: list = []
        self.master = workspace.path("identities")

    # ---- set-up ------------------------------------------------------------

    def prepare(self) -> None:
        needed = [1]
        if "listing" in self.options.phases:
            needed += self.options.counts
        if "memory" in self.options.phases:
            needed.append(self.options.memory_identities)
        count = max(needed)
        started = time.perf_counter()
        identities = stack.create_identities(self.ws.tcti, self.master, count)
        self.results["setup"] = {"identities": count, "create_seconds": time.perf_counter() - started}
        self.identity = identities[0]
        self.key_blob = self.identity.public_key_blob
        self.tpm_blob = KeyStore(self.master).key_blob(self.identity)

        # The in-process signer and its agent serve the sign, throughput,
        # login and start-up phases.
        home = self.ws.path("signer-inproc")
        stack.copy_home(self.master, home, 1)
        self.inproc = stack.InProcessSigner(home, self.ws.tcti, stack.PIN)
        port = self.inproc.start()
        self._cleanups.append(self.inproc.close)
        self.inproc_agent_home = self.ws.path("agent-inproc")
        stack.pair(home, self.inproc_agent_home, "bench-inproc", port)
        self.inproc_socket = self.ws.socket("inproc")
        self._agent(self.inproc_agent_home, self.inproc_socket, "agent-inproc")

        # tpmsigner serve with a command: approver, restarted for each round.
        self.command_home = self.ws.path("signer-command")
        stack.copy_home(self.master, self.command_home, 1)
        self.command_port = _free_port()
        self.command_agent_home = self.ws.path("agent-command")
        stack.pair(self.command_home, self.command_agent_home, "bench-command", self.command_port)
        self.approver = stack.write_command_approver(self.ws.path("approver.sh"), stack.PIN)
        self.command_socket = self.ws.socket("command")
        self._agent(self.command_agent_home, self.command_socket, "agent-command")

        # OpenSSH's agent with a plain ECDSA P-256 key file.
        self.file_agent = OpenSshAgent(socket_path=self.ws.socket("file"))
        self.file_agent.start()
        self._cleanups.append(self.file_agent.stop)
        self.file_key = generate_key_pair(self.ws.path("file-key/id_ecdsa"), "ecdsa", "bench-file-key")
        self.file_agent.add_key(self.file_key.private_key)

    def _agent(self, home: Path, socket: Path, name: str) -> Daemon:
        agent = stack.start_agent(self.ws, home, socket, name)
        self._daemons.append(agent)
        return agent

    def close(self) -> None:
        for daemon in reversed(self._daemons):
            daemon.stop()
        self._daemons.clear()
        for cleanup in reversed(self._cleanups):
            cleanup()
        self._cleanups.clear()

    # ---- sign latency ------------------------------------------------------

    def sign_latency(self) -> None:
        per_round = math.ceil(self.options.samples / self.options.rounds)
        samples: dict[str, list[float]] = {}
        verified: dict[str, int] = {}
        sessions: dict[str, list[float]] = {}
        sessions_verified: dict[str, int] = {}

        def add(name: str, measured: tuple[list[float], int]) -> None:
            samples.setdefault(name, []).extend(measured[0])
            verified[name] = verified.get(name, 0) + measured[1]

        pkcs11 = Pkcs11Agent(
            self.ws.path("pkcs11"), self.ws.socket("pkcs11"), self.ws.tcti, stack.PIN, self.ws.env()
        ) if self.options.pkcs11 else None

        def floor_step(tag: str) -> None:
            self.inproc.release_tpm()
            add("floor", self._floor_signs(per_round, tag))
            # What the session costs, on the same loaded key.
            for authorization in AUTHORIZATIONS:
                measured = self._floor_signs(per_round, tag, authorization)
                sessions.setdefault(authorization, []).extend(measured[0])
                sessions_verified[authorization] = sessions_verified.get(authorization, 0) + measured[1]

        def pkcs11_step(tag: str) -> None:
            assert pkcs11 is not None
            self.inproc.release_tpm()
            try:
                # Inside the try: a start that fails half-way leaves daemons to stop.
                pkcs11.start()
                add("pkcs11", time_agent_signs(
                    SignTarget("pkcs11", pkcs11.socket_path, blob_of_line(pkcs11.public_line)), per_round, tag
                ))
            finally:
                pkcs11.stop()

        def file_step(tag: str) -> None:
            add("file", time_agent_signs(
                SignTarget("file", self.file_agent.socket_path, blob_of_line(self.file_key.public_key_line)), per_round, tag
            ))

        def inproc_step(tag: str) -> None:
            add("inproc", time_agent_signs(SignTarget("inproc", self.inproc_socket, self.key_blob), per_round, tag))

        def command_step(tag: str) -> None:
            self.inproc.release_tpm()
            signer = stack.start_serve(self.ws, self.command_home, self.command_port, self.approver, "signer-command")
            try:
                add("command", time_agent_signs(SignTarget("command", self.command_socket, self.key_blob), per_round, tag))
            finally:
                signer.stop()

        steps = [floor_step, *([pkcs11_step] if pkcs11 is not None else []), file_step, inproc_step, command_step]
        for round_number in range(self.options.rounds):
            # Every other round runs the paths in reverse order, so that a
            # path is not always measured right after the same other one.
            for step in steps if round_number % 2 == 0 else reversed(steps):
                step(f"round {round_number}")

        names = ["floor", "pkcs11", "file", "inproc", "command"]
        samples = {name: samples[name] for name in names if name in samples}
        self.results["sign"] = {
            name: {**Summary.of(values).to_json(), "verified": verified[name]} for name, values in samples.items()
        }
        self.results["sign_samples"] = samples
        self.results["floor_sessions"] = {
            name: {**Summary.of(values).to_json(), "verified": sessions_verified[name]}
            for name, values in sessions.items()
        }

    def _floor_signs(
        self, count: int, tag: str, authorization: str = ENCRYPTED_SESSION
    ) -> tuple[list[float], int]:
        floor = FloorSigner(self.ws.tcti, self.tpm_blob, self.identity.public_key, stack.PIN.encode())
        try:
            samples, signed = [], []
            for index in range(WARM_UP + count):
                data = sshsig_data(f"{tag} {index}")
                signature, elapsed = floor.sign(data, authorization)
                if index >= WARM_UP:
                    samples.append(elapsed * 1000)
                    signed.append((data, signature))
        finally:
            floor.close()
        return samples, sum(1 for data, signature in signed if verify_signature(self.identity.public_key, data, signature))

    # ---- throughput --------------------------------------------------------

    def throughput(self) -> None:
        count = self.options.load_signatures
        self.inproc.release_tpm()
        floor = FloorSigner(self.ws.tcti, self.tpm_blob, self.identity.public_key, stack.PIN.encode())
        try:
            for index in range(WARM_UP):
                floor.sign(sshsig_data(f"warm {index}"))
            started = time.perf_counter()
            for index in range(count):
                floor.sign(sshsig_data(f"floor {index}"))
            floor_rate = count / (time.perf_counter() - started)
        finally:
            floor.close()

        rows = []
        for clients in self.options.clients:
            output = run([
                sys.executable, "-m", "bench.load", str(self.inproc_socket), self.key_blob.hex(), str(clients),
                str(max(count, 2 * clients)),
            ], self.ws.env(), timeout=600)
            row = json.loads(output)
            # Only signatures that verified count; a failed request is listed apart.
            row["rate"] = row["verified"] / row["seconds"]
            row["ratio"] = row["rate"] / floor_rate
            rows.append(row)
        self.inproc.release_tpm()
        self.results["throughput"] = {"floor_rate": floor_rate, "rows": rows}

    # ---- listing -----------------------------------------------------------

    def listing(self) -> None:
        rows = []
        self.inproc.release_tpm()
        reference_keys = self._reference_keys(max(self.options.counts), "ecdsa")
        # Ed25519 keys show what ssh-add itself spends on each ECDSA key:
        # it checks every EC public key it reads, which Ed25519 keys skip.
        ed25519_keys = self._reference_keys(max(self.options.counts), "ed25519")
        for count in self.options.counts:
            home = self.ws.path(f"signer-list-{count}")
            identities = stack.copy_home(self.master, home, count)
            expected = {identity.openssh_line() for identity in identities}
            port = _free_port()
            agent_home = self.ws.path(f"agent-list-{count}")
            stack.pair(home, agent_home, f"bench-list-{count}", port)
            signer = stack.start_serve(self.ws, home, port, self.approver, f"signer-list-{count}")
            socket = self.ws.socket(f"list-{count}")
            try:
                agent = stack.start_agent(self.ws, agent_home, socket, f"agent-list-{count}")
                try:
                    # The agent imports asyncssh in the background once it
                    # listens; the listing is timed after that.
                    agent.wait_idle()
                    env = stack.env_with(self.ws.env(), SSH_AUTH_SOCK=str(socket))
                    ssh_add, listed = _time_command(["ssh-add", "-L"], env, self.options.list_repeats)
                    if set(listed.splitlines()) != expected:
                        raise BenchSetupError(f"ssh-add -L listed {len(listed.splitlines())} keys, expected {count}")
                    round_trip = _time_list_requests(socket, count, self.options.list_repeats)
                finally:
                    agent.stop()
            finally:
                signer.stop()
            cli, _ = _time_command(
                [*stack.SIGNER_COMMAND, "--home", str(home), "list"], self.ws.env(), max(3, self.options.list_repeats // 2)
            )
            openssh_add, openssh_trip = self._reference_listing(reference_keys[:count])
            ed25519_add, _ = self._reference_listing(ed25519_keys[:count])
            rows.append({
                "identities": count,
                "ssh_add": Summary.of(ssh_add).to_json(),
                "round_trip": Summary.of(round_trip).to_json(),
                "openssh_ssh_add": Summary.of(openssh_add).to_json(),
                "openssh_round_trip": Summary.of(openssh_trip).to_json(),
                "openssh_ssh_add_ed25519": Summary.of(ed25519_add).to_json(),
                "cli_list": Summary.of(cli).to_json(),
            })
            shutil.rmtree(home)
        self.results["listing"] = {"rows": rows}

    def _reference_keys(self, count: int, key_type: str) -> list[Path]:
        """Make ``count`` key files of ``key_type`` for OpenSSH's agent ("ecdsa" is P-256, as tpmsigner lists)."""
        keys = []
        for number in range(count):
            path = self.ws.path(f"reference-keys/id_{key_type}_{number:04d}")
            generate_key_pair(path, key_type, f"reference-{number:04d}")
            keys.append(path)
        return keys

    def _reference_listing(self, keys: list[Path]) -> tuple[list[float], list[float]]:
        """Time `ssh-add -L` and one listing request against OpenSSH's ssh-agent holding ``keys``."""
        agent = OpenSshAgent(socket_path=self.ws.socket(f"reference-{keys[0].name}-{len(keys)}"))
        agent.start()
        try:
            for start in range(0, len(keys), 100):
                agent.ssh_add(*(str(key) for key in keys[start : start + 100]))
            env = stack.env_with(self.ws.env(), SSH_AUTH_SOCK=str(agent.socket_path))
            ssh_add, listed = _time_command(["ssh-add", "-L"], env, self.options.list_repeats)
            if len(listed.splitlines()) != len(keys):
                raise BenchSetupError(f"OpenSSH's agent listed {len(listed.splitlines())} keys, expected {len(keys)}")
            return ssh_add, _time_list_requests(agent.socket_path, len(keys), self.options.list_repeats)
        finally:
            agent.stop()

    # ---- logins ------------------------------------------------------------

    def logins(self) -> None:
        tpm_line = self.identity.openssh_line()
        sshd = Sshd(workdir=self.ws.path("sshd"), authorized_keys=[tpm_line, self.file_key.public_key_line])
        sshd.start()
        try:
            sockets = {"inproc": self.inproc_socket, "file": self.file_agent.socket_path}
            samples: dict[str, list[float]] = {name: [] for name in sockets}
            for index in range(self.options.logins + 1):
                # Alternate which goes first, so that a slow spell hits both.
                order = list(sockets) if index % 2 == 0 else list(reversed(sockets))
                for name in order:
                    argv = sshd.ssh_command(sockets[name], "true")
                    started = time.perf_counter()
                    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
                    elapsed = (time.perf_counter() - started) * 1000
                    if result.returncode != 0:
                        raise BenchSetupError(f"ssh login through the {name} agent failed:\n{result.stderr}")
                    if index > 0:   # the first login of each warms caches up
                        samples[name].append(elapsed)
        finally:
            sshd.stop()
        self.results["logins"] = {name: Summary.of(values).to_json() for name, values in samples.items()}

    # ---- start-up ----------------------------------------------------------

    def startup(self) -> None:
        times: dict[str, list[float]] = {"tpmsigner-agent": [], "ssh-agent": []}
        for index in range(self.options.starts):
            socket = self.ws.socket(f"start-{index}")
            argv = [
                *stack.AGENT_COMMAND, "--home", str(self.inproc_agent_home), "run", "--socket", str(socket),
                "--foreground", "--audit-log", str(self.ws.path(f"start-{index}-audit.jsonl")),
            ]
            times["tpmsigner-agent"].append(self._time_to_answer("tpmsigner-agent", argv, socket, 1))
            socket = self.ws.socket(f"ssh-agent-start-{index}")
            times["ssh-agent"].append(self._time_to_answer("ssh-agent", ["ssh-agent", "-D", "-a", str(socket)], socket, 0))
        self.results["startup"] = {name: Summary.of(values).to_json() for name, values in times.items()}

    def _time_to_answer(self, name: str, argv: list[str], socket: Path, identities: int) -> float:
        """Return milliseconds from spawning ``argv`` to its first answered listing on ``socket``."""
        started = time.perf_counter()
        daemon = Daemon.start(name, argv, self.ws.log(socket.stem), self.ws.env())
        try:
            deadline = started + AGENT_START_TIMEOUT
            while True:
                try:
                    with AgentClient(socket, timeout=AGENT_START_TIMEOUT) as client:
                        listed = client.list_identities()
                    elapsed = (time.perf_counter() - started) * 1000
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    if time.perf_counter() > deadline or daemon.process.poll() is not None:
                        raise BenchSetupError(f"{name} did not answer within {AGENT_START_TIMEOUT:g} s:\n{daemon.log_text()}")
                    time.sleep(0.001)
            if len(listed) != identities:
                raise BenchSetupError(f"{name} listed {len(listed)} identities at start, expected {identities}")
        finally:
            daemon.stop()
        return elapsed

    # ---- memory ------------------------------------------------------------

    def memory(self) -> None:
        count, agents = self.options.memory_identities, self.options.memory_agents
        home = self.ws.path("signer-memory")
        stack.copy_home(self.master, home, count)
        port = _free_port()
        homes = [self.ws.path(f"agent-memory-{n}") for n in range(agents)]
        for n, agent_home in enumerate(homes):
            stack.pair(home, agent_home, f"bench-memory-{n}", port)
        self.inproc.release_tpm()
        # All the agents connect from 127.0.0.1 within seconds, beyond the
        # default limit of handshakes per source address and minute.
        signer = stack.start_serve(
            self.ws, home, port, self.approver, "signer-memory",
            "--max-handshakes-per-minute", str(4 * agents),
        )
        started: list[Daemon] = []
        try:
            for n, agent_home in enumerate(homes):
                socket = self.ws.socket(f"memory-{n}")
                started.append(Daemon.start(
                    f"agent-memory-{n}",
                    [*stack.AGENT_COMMAND, "--home", str(agent_home), "run", "--socket", str(socket), "--foreground",
                     "--audit-log", str(self.ws.path(f"agent-memory-{n}-audit.jsonl"))],
                    self.ws.log(f"agent-memory-{n}"),
                    self.ws.env(),
                ))
            for n, agent in enumerate(started):
                agent.wait_for_log(stack.AGENT_READY, timeout=120)
                with AgentClient(self.ws.socket(f"memory-{n}")) as client:
                    listed = client.list_identities()
                    if len(listed) != count:
                        raise BenchSetupError(f"agent {n} listed {len(listed)} identities, expected {count}")
                    if n == 0:
                        data = sshsig_data("memory")
                        signature = client.sign(self.key_blob, data)
                        if not verify_signature(self.identity.public_key, data, signature):
                            raise BenchSetupError("the signature made during the memory phase does not verify")
            agent_rss = [agent.rss_kib() / 1024 for agent in started]
            signer_rss = signer.rss_kib() / 1024
        finally:
            for agent in started:
                agent.stop()
            signer.stop()
        self.results["memory"] = {
            "identities": count,
            "agents": agents,
            "signer_mib": signer_rss,
            "agent_max_mib": max(agent_rss),
            "agent_median_mib": statistics.median(agent_rss),
        }


def _time_list_requests(socket: Path, count: int, repeats: int) -> list[float]:
    """Time the listing request alone, on a new connection each time, as ssh-add makes it."""
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        with AgentClient(socket) as client:
            listed = client.list_identities()
        samples.append((time.perf_counter() - started) * 1000)
        if len(listed) != count:
            raise BenchSetupError(f"the agent listed {len(listed)} identities, expected {count}")
    return samples


def _time_command(argv: list[str], env: dict[str, str], repeats: int) -> tuple[list[float], str]:
    samples, output = [], ""
    for _ in range(repeats):
        started = time.perf_counter()
        output = run(argv, env)
        samples.append((time.perf_counter() - started) * 1000)
    return samples, output


def _free_port() -> int:
    return free_port()
