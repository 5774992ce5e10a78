"""A TCP relay on loopback that records every byte it forwards.

It stands where a network sniffer would: between the agent and the signer.
Each accepted connection opens one to the target; bytes are copied both
ways and appended to the capture of that connection.
"""

from __future__ import annotations

import selectors
import socket
import threading
from dataclasses import dataclass, field

from .ports import LOCALHOST

CONNECT_TIMEOUT = 5.0
CHUNK = 65536


@dataclass
class CapturedConnection:
    """The bytes one connection carried in each direction, in order."""

    to_target: bytearray = field(default_factory=bytearray)
    from_target: bytearray = field(default_factory=bytearray)


class RecordingRelay:
    """Forward 127.0.0.1:port to ``target_port`` and keep a copy of the traffic."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.connections: list[CapturedConnection] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server((LOCALHOST, 0))
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept_loop, name="relay-accept", daemon=True)
        self._accepting.start()

    def captured(self) -> bytes:
        """Every byte seen, both directions of every connection, for searching."""
        with self._lock:
            return b"".join(bytes(c.to_target) + bytes(c.from_target) for c in self.connections)

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        for thread in [self._accepting, *self._threads]:
            thread.join(timeout=5.0)

    def __enter__(self) -> "RecordingRelay":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _accept_loop(self) -> None:
        self._listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection((LOCALHOST, self.target_port), timeout=CONNECT_TIMEOUT)
            except OSError:
                client.close()
                continue
            capture = CapturedConnection()
            with self._lock:
                self.connections.append(capture)
            thread = threading.Thread(target=self._pump, args=(client, upstream, capture), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _pump(self, client: socket.socket, upstream: socket.socket, capture: CapturedConnection) -> None:
        selector = selectors.DefaultSelector()
        selector.register(client, selectors.EVENT_READ, (upstream, capture.to_target))
        selector.register(upstream, selectors.EVENT_READ, (client, capture.from_target))
        try:
            while not self._stop.is_set():
                for key, _ in selector.select(timeout=0.2):
                    source = key.fileobj
                    destination, record = key.data
                    try:
                        data = source.recv(CHUNK)  # type: ignore[union-attr]
                    except OSError:
                        data = b""
                    if not data:
                        return
                    with self._lock:
                        record.extend(data)
                    destination.sendall(data)
        except OSError:
            return
        finally:
            selector.close()
            client.close()
            upstream.close()
