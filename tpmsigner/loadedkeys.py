"""Signing keys kept loaded in the TPM between signatures, a bounded few.

Loading a wrapped key (TPM2_Load) costs the TPM about as much as the
signature itself, so ``Tpm`` keeps the most recently used keys loaded.  A
loaded key without its PIN is harmless: every key tpmsigner makes has
userWithAuth set, no policy and noDA clear (TPM 2.0 Library Part 2, section
8.3), so each use still needs an HMAC session keyed with the PIN, and wrong
PINs still count toward the dictionary-attack lockout.  A signature's PIN
keys that one command's HMAC (tpmsigner.tpmsession) and is not kept, so the
process keeps no PIN between requests either.

The cache is small on purpose.  An emulator or TPM reached without a
resource manager has only three object slots (swtpm: MAX_LOADED_OBJECTS),
one of which holds the storage key, so there one key stays loaded and one
slot is left for other programs.  Behind a resource manager (/dev/tpmrm0,
tpm2-abrmd) objects are swapped out between commands, and a few more may
stay loaded.  Every handle is flushed when it is evicted, when its PIN
changes, and when the TPM context closes or resets.  The signer also
flushes them after LOADED_KEY_IDLE_SECONDS without a TPM call
(tpmsigner/signer/worker.py), so that another program on the same
emulator finds its slot free again.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

from .tcti import has_resource_manager

Handle = TypeVar("Handle")

KEYS_WITHOUT_RESOURCE_MANAGER = 1
KEYS_WITH_RESOURCE_MANAGER = 4


def loaded_key_capacity(tcti: str) -> int:
    """Return how many signing keys may stay loaded on the TPM at ``tcti``."""
    if has_resource_manager(tcti):
        return KEYS_WITH_RESOURCE_MANAGER
    return KEYS_WITHOUT_RESOURCE_MANAGER


class LoadedKeys(Generic[Handle]):
    """Loaded key handles by wrapped key (parent, public and private part), least recently used first."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"the capacity must be 0 or more, not {capacity}")
        self.capacity = capacity
        self._handles: OrderedDict[tuple[int, bytes, bytes], Handle] = OrderedDict()

    def __len__(self) -> int:
        return len(self._handles)

    def get(self, parent: int, public: bytes, private: bytes) -> Handle | None:
        """Return the handle of this exact wrapped key, marking it most recently used."""
        key = (parent, public, private)
        handle = self._handles.get(key)
        if handle is not None:
            self._handles.move_to_end(key)
        return handle

    def put(self, parent: int, public: bytes, private: bytes, handle: Handle) -> list[Handle]:
        """Keep ``handle``; return the handles that no longer fit, for the caller to flush.

        With a capacity of 0 the handle itself is returned at once.
        """
        self._handles[(parent, public, private)] = handle
        self._handles.move_to_end((parent, public, private))
        evicted = []
        while len(self._handles) > self.capacity:
            _, old = self._handles.popitem(last=False)
            evicted.append(old)
        return evicted

    def discard_public(self, public: bytes) -> list[Handle]:
        """Forget every loaded version of the key with this public part (e.g. after a PIN change)."""
        keys = [key for key in self._handles if key[1] == public]
        return [self._handles.pop(key) for key in keys]

    def clear(self) -> list[Handle]:
        """Forget every handle; return them for the caller to flush."""
        handles = list(self._handles.values())
        self._handles.clear()
        return handles
