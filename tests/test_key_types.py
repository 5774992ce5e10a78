"""Every key type end to end: ssh-add -L, ssh logins, ssh-keygen -Y sign."""

from __future__ import annotations

import base64
import subprocess

import asyncssh
import pytest
from asyncssh.packet import SSHPacket

import tpmsigner
from tpmsigner.keytypes import KEY_TYPES
from tpmsigner.protocol.sshkeys import SSH_AGENT_RSA_SHA2_256, SSH_AGENT_RSA_SHA2_512
from tpmsigner.tpm import Tpm
from tests.support.chain import Chain
from tests.support.sshsig import sign_and_check

PIN = "4711-key-types"


def start_chain_with_key(chain: Chain, key_type: str) -> str:
    pin_file = chain.workdir / "pin"
    pin_file.write_text(PIN + "\n")
    result = chain.tpmsigner("keygen", "key", "--type", key_type, "--pin-file", str(pin_file), timeout=180)
    chain.set_approver_pin(PIN)
    chain.pair()
    chain.start_signer()
    chain.start_agent()
    return result.stdout.strip()


def login(chain: Chain, sshd, algorithm: str) -> subprocess.CompletedProcess[str]:
    # ssh 9.2 picks rsa-sha2-512 for an RSA key unless told otherwise, and
    # does not fall back to another algorithm for the same key.
    options = ["-o", f"PubkeyAcceptedAlgorithms={algorithm}"]
    return subprocess.run(
        sshd.ssh_command(chain.agent_socket, "echo logged-in", extra_options=options),
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    ("key_type", "ssh_type", "accepted"),
    [
        ("ecdsa-p256", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp256"),
        ("ecdsa-p384", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp384"),
        ("rsa-2048", "ssh-rsa", "rsa-sha2-256"),
        ("rsa-2048", "ssh-rsa", "rsa-sha2-512"),
        ("rsa-3072", "ssh-rsa", "rsa-sha2-512"),
    ],
)
def test_login_with_each_key_type(chain: Chain, sshd_factory, key_type: str, ssh_type: str, accepted: str) -> None:
    public_line = start_chain_with_key(chain, key_type)
    assert public_line.startswith(ssh_type + " ")
    assert chain.ssh_add("-L").stdout.strip() == public_line

    sshd = sshd_factory(authorized_keys=[public_line], extra_config=[f"PubkeyAcceptedAlgorithms {accepted}"])
    result = login(chain, sshd, accepted)

    assert result.returncode == 0, result.stderr + sshd.log_text()
    assert result.stdout.strip() == "logged-in"
    assert f"Accepted publickey for {sshd.user}" in sshd.log_text()


@pytest.mark.parametrize("key_type", ["ecdsa-p384", "rsa-2048"])
def test_sshsig_with_each_key_type(chain: Chain, key_type: str) -> None:
    public_line = start_chain_with_key(chain, key_type)
    message = chain.workdir / "message"
    message.write_text("signed by a TPM key\n")

    result = sign_and_check(chain.agent_environment(), public_line, message)

    assert result.signed.returncode == 0, result.signed.stderr
    assert result.checked is not None
    assert result.checked.returncode == 0, result.checked.stderr

    armored = (chain.workdir / "message.sig").read_text().splitlines()
    # OpenSSH PROTOCOL.sshsig: magic, version, public key, namespace,
    # reserved, hash algorithm, then the signature blob, which starts with
    # its algorithm name.  The name is compared there, because the public
    # key blob before it also contains the key type.
    sshsig = SSHPacket(base64.b64decode("".join(armored[1:-1])))
    assert sshsig.get_bytes(6) == b"SSHSIG"
    assert sshsig.get_uint32() == 1
    assert sshsig.get_string() == base64.b64decode(public_line.split()[1])
    assert sshsig.get_string() == b"git"
    sshsig.get_string()
    sshsig.get_string()
    signature = SSHPacket(sshsig.get_string())
    sshsig.check_end()
    # ssh-keygen -Y sign asks RSA keys for rsa-sha2-512 (OpenSSH 9.2).
    expected_algorithm = b"rsa-sha2-512" if key_type.startswith("rsa") else b"ecdsa-sha2-nistp384"
    assert signature.get_string() == expected_algorithm


@pytest.mark.parametrize(
    ("flags", "algorithm"),
    [
        (0, "ssh-rsa"),
        (SSH_AGENT_RSA_SHA2_256, "rsa-sha2-256"),
        (SSH_AGENT_RSA_SHA2_512, "rsa-sha2-512"),
        (SSH_AGENT_RSA_SHA2_256 | SSH_AGENT_RSA_SHA2_512, "rsa-sha2-256"),
    ],
)
def test_rsa_flags_choose_algorithm(swtpm, tmp_path, flags: int, algorithm: str) -> None:
    store = tpmsigner.KeyStore(tmp_path / "home")
    with Tpm(swtpm.tcti) as tpm:
        identity = tpmsigner.create_identity(tpm, store, "rsa", PIN.encode(), KEY_TYPES["rsa-2048"])
        signature = tpmsigner.sign_data(tpm, store, identity, b"payload", PIN.encode(), flags)

    assert signature[4 : 4 + len(algorithm)] == algorithm.encode()
    key = asyncssh.import_public_key(identity.openssh_line())
    assert key.verify(b"payload", signature)


def test_ecdsa_ignores_rsa_flags(swtpm, tmp_path) -> None:
    store = tpmsigner.KeyStore(tmp_path / "home")
    with Tpm(swtpm.tcti) as tpm:
        identity = tpmsigner.create_identity(tpm, store, "ec", PIN.encode())
        signature = tpmsigner.sign_data(tpm, store, identity, b"payload", PIN.encode(), SSH_AGENT_RSA_SHA2_512)

    assert signature[4:23] == b"ecdsa-sha2-nistp256"
    assert asyncssh.import_public_key(identity.openssh_line()).verify(b"payload", signature)


def test_tpm_reports_supported_types(swtpm) -> None:
    with Tpm(swtpm.tcti) as tpm:
        supported = [key_type.name for key_type in tpm.supported_key_types()]
    assert supported == ["ecdsa-p256", "ecdsa-p384", "rsa-2048", "rsa-3072"]
