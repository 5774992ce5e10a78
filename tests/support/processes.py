"""Process checks and bounded polling shared by the peer helpers."""

import os
import time
from collections.abc import Callable
from pathlib import Path


def pid_is_running(pid: int) -> bool:
    """Return True if the process exists and is not a zombie.

    A zombie has exited but is not reaped yet, for example a daemon whose new
    parent is slow to reap it. It serves nothing, so it counts as stopped.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # The process exists but belongs to another user.
        pass

    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    # The state is the first field after the command name, which is in
    # brackets and may itself contain spaces or brackets.
    state = stat.rpartition(")")[2].split()[0]
    return state != "Z"


def wait_until(
    condition: Callable[[], bool],
    timeout: float,
    description: str,
    interval: float = 0.05,
) -> None:
    """Poll condition until it returns True.

    Raises TimeoutError naming description if timeout seconds pass first.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {description}")
        time.sleep(interval)
