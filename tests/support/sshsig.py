"""Sign a file with `ssh-keygen -Y sign` through an agent, and check it with OpenSSH."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass
class SshsigResult:
    """The outcome of signing ``message`` and checking the signature."""

    signed: subprocess.CompletedProcess[str]
    checked: subprocess.CompletedProcess[str] | None
    signature_file: Path


def sign_and_check(
    environment: dict[str, str], public_line: str, message: Path, namespace: str = "git"
) -> SshsigResult:
    """Run `ssh-keygen -Y sign` with the agent in ``environment``, then `-Y check-novalidate`.

    ``checked`` is None when signing failed.
    """
    pub_file = message.with_name(message.name + ".pub-for-signing")
    pub_file.write_text(public_line + "\n")
    signed = subprocess.run(
        ["ssh-keygen", "-Y", "sign", "-n", namespace, "-f", str(pub_file), str(message)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    signature_file = Path(f"{message}.sig")
    if signed.returncode != 0:
        return SshsigResult(signed, None, signature_file)

    with open(message, "rb") as stdin:
        checked = subprocess.run(
            ["ssh-keygen", "-Y", "check-novalidate", "-n", namespace, "-f", str(pub_file), "-s", str(signature_file)],
            stdin=stdin,
            capture_output=True,
            text=True,
            timeout=30,
        )
    return SshsigResult(signed, checked, signature_file)
