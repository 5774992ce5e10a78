"""Measure how long `ssh-add -L` and `tpmsigner list` take for many identities.

Usage: .venv/bin/python bench/list_identities.py [--counts 1 10 100 1000] [--repeats 20]

For each count, the script creates that many ECDSA P-256 identities in a
fresh swtpm (swtpm/start), starts `tpmsigner serve` and `tpmsigner-agent run`
on 127.0.0.1 and a socket in a temporary directory, checks that `ssh-add -L`
lists exactly the created keys, and times both commands.  It prints a
Markdown table of medians and 95th percentiles in milliseconds.  Everything
it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tpmsigner

REPO = Path(__file__).resolve().parent.parent
SIGNER = [sys.executable, "-m", "tpmsigner.cli"]
AGENT = [sys.executable, "-m", "tpmsigner_agent.cli"]
PIN = b"bench-pin-1234"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(path: Path, marker: str, process: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while marker not in (path.read_text() if path.exists() else ""):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{path.name}: no {marker!r} within {timeout:g} s:\n{path.read_text()}")
        time.sleep(0.05)


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def time_command(argv: list[str], environment: dict[str, str], repeats: int) -> tuple[list[float], str]:
    samples = []
    output = ""
    for _ in range(repeats):
        started = time.perf_counter()
        result = subprocess.run(argv, env=environment, capture_output=True, text=True, timeout=120, check=True)
        samples.append((time.perf_counter() - started) * 1000)
        output = result.stdout
    return samples, output


def measure(count: int, repeats: int, workdir: Path) -> dict[str, list[float]]:
    state = workdir / f"swtpm-{count}"
    tcti = subprocess.run([str(REPO / "swtpm" / "start"), str(state)], capture_output=True, text=True, check=True).stdout.strip()
    environment = {**os.environ, "TPMSIGNER_TCTI": tcti, "TSS2_LOG": "all+NONE"}
    signer_home, agent_home = workdir / f"signer-{count}", workdir / f"agent-{count}"
    socket_path = Path(tempfile.mkdtemp(prefix="tpms-bench-", dir="/tmp")) / "agent.sock"
    processes: list[subprocess.Popen] = []
    try:
        store = tpmsigner.KeyStore(signer_home)
        with tpmsigner.Tpm(tcti) as tpm:
            lines = {tpmsigner.create_identity(tpm, store, f"key-{n:04d}", PIN).openssh_line() for n in range(count)}

        port = free_port()
        agent_key = subprocess.run([*AGENT, "--home", str(agent_home), "id"], env=environment, capture_output=True, text=True, check=True).stdout.strip()
        subprocess.run([*SIGNER, "--home", str(signer_home), "allow", "bench", agent_key], env=environment, check=True, capture_output=True)
        signer_key = subprocess.run([*SIGNER, "--home", str(signer_home), "id"], env=environment, capture_output=True, text=True, check=True).stdout.strip()
        subprocess.run([*AGENT, "--home", str(agent_home), "trust", "bench", f"127.0.0.1:{port}", signer_key], env=environment, check=True, capture_output=True)

        signer_log, agent_log = workdir / f"signer-{count}.log", workdir / f"agent-{count}.log"
        with open(signer_log, "w") as log:
            processes.append(subprocess.Popen(
                [*SIGNER, "--home", str(signer_home), "serve", "--listen", f"127.0.0.1:{port}", "--approver", "command:/bin/false"],
                env=environment, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            ))
        wait_for(signer_log, "signer listening", processes[-1])
        with open(agent_log, "w") as log:
            processes.append(subprocess.Popen(
                [*AGENT, "--home", str(agent_home), "run", "--socket", str(socket_path), "--foreground"],
                env=environment, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            ))
        wait_for(agent_log, "agent listening", processes[-1])

        agent_environment = {**environment, "SSH_AUTH_SOCK": str(socket_path)}
        ssh_add, listed = time_command(["ssh-add", "-L"], agent_environment, repeats)
        if set(listed.splitlines()) != lines:
            raise RuntimeError(f"ssh-add -L listed {len(listed.splitlines())} keys, expected {count}")
        cli_list, _ = time_command([*SIGNER, "--home", str(signer_home), "list"], environment, repeats)
        return {"ssh-add -L": ssh_add, "tpmsigner list": cli_list}
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=10)
        subprocess.run([str(REPO / "swtpm" / "stop"), str(state)], capture_output=True, check=False)
        shutil.rmtree(socket_path.parent, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 10, 100, 1000], help="identity counts to measure")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per command and count")
    args = parser.parse_args()

    print("| identities | command | median (ms) | p95 (ms) |")
    print("| ---: | --- | ---: | ---: |")
    with tempfile.TemporaryDirectory(prefix="tpmsigner-bench-") as workdir:
        for count in args.counts:
            for command, samples in measure(count, args.repeats, Path(workdir)).items():
                print(f"| {count} | `{command}` | {statistics.median(samples):.1f} | {percentile(samples, 0.95):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
