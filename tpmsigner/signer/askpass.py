"""The ``askpass`` approver: an SSH_ASKPASS program asks for the PIN.

It follows OpenSSH's convention for SSH_ASKPASS programs (ssh(1),
ssh-add(1)): the prompt is the only argument, and the program prints the
answer on stdout and exits 0, or exits non-zero to cancel.  The request
details, with the TPMSIGNER_* variables of the ``command:`` approver, are
what the program shows.
"""

from __future__ import annotations

import asyncio
import os
import shutil

from ..errors import ConfigError
from .approvers import DEFAULT_APPROVAL_TIMEOUT, ApprovalRequest, run_approver_program
from .requesttext import describe_request

ASKPASS_HINT = (
    "set SSH_ASKPASS to a program such as /usr/bin/ssh-askpass (Debian packages ssh-askpass or "
    "ssh-askpass-gnome), or give one as askpass:PROGRAM"
)


class AskpassApprover:
    """Runs an SSH_ASKPASS program for each request, one at a time.

    Exit status 0 with the PIN as the first stdout line approves; any other
    status, or an empty line, refuses.
    """

    def __init__(self, program: str | None = None, timeout: float = DEFAULT_APPROVAL_TIMEOUT) -> None:
        self.program = program if program is not None else os.environ.get("SSH_ASKPASS", "")
        self.timeout = timeout
        # Askpass dialogs often grab the keyboard, so a second one at the
        # same time could not be answered.
        self._turn = asyncio.Lock()

    def check(self) -> None:
        if not self.program:
            raise ConfigError(f"the askpass approver needs a program, but SSH_ASKPASS is not set; {ASKPASS_HINT}")
        if shutil.which(self.program) is None:
            raise ConfigError(f"askpass program {self.program!r} was not found or is not executable; {ASKPASS_HINT}")

    def prompt(self, request: ApprovalRequest) -> str:
        """Return the prompt argument: the request details, then the question."""
        return f"{describe_request(request)}\n\nPIN to sign, or cancel to refuse:"

    async def request_pin(self, request: ApprovalRequest) -> str | None:
        environment = dict(os.environ)
        environment.update(request.environment())
        # ssh sets SSH_ASKPASS_PROMPT=confirm when it wants only a yes or no
        # and "none" to show a message; unset, it asks for a secret, which
        # is what a PIN is.
        environment.pop("SSH_ASKPASS_PROMPT", None)
        async with self._turn:
            pin = await run_approver_program(
                [self.program, self.prompt(request)], environment, self.timeout, request.request_id
            )
        # An askpass dialog closed with OK on an empty field prints an empty line.
        return pin or None
