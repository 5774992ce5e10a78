"""Tests of the helpers in tests/support against real swtpm, sshd and ssh-agent."""

import socket
import subprocess
from pathlib import Path

import pytest
from tpm2_pytss import ESAPI, ESYS_TR, TPM2_ALG, TPM2_HC, TPMA_NV, TPM2B_NV_PUBLIC, TPMS_NV_PUBLIC

import tpmsigner
from tpmsigner.tpm import Tpm
from tests.support import LOCALHOST, OpenSshAgent, Sshd, Swtpm, check_unix_socket_path, free_port, generate_key_pair
from tests.support.processes import pid_is_running

NV_INDEX = TPM2_HC.NV_INDEX_FIRST + 0x10
NV_DATA = b"tpmsigner persisted state"
SSH_TIMEOUT_SECONDS = 30


def test_free_port_is_bindable() -> None:
    port = free_port()

    assert 1024 <= port <= 65535
    with socket.socket() as sock:
        sock.bind((LOCALHOST, port))


def test_swtpm_tcti_and_files(swtpm: Swtpm) -> None:
    assert swtpm.tcti == f"swtpm:host=127.0.0.1,port={swtpm.server_port}"
    assert (swtpm.state_dir / "tcti").read_text().strip() == swtpm.tcti
    # The tss2 swtpm TCTI sends control commands to the server port + 1.
    assert swtpm.ctrl_port == swtpm.server_port + 1
    assert swtpm.is_running()


