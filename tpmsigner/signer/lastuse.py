"""Record when an identity last signed, at most once a minute per identity.

``KeyStore.record_use`` rewrites the identity's metadata file atomically
(temporary file, fsync, rename, fsync of the directory), which costs more
than the TPM's signature when the disk is busy.  ``last_used`` is shown to
a person to tell a key in use from a forgotten one, so a time that is up to
a minute old serves as well; every single signature is in the audit log.
"""

from __future__ import annotations

import time
from typing import Callable

from ..store import Identity, KeyStore

LAST_USE_INTERVAL = 60.0


class LastUseRecorder:
    """Writes ``last_used`` for an identity unless it was written less than ``interval`` seconds ago."""

    def __init__(
        self, store: KeyStore, interval: float = LAST_USE_INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.store = store
        self.interval = interval
        self._clock = clock
        self._written: dict[str, float] = {}

    def record(self, identity: Identity) -> bool:
        """Write the identity's last use now if it is due; return whether it was written.

        Errors from the store propagate, and the next signature tries again.
        """
        now = self._clock()
        last = self._written.get(identity.label)
        if last is not None and now - last < self.interval:
            return False
        self.store.record_use(identity)
        self._written[identity.label] = now
        return True
