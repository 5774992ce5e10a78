"""Which new TCP connections the signer lets start a Noise handshake.

Anyone who can reach the signer's port can connect, and each handshake
costs the signer a socket, an X25519 computation and up to
channel.HANDSHAKE_TIMEOUT seconds of waiting, before it knows who is
calling.  These limits bound what unauthenticated peers can hold.

The per-source limits count an IPv4 address on its own and an IPv6
address by its /64 prefix (see ``source_of``): one host or subnet on IPv6
usually has a whole /64, and could otherwise take a share of the limits for
each of its addresses.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict, deque
from typing import Callable

# Handshakes in progress from one source address.  An agent opens one
# connection per signer and its handshake takes milliseconds, so even
# several agents behind one NAT rarely have more than one in progress.
MAX_HANDSHAKES_PER_ADDRESS = 8
# Handshakes in progress from all addresses together.  It keeps the sockets
# that strangers can hold well below the common limit of 1,024 open files,
# so the signer can still open its key files and logs during a flood.
MAX_HANDSHAKES = 64
# Handshake attempts from one address in any HANDSHAKE_WINDOW seconds.  An
# agent connects again only after a signer restart, a network change or an
# idle disconnect, so this leaves room for many agents behind one address
# while a flood or a scan from one address gets 30 tries a minute.
MAX_HANDSHAKE_ATTEMPTS = 30
HANDSHAKE_WINDOW = 60.0
# Addresses whose recent attempts are remembered.  Beyond this, the address
# seen least recently is forgotten, which bounds the memory that connections
# from many addresses can take.
MAX_TRACKED_ADDRESSES = 4096
# The IPv6 prefix length that counts as one source.  RFC 4291 section 2.5.4
# gives unicast addresses a 64-bit interface identifier, so a subnet, and
# with SLAAC privacy addresses a single host, can pick any of 2^64.
IPV6_SOURCE_PREFIX = 64


def source_of(address: str) -> str:
    """Return the source that ``address`` counts toward: itself for IPv4, its /64 for IPv6.

    An IPv4-mapped IPv6 address counts as its IPv4 address.  A link-local
    address keeps its zone (``%eth0``), since each link is another network.
    Text that is not an IP address is returned unchanged.
    """
    text, _, zone = address.partition("%")
    try:
        parsed = ipaddress.ip_address(text)
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return str(parsed.ipv4_mapped)
    if isinstance(parsed, ipaddress.IPv4Address):
        return str(parsed)
    network = ipaddress.IPv6Network((parsed, IPV6_SOURCE_PREFIX), strict=False)
    return f"{network}%{zone}" if zone else str(network)


class HandshakeAdmission:
    """Counts handshakes in progress and recent attempts, by source (see ``source_of``).

    ``admit`` and ``finish`` run on the event loop thread only.
    """

    def __init__(self, max_attempts: int = MAX_HANDSHAKE_ATTEMPTS, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_attempts = max_attempts
        self._clock = clock
        self._in_progress: dict[str, int] = {}
        self._total_in_progress = 0
        # Times of the admitted attempts of the last HANDSHAKE_WINDOW seconds,
        # by address, least recently used address first.
        self._attempts: OrderedDict[str, deque[float]] = OrderedDict()

    @property
    def in_progress(self) -> int:
        return self._total_in_progress

    def admit(self, address: str) -> str | None:
        """Start a handshake from ``address``, or return why it is rejected.

        An admitted handshake must be ended with ``finish(address)``.
        Rejected connections do not count as attempts.
        """
        address = source_of(address)
        if self._total_in_progress >= MAX_HANDSHAKES:
            return f"{MAX_HANDSHAKES} handshakes are already in progress"
        if self._in_progress.get(address, 0) >= MAX_HANDSHAKES_PER_ADDRESS:
            return f"{MAX_HANDSHAKES_PER_ADDRESS} handshakes from {address} are already in progress"

        now = self._clock()
        attempts = self._attempts.pop(address, None) or deque()
        while attempts and now - attempts[0] >= HANDSHAKE_WINDOW:
            attempts.popleft()
        # Re-inserting moves the address to the most recently used end.
        self._attempts[address] = attempts
        if len(attempts) >= self.max_attempts:
            return f"more than {self.max_attempts} handshake attempts from {address} in {HANDSHAKE_WINDOW:g} s"

        attempts.append(now)
        while len(self._attempts) > MAX_TRACKED_ADDRESSES:
            self._attempts.popitem(last=False)
        self._in_progress[address] = self._in_progress.get(address, 0) + 1
        self._total_in_progress += 1
        return None

    def finish(self, address: str) -> None:
        """End a handshake that ``admit`` let start, whether it succeeded or not."""
        address = source_of(address)
        remaining = self._in_progress.get(address, 0) - 1
        if remaining < 0:
            raise ValueError(f"no handshake from {address} is in progress")
        if remaining:
            self._in_progress[address] = remaining
        else:
            del self._in_progress[address]
        self._total_in_progress -= 1
