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


class TpmWorker:
    """Serialises every call to one Tpm on a single worker thread."""

    def __init__(self, tpm: Tpm, timeout: float = TPM_CALL_TIMEOUT) -> None:
        self.tpm = tpm
        self.timeout = timeout
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tpm")

    async def call(self, function: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, functools.partial(function, *args))
        try:
            return await asyncio.wait_for(future, self.timeout)
        except asyncio.TimeoutError:
            raise TpmError(f"the TPM did not answer within {self.timeout:g} s") from None

    def close(self) -> None:
        # Pending calls are cancelled; the running one finishes first, so the
        # TPM context is closed only when no thread uses it.
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.tpm.close()
