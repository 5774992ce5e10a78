"""Run TPM calls on one dedicated thread, off the event loop.

A TPM call cannot be interrupted: the synchronous ESAPI calls that
tpm2-pytss makes wait for the response with no time limit (tpm2-tss 3.2),
so a stopped emulator or a wedged bus keeps the thread inside the call.  The caller stops waiting after ``timeout``
seconds, and while that call is still running, later calls are rejected
at once instead of queueing behind it.  The thread is a daemon thread, so
a call that never returns cannot keep the process from exiting.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import queue
import threading
import time
from typing import Callable, TypeVar

from ..errors import TpmUnavailableError
from ..tpm import Tpm

logger = logging.getLogger(__name__)

T = TypeVar("T")

# A TPM command that has not returned by then is taken as hung (a stopped
# emulator, a wedged bus).  TPM 2.0 commands finish in well under a second
# on real parts; key creation on a slow TPM is the longest, at a few seconds.
TPM_CALL_TIMEOUT = 30.0
# How long close() waits for the call in progress before leaving it behind.
CLOSE_TIMEOUT = 5.0
# Signing keys stay loaded between signatures (tpmsigner.loadedkeys).  After
# this many seconds without a TPM call they are flushed, so that on a TPM
# without a resource manager another program gets the object slot back.
LOADED_KEY_IDLE_SECONDS = 10.0

_Job = tuple[concurrent.futures.Future, Callable[[], object]]


class TpmWorker:
    """Serialises every call to one Tpm on a single worker thread."""

    def __init__(
        self, tpm: Tpm, timeout: float = TPM_CALL_TIMEOUT, key_idle: float = LOADED_KEY_IDLE_SECONDS
    ) -> None:
        self.tpm = tpm
        self.timeout = timeout
        self.key_idle = key_idle
        self._idle_timer: asyncio.TimerHandle | None = None
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        # monotonic() when the running call started, None while idle.
        self._call_started: float | None = None
        self._thread = threading.Thread(target=self._run, name="tpm", daemon=True)
        self._thread.start()

    def overdue_seconds(self) -> float | None:
        """Return how long the running call has been waiting, if that is longer than the timeout."""
        started = self._call_started
        if started is None:
            return None
        elapsed = time.monotonic() - started
        return elapsed if elapsed > self.timeout else None

    def submit(self, function: Callable[..., T], *args: object) -> concurrent.futures.Future[T]:
        """Queue ``function(*args)`` for the TPM thread and return its future.

        Raise TpmUnavailableError at once while an earlier call is overdue:
        the thread is still inside it, so a new call would only wait too.
        """
        overdue = self.overdue_seconds()
        if overdue is not None:
            raise TpmUnavailableError(
                f"the TPM has not responded to a command sent {overdue:.1f} s ago (the timeout is "
                f"{self.timeout:g} s), so requests are rejected until it responds; check that the TPM at "
                f"{self.tpm.tcti!r} (or swtpm) is running and not stopped"
            )
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._jobs.put((future, functools.partial(function, *args)))
        return future

    async def call(self, function: Callable[..., T], *args: object) -> T:
        """Run ``function(*args)`` on the TPM thread and wait at most ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        future = self.submit(function, *args)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout)
        except asyncio.TimeoutError:
            future.cancel()
            raise self._timeout_error() from None
        finally:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
            self._idle_timer = loop.call_later(self.key_idle, self._flush_idle_keys)

    def _flush_idle_keys(self) -> None:
        self._idle_timer = None
        try:
            # On the TPM thread, after any call already queued there.
            self.submit(self.tpm.flush_loaded_keys)
        except TpmUnavailableError:
            pass    # a call is stuck in the TPM; the next call that succeeds re-arms the timer

    def call_blocking(self, function: Callable[..., T], *args: object) -> T:
        """Run ``function(*args)`` on the TPM thread from a thread with no event loop."""
        future = self.submit(function, *args)
        try:
            return future.result(self.timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise self._timeout_error() from None

    def _timeout_error(self) -> TpmUnavailableError:
        return TpmUnavailableError(
            f"the TPM at {self.tpm.tcti!r} timed out: no response within {self.timeout:g} s; check that it "
            "(or swtpm) is running and not stopped"
        )

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            future, function = job
            # A call whose caller has given up (timed out while queued) is skipped.
            if not future.set_running_or_notify_cancel():
                continue

            self._call_started = started = time.monotonic()
            try:
                result = function()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, as an executor does
                future.set_exception(exc)
            else:
                future.set_result(result)
            finally:
                self._call_started = None

            elapsed = time.monotonic() - started
            if elapsed > self.timeout:
                logger.warning(
                    "a TPM call returned after %.1f s, %.1f s past the timeout; the request it served "
                    "had already failed, and TPM calls are accepted again",
                    elapsed,
                    elapsed - self.timeout,
                )

    def close(self) -> None:
        """Stop the thread and close the TPM context, unless a call is still stuck in the TPM."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        # Calls still queued are cancelled; the running one may finish first.
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job[0].cancel()
        self._jobs.put(None)

        self._thread.join(CLOSE_TIMEOUT)
        if self._thread.is_alive():
            # The context is in use by the stuck call, so it cannot be closed;
            # the daemon thread ends with the process.
            logger.warning(
                "a TPM call is still waiting for the TPM at %r after %g s; leaving it behind without "
                "closing the TPM context",
                self.tpm.tcti,
                CLOSE_TIMEOUT,
            )
            return
        self.tpm.close()
