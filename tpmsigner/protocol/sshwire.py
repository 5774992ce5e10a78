"""SSH wire encoding (RFC 4251 section 5): the data types and a reader for them.

Encoders are named after the wire types; ``SshReader`` has a reader for
each.  They replace asyncssh's packet helpers in the modules that the
agent loads at start: importing any part of asyncssh imports all of it,
which took longer than the agent may take to start.
"""

from __future__ import annotations

import struct

_UINT32 = struct.Struct(">I")


class PacketDecodeError(ValueError):
    """The bytes end early, or do not hold the value asked for."""


def Byte(value: int) -> bytes:  # noqa: N802 - named after the wire type
    return bytes((value,))


def Boolean(value: bool) -> bytes:  # noqa: N802
    return b"\x01" if value else b"\x00"


def UInt32(value: int) -> bytes:  # noqa: N802
    return _UINT32.pack(value)


def String(value: bytes | str) -> bytes:  # noqa: N802
    """Encode a length-prefixed string, text as UTF-8."""
    if isinstance(value, str):
        value = value.encode("utf-8")
    return _UINT32.pack(len(value)) + value


def MPInt(value: int) -> bytes:  # noqa: N802
    """Encode a two's complement big-endian integer in the fewest bytes that keep its sign (zero has none)."""
    if value == 0:
        return _UINT32.pack(0)
    magnitude = value if value > 0 else ~value
    length = magnitude.bit_length() // 8 + 1
    return _UINT32.pack(length) + value.to_bytes(length, "big", signed=True)


class SshReader:
    """Reads wire types from the front of ``data``, in order."""

    def __init__(self, data: bytes) -> None:
        self._data = bytes(data)
        self._offset = 0

    def _take(self, count: int) -> bytes:
        end = self._offset + count
        if end > len(self._data):
            remaining = len(self._data) - self._offset
            raise PacketDecodeError(f"expected {count} bytes at offset {self._offset}, but only {remaining} remain")
        chunk = self._data[self._offset : end]
        self._offset = end
        return chunk

    def get_byte(self) -> int:
        return self._take(1)[0]

    def get_boolean(self) -> bool:
        # RFC 4251 section 5: any non-zero value is TRUE.
        return self._take(1) != b"\x00"

    def get_uint32(self) -> int:
        return _UINT32.unpack(self._take(4))[0]

    def get_string(self) -> bytes:
        return self._take(self.get_uint32())

    def get_mpint(self) -> int:
        return int.from_bytes(self.get_string(), "big", signed=True)

    def get_remaining_payload(self) -> bytes:
        return self._take(len(self._data) - self._offset)

    def check_end(self) -> None:
        """Raise PacketDecodeError if bytes are left over."""
        if self._offset != len(self._data):
            raise PacketDecodeError(f"{len(self._data) - self._offset} unexpected bytes after the last field")