def test_swtpm_serves_esapi_and_ioctl(swtpm: Swtpm) -> None:
    with ESAPI(swtpm.tcti) as esapi:
        random = esapi.get_random(16)
    assert len(random) == 16

    result = subprocess.run(
        ["swtpm_ioctl", "--tcp", f"{LOCALHOST}:{swtpm.ctrl_port}", "-g"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert result.returncode == 0, result.stderr
    assert "ptm configuration flags" in result.stdout


def _define_and_write_nv(tcti: str) -> None:
    public = TPM2B_NV_PUBLIC(
        nvPublic=TPMS_NV_PUBLIC(
            nvIndex=NV_INDEX,
            nameAlg=TPM2_ALG.SHA256,
            attributes=TPMA_NV.OWNERWRITE | TPMA_NV.OWNERREAD | TPMA_NV.NO_DA,
            dataSize=len(NV_DATA),
        )
    )
    with ESAPI(tcti) as esapi:
        handle = esapi.nv_define_space(None, public)
        esapi.nv_write(handle, NV_DATA, 0, auth_handle=ESYS_TR.OWNER)


def _read_nv(tcti: str) -> bytes:
    with ESAPI(tcti) as esapi:
        handle = esapi.tr_from_tpmpublic(NV_INDEX)
        return bytes(esapi.nv_read(handle, len(NV_DATA), 0, auth_handle=ESYS_TR.OWNER))


def test_swtpm_restart_keeps_state(swtpm: Swtpm) -> None:
    _define_and_write_nv(swtpm.tcti)
    first_tcti = swtpm.tcti
    first_pid = swtpm.pid
    assert first_pid is not None

    swtpm.stop()
    assert not pid_is_running(first_pid)
    swtpm.stop()  # stopping a stopped swtpm succeeds

    swtpm.start()
    assert swtpm.pid != first_pid
    # The ports were free again, so the restart reused them.
    assert swtpm.tcti == first_tcti
    assert _read_nv(swtpm.tcti) == NV_DATA


def _lockout_counter(tcti: str) -> int:
    with Tpm(tcti) as tpm:
        return tpm.lockout_status().failed_tries


def test_swtpm_stop_is_orderly(swtpm: Swtpm, tmp_path: Path) -> None:
    # A signature authorizes a key with dictionary-attack protection, after
    # which a stop without TPM2_Shutdown would count as a failed try.
    store = tpmsigner.KeyStore(tmp_path / "home")
    with Tpm(swtpm.tcti) as tpm:
        identity = tpmsigner.create_identity(tpm, store, "work", b"1357-orderly")
    before = _lockout_counter(swtpm.tcti)

    # Three stops would reach the test TPM's limit of three failed tries.
    for _ in range(3):
        with Tpm(swtpm.tcti) as tpm:
            tpmsigner.sign_data(tpm, store, identity, b"payload", b"1357-orderly")
        swtpm.stop()
        swtpm.start()

    assert _lockout_counter(swtpm.tcti) == before


def test_swtpm_kill_then_restart_keeps_state(swtpm: Swtpm) -> None:
    _define_and_write_nv(swtpm.tcti)
    killed_pid = swtpm.pid
    assert killed_pid is not None

    swtpm.kill()
    assert not pid_is_running(killed_pid)

    swtpm.start()
    assert _read_nv(swtpm.tcti) == NV_DATA


def _run_ssh(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=SSH_TIMEOUT_SECONDS)


def test_sshd_accepts_key_from_agent(tmp_path: Path, sshd_factory, openssh_agent: OpenSshAgent) -> None:
    key = generate_key_pair(tmp_path / "id_ecdsa", "ecdsa")
    openssh_agent.add_key(key.private_key)
    sshd: Sshd = sshd_factory(authorized_keys=[key.public_key_line])

    result = _run_ssh(sshd.ssh_command(openssh_agent.socket_path, "echo login-ok; id -un"))

    assert result.returncode == 0, f"ssh failed:\n{result.stderr}\nsshd log:\n{sshd.log_text()}"
    assert result.stdout.splitlines() == ["login-ok", sshd.user]
    assert f"Accepted publickey for {sshd.user}" in sshd.log_text()
    assert "ECDSA" in sshd.log_text()


def test_sshd_rejects_key_not_authorized(tmp_path: Path, sshd_factory, openssh_agent: OpenSshAgent) -> None:
    authorized = generate_key_pair(tmp_path / "id_authorized", "ecdsa")
    other = generate_key_pair(tmp_path / "id_other", "ecdsa")
    openssh_agent.add_key(other.private_key)
    sshd: Sshd = sshd_factory(authorized_keys=[authorized.public_key_line])

    result = _run_ssh(sshd.ssh_command(openssh_agent.socket_path, "echo login-ok"))

    assert result.returncode == 255
    assert "login-ok" not in result.stdout
    assert "Permission denied (publickey)" in result.stderr
    assert "Accepted publickey" not in sshd.log_text()


def test_sshd_extra_config_overrides_defaults(tmp_path: Path, sshd_factory, openssh_agent: OpenSshAgent) -> None:
    key = generate_key_pair(tmp_path / "id_ecdsa", "ecdsa")
    openssh_agent.add_key(key.private_key)
    sshd: Sshd = sshd_factory(
        authorized_keys=[key.public_key_line],
        extra_config=["PubkeyAcceptedAlgorithms ssh-ed25519"],
    )

    result = _run_ssh(sshd.ssh_command(openssh_agent.socket_path, "echo login-ok"))

    assert result.returncode == 255
    assert "Permission denied (publickey)" in result.stderr


def test_sshd_rereads_authorized_keys(tmp_path: Path, sshd_factory, openssh_agent: OpenSshAgent) -> None:
    key = generate_key_pair(tmp_path / "id_ed25519")
    openssh_agent.add_key(key.private_key)
    sshd: Sshd = sshd_factory(authorized_keys=[])

    rejected = _run_ssh(sshd.ssh_command(openssh_agent.socket_path, "true"))
    sshd.set_authorized_keys([key.public_key_line])
    accepted = _run_ssh(sshd.ssh_command(openssh_agent.socket_path, "true"))

    assert rejected.returncode == 255
    assert accepted.returncode == 0, f"ssh failed:\n{accepted.stderr}\nsshd log:\n{sshd.log_text()}"


def test_sshd_known_hosts_line(sshd_factory) -> None:
    sshd: Sshd = sshd_factory()

    fields = sshd.known_hosts_file.read_text().split()
    assert fields[0] == f"[127.0.0.1]:{sshd.port}"
    assert fields[1] == "ssh-ed25519"
    host_key = subprocess.run(
        ["ssh-keyscan", "-p", str(sshd.port), "-t", "ed25519", LOCALHOST],
        capture_output=True,
        text=True,
        timeout=SSH_TIMEOUT_SECONDS,
    )
    assert fields[2] in host_key.stdout


def test_ssh_command_skips_default_key_files(sshd_factory, openssh_agent: OpenSshAgent) -> None:
    sshd: Sshd = sshd_factory()
    argv = sshd.ssh_command(openssh_agent.socket_path, "true")

    # ssh -G prints the configuration that ssh would use, without connecting.
    result = subprocess.run([argv[0], "-G", *argv[1:]], capture_output=True, text=True, timeout=10, check=True)

    identity_files = [line for line in result.stdout.splitlines() if line.startswith("identityfile ")]
    assert identity_files == [f"identityfile {sshd.workdir / 'no-identity-file'}"]
    assert f"identityagent {openssh_agent.socket_path}" in result.stdout.splitlines()


def test_sshd_stop_leaves_no_process(sshd_factory) -> None:
    sshd: Sshd = sshd_factory()
    assert sshd.process is not None
    pid = sshd.process.pid

    sshd.stop()
    sshd.stop()  # stopping a stopped sshd is fine

    assert not pid_is_running(pid)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((LOCALHOST, sshd.port), timeout=5).close()


def test_unix_socket_path_limit(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="short_tmp_path"):
        check_unix_socket_path(tmp_path / ("x" * 120))
    check_unix_socket_path(Path("/tmp/short.sock"))


def test_sshd_rejects_invalid_extra_config(sshd_factory) -> None:
    with pytest.raises(RuntimeError, match="sshd -t rejected the config") as raised:
        sshd_factory(extra_config=["NoSuchKeyword yes"])

    assert "NoSuchKeyword" in str(raised.value)
