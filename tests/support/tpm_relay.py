"""A relay between the swtpm TCTI and swtpm that can change TPM responses.

It takes the place of an attacker on the TPM bus: it receives every command and
may replace swtpm's response.  The tss2 swtpm TCTI sends control
commands to the server port + 1, so the relay listens on two adjacent ports
and forwards the second one unchanged to swtpm's control port.  On the
server port it reads one whole TPM command (TPM 2.0 Library Part 1,
section 18.2: a 10-byte header whose second field is the total size), sends
it to swtpm, reads the whole response, and passes it through ``change``.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable

from .ports import LOCALHOST

CONNECT_TIMEOUT = 5.0
IO_TIMEOUT = 10.0
HEADER_SIZE = 10

# change(command, response) returns the bytes sent back to the TCTI, or
# None to close the connection without a response.
ResponseChange = Callable[[bytes, bytes], bytes | None]


def command_code(command: bytes) -> int:
    """Return the command code of a marshalled TPM command."""
    return struct.unpack_from(">I", command, 6)[0]


class TpmRelay:
    """Forward two adjacent loopback ports to an swtpm's server and control ports."""

    def __init__(self, server_port: int, ctrl_port: int) -> None:
        self.server_port = server_port
        self.ctrl_port = ctrl_port
        self.change: ResponseChange | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._server_listener, self._ctrl_listener = _adjacent_listeners()
        self.port = self._server_listener.getsockname()[1]
        for listener, handler in ((self._server_listener, self._relay_commands), (self._ctrl_listener, self._pipe)):
            self._start(self._accept_loop, listener, handler)

    @property
    def tcti(self) -> str:
        return f"swtpm:host={LOCALHOST},port={self.port}"

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            for sock in self._sockets:
                _close_quietly(sock)
        self._server_listener.close()
        self._ctrl_listener.close()
        for thread in self._threads:
            thread.join(timeout=5.0)

    def __enter__(self) -> "TpmRelay":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _start(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self, listener: socket.socket, handler: Callable[[socket.socket, socket.socket], None]) -> None:
        listener.settimeout(0.2)
        upstream_port = self.server_port if listener is self._server_listener else self.ctrl_port
        while not self._stop.is_set():
            try:
                client, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection((LOCALHOST, upstream_port), timeout=CONNECT_TIMEOUT)
            except OSError:
                client.close()
                continue
            client.settimeout(IO_TIMEOUT)
            upstream.settimeout(IO_TIMEOUT)
            with self._lock:
                self._sockets += [client, upstream]
            self._start(handler, client, upstream)

    def _relay_commands(self, client: socket.socket, upstream: socket.socket) -> None:
        try:
            while not self._stop.is_set():
                command = _read_message(client)
                if command is None:
                    return
                upstream.sendall(command)
                response = _read_message(upstream)
                if response is None:
                    return
                change = self.change
                if change is not None:
                    response = change(command, response)
                    if response is None:
                        return
                client.sendall(response)
        except OSError:
            return
        finally:
            _close_quietly(client)
            _close_quietly(upstream)

    def _pipe(self, client: socket.socket, upstream: socket.socket) -> None:
        # The control channel is forwarded unchanged, one direction per thread.
        self._start(_copy, upstream, client)
        _copy(client, upstream)


def _copy(source: socket.socket, destination: socket.socket) -> None:
    try:
        while data := source.recv(4096):
            destination.sendall(data)
    except OSError:
        pass
    finally:
        _close_quietly(source)
        _close_quietly(destination)


def _read_exactly(sock: socket.socket, count: int) -> bytes | None:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _read_message(sock: socket.socket) -> bytes | None:
    header = _read_exactly(sock, HEADER_SIZE)
    if header is None:
        return None
    size = struct.unpack_from(">I", header, 2)[0]
    rest = _read_exactly(sock, size - HEADER_SIZE) if size > HEADER_SIZE else b""
    return None if rest is None else header + rest


def _adjacent_listeners() -> tuple[socket.socket, socket.socket]:
    for _ in range(100):
        first = socket.create_server((LOCALHOST, 0))
        port = first.getsockname()[1]
        try:
            second = socket.create_server((LOCALHOST, port + 1))
        except OSError:
            first.close()
            continue
        return first, second
    raise RuntimeError(f"no free pair of adjacent TCP ports found on {LOCALHOST}")


def _close_quietly(sock: socket.socket) -> None:
    # shutdown() wakes a thread blocked in recv() on the same socket, and
    # close() alone does not.  swtpm serves one control connection at a time,
    # so a connection left open delays the next client.
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
