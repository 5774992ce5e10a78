"""Run TPM calls on one dedicated thread, off the event loop."""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

from ..errors import TpmError
from ..tpm import Tpm

T = TypeVar("T")

# A TPM command that has not returned by then is taken as hung (a stopped
# emulator, a wedged bus).  TPM 2.0 commands finish in well under a second
# on real parts; key creation on a slow TPM is the longest, at a few seconds.
TPM_CALL_TIMEOUT = 30.0
# Signing keys stay loaded between signatures (tpmsigner.loadedkeys).  After
# this many seconds without a TPM call they are flushed, so that on a TPM
# without a resource manager another program gets the object slot back.
LOADED_KEY_IDLE_SECONDS = 10.0


class TpmWorker:
    """Serialises every call to one Tpm on a single worker thread."""

    def __init__(
        self, tpm: Tpm, timeout: float = TPM_CALL_TIMEOUT, key_idle: float = LOADED_KEY_IDLE_SECONDS
    ) -> None:
        self.tpm = tpm
        self.timeout = timeout
        self.key_idle = key_idle
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tpm")
        self._idle_timer: asyncio.TimerHandle | None = None

    async def call(self, function: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        future = loop.run_in_executor(self._executor, functools.partial(function, *args))
        try:
            return await asyncio.wait_for(future, self.timeout)
        except asyncio.TimeoutError:
            raise TpmError(f"the TPM did not answer within {self.timeout:g} s") from None
        finally:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
            self._idle_timer = loop.call_later(self.key_idle, self._flush_idle_keys)

    def _flush_idle_keys(self) -> None:
        self._idle_timer = None
        try:
            # On the TPM thread, after any call already queued there.
            self._executor.submit(self.tpm.flush_loaded_keys)
        except RuntimeError:
            pass    # the worker is closing, and closing flushes everything

    def close(self) -> None:
        # Pending calls are cancelled; the running one finishes first, so the
        # TPM context is closed only when no thread uses it.
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.tpm.close()
