"""Programs that serve starts for one request, and that must not outlive serve.

serve kills an approver, pinentry or notifier when its request ends and when
serve stops.  If serve itself is killed with SIGKILL or crashes, nothing would
kill them: a dialog could go on asking for a PIN that nothing reads.  Linux
offers PR_SET_PDEATHSIG (prctl(2)) for this, which has to be set in the child
between fork and exec.  Python's subprocess can do that only with
``preexec_fn``, which is unsafe in a process with threads (serve runs TPM
calls on one), so the child runs through util-linux's setpriv(1) instead,
which sets the signal and then executes the program in the same process.
"""

from __future__ import annotations

import errno
import functools
import logging
import shutil

logger = logging.getLogger(__name__)

# The kernel sends this to the child when the thread that forked it ends.
# serve forks its children from the event loop, which runs on the main
# thread for as long as serve runs.
PARENT_DEATH_SIGNAL = "KILL"


@functools.cache
def _setpriv() -> str | None:
    path = shutil.which("setpriv")
    if path is None:
        logger.warning(
            "setpriv (util-linux) was not found, so approver and pinentry processes are not killed if serve is "
            "killed with SIGKILL or crashes; install util-linux to have them killed"
        )
    return path


def bound_to_serve(argv: list[str], path: str | None = None) -> list[str]:
    """Prefix ``argv`` so that the kernel kills the program when serve dies.

    The program is looked up on ``path`` (default: $PATH) first, because
    setpriv would report a missing program only as exit status 127.  Raises
    FileNotFoundError, an OSError as from exec itself, if it is not found.
    Only the program itself gets the signal: processes that it started
    outlive a killed serve unless they exit when their parent does.
    Without setpriv, the looked-up ``argv`` is returned as it is.
    """
    program = shutil.which(argv[0], path=path)
    if program is None:
        raise FileNotFoundError(errno.ENOENT, "not found or not executable", argv[0])
    setpriv = _setpriv()
    if setpriv is None:
        return [program, *argv[1:]]
    return [setpriv, f"--pdeathsig={PARENT_DEATH_SIGNAL}", "--", program, *argv[1:]]
