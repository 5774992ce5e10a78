"""OpenSSH key pairs generated with ssh-keygen for the tests."""

import subprocess
from dataclasses import dataclass
from pathlib import Path

KEYGEN_TIMEOUT_SECONDS = 30


@dataclass(frozen=True)
class SshKeyPair:
    """A private key file without passphrase and its public key."""

    private_key: Path
    public_key_line: str

    @property
    def public_key_file(self) -> Path:
        return self.private_key.with_name(self.private_key.name + ".pub")


def generate_key_pair(path: Path, key_type: str = "ed25519", comment: str = "tpmsigner-test") -> SshKeyPair:
    """Generate a key pair with ssh-keygen at path and path + ".pub".

    key_type is an ssh-keygen -t value such as ed25519, ecdsa or rsa.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["ssh-keygen", "-q", "-t", key_type, "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=KEYGEN_TIMEOUT_SECONDS,
    )
    public_key_line = path.with_name(path.name + ".pub").read_text().strip()
    return SshKeyPair(private_key=path, public_key_line=public_key_line)
