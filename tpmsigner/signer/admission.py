"""Which new TCP connections the signer lets start a Noise handshake.

Anyone who can reach the signer's port can connect, and each handshake
costs the signer a socket, an X25519 computation and up to
channel.HANDSHAKE_TIMEOUT seconds of waiting, before it knows who is
calling.  These limits bound what unauthenticated peers can hold.

NOTE: the limits count per exact source address.  A peer with many
addresses, such as an IPv6 /64, gets a share for each of them and is held
back only by MAX_HANDSHAKES; counting by prefix would close that gap.
"""

from __future__ import annotations

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


class HandshakeAdmission:
    """Counts handshakes in progress and recent attempts, by source address.

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
        if self._total_in_progress >= MAX_HANDSHAKES:
            return f"{MAX_HANDSHAKES} handshakes are already in progress"
        if self._in_progress.get(address, 0) >= MAX_HANDSHAKES_PER_ADDRESS:
            return f"{MAX_HANDSHAKES_PER_ADDRESS} handshakes from this address are already in progress"

        now = self._clock()
        attempts = self._attempts.pop(address, None) or deque()
        while attempts and now - attempts[0] >= HANDSHAKE_WINDOW:
            attempts.popleft()
        # Re-inserting moves the address to the most recently used end.
        self._attempts[address] = attempts
        if len(attempts) >= self.max_attempts:
            return f"more than {self.max_attempts} handshake attempts from this address in {HANDSHAKE_WINDOW:g} s"

        attempts.append(now)
        while len(self._attempts) > MAX_TRACKED_ADDRESSES:
            self._attempts.popitem(last=False)
        self._in_progress[address] = self._in_progress.get(address, 0) + 1
        self._total_in_progress += 1
        return None

    def finish(self, address: str) -> None:
        """End a handshake that ``admit`` let start, whether it succeeded or not."""
        remaining = self._in_progress.get(address, 0) - 1
        if remaining < 0:
            raise ValueError(f"no handshake from {address} is in progress")
        if remaining:
            self._in_progress[address] = remaining
        else:
            del self._in_progress[address]
        self._total_in_progress -= 1
