"""Concurrent ssh-agent clients, run as a process of their own.

Usage: python -m bench.load SOCKET KEY_BLOB_HEX CLIENTS SIGNATURES

Starts CLIENTS threads, each with its own connection to the agent at
SOCKET, which between them ask for SIGNATURES signatures with the key.  The
clock runs from the moment every client is connected until the last reply.
Every signature is verified afterwards.  Prints one JSON object:
``{"clients", "signatures", "seconds", "verified", "failed"}``.

The clients run apart from the benchmark's process so that they do not
compete with an in-process signer for its interpreter lock.
"""

from __future__ import annotations

import json
import sys
import threading
import time

from tpmsigner.protocol.sshkeys import public_key_from_blob, verify_signature

from .agentclient import AgentClient, AgentError
from .signdata import sshsig_data


def main(argv: list[str]) -> int:
    socket_path, key_hex, clients, signatures = argv[0], argv[1], int(argv[2]), int(argv[3])
    key_blob = bytes.fromhex(key_hex)
    public_key = public_key_from_blob(key_blob)
    connections = [AgentClient(socket_path) for _ in range(clients)]
    results: list[tuple[bytes, bytes | None]] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    counter = iter(range(signatures))

    def client(connection: AgentClient) -> None:
        start.wait()
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            data = sshsig_data(f"load {index}")
            try:
                signature: bytes | None = connection.sign(key_blob, data)
            except (AgentError, OSError):
                signature = None
            with lock:
                results.append((data, signature))

    threads = [threading.Thread(target=client, args=(connection,)) for connection in connections]
    for thread in threads:
        thread.start()
    start.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    for connection in connections:
        connection.close()

    verified = sum(1 for data, signature in results if signature and verify_signature(public_key, data, signature))
    failed = sum(1 for _, signature in results if signature is None)
    print(json.dumps({"clients": clients, "signatures": len(results), "seconds": seconds, "verified": verified, "failed": failed}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
