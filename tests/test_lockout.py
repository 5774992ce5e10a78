"""Dictionary-attack lockout with low limits set by tpm2-tools on the swtpm.

Each test lowers the swtpm's limits with ``tpm2_dictionarylockout``, so a
lockout takes three wrong PINs.  In the chain tests it ends a few seconds
later, because the TPM lowers its failed-try counter by one per recovery
interval.  So the wrong PINs there must follow each other within that interval.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import asyncssh
import pytest

import tpmsigner
from tpmsigner.errors import TpmAuthError, TpmLockoutError
from tpmsigner.tpm import LockoutStatus, Tpm
from tests.support import Swtpm, wait_until
from tests.support.chain import Chain

PIN = "4711-lockout"
WRONG_PIN = "not-the-pin"
MAX_TRIES = 3
# Long enough for a refused request and `tpmsigner status` to run during the
# lockout, short enough to wait for its end.
RECOVERY_SECONDS = 4
LOCKOUT_RECOVERY_SECONDS = 10
DIGEST = bytes(range(32))


def set_dictionary_attack(tcti: str, recovery_seconds: int) -> None:
    """Set maxTries, recoveryTime and lockoutRecovery, with the empty lockout auth of a fresh swtpm."""
    subprocess.run(
        [
            "tpm2_dictionarylockout",
            "-T",
            tcti,
            "--setup-parameters",
            f"--max-tries={MAX_TRIES}",
            f"--recovery-time={recovery_seconds}",
            f"--lockout-recovery-time={LOCKOUT_RECOVERY_SECONDS}",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )


def getcap_properties(tcti: str) -> dict[str, int]:
    """Return the variable TPM properties as tpm2_getcap prints them, by name."""
    result = subprocess.run(
        ["tpm2_getcap", "-T", tcti, "properties-variable"],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    )
    properties = {}
    for line in result.stdout.splitlines():
        match = re.fullmatch(r"\s*(\w+):\s+(0x[0-9a-fA-F]+|\d+)\s*", line)
        if match:
            properties[match.group(1)] = int(match.group(2), 0)
    return properties


def transient_handles(tcti: str) -> str:
    result = subprocess.run(
        ["tpm2_getcap", "-T", tcti, "handles-transient"], check=True, capture_output=True, text=True, timeout=30
    )
    return result.stdout.strip()


def sign_with_ssh_keygen(chain: Chain, public_line: str) -> subprocess.CompletedProcess[str]:
    pub_file = chain.workdir / "work.pub"
    pub_file.write_text(public_line + "\n")
    message = chain.workdir / "message.txt"
    message.write_text("to be signed\n")
    return subprocess.run(
        ["ssh-keygen", "-Y", "sign", "-n", "file", "-f", str(pub_file), str(message)],
        env=chain.agent_environment(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def start_chain(chain: Chain, swtpm: Swtpm) -> str:
    """Create the key, lower the lockout limits, start signer and agent, and return the .pub line."""
    public_line = chain.keygen("work", PIN)
    set_dictionary_attack(swtpm.tcti, RECOVERY_SECONDS)
    chain.pair()
    chain.start_signer()
    chain.start_agent()
    return public_line


def test_tpm2_tools_leave_no_transient_objects(swtpm: Swtpm) -> None:
    set_dictionary_attack(swtpm.tcti, RECOVERY_SECONDS)
    getcap_properties(swtpm.tcti)

    assert transient_handles(swtpm.tcti) == ""


def test_wrong_pins_lead_to_lockout(chain: Chain, swtpm: Swtpm) -> None:
    public_line = start_chain(chain, swtpm)
    chain.set_approver_pin(WRONG_PIN)

    for attempt in range(1, MAX_TRIES + 1):
        signing = sign_with_ssh_keygen(chain, public_line)

        assert signing.returncode != 0, signing.stderr
        assert len(chain.approver_requests()) == attempt
        assert chain.signer is not None
        if attempt < MAX_TRIES:
            assert f"{MAX_TRIES - attempt} of {MAX_TRIES} tries left" in chain.signer.log_text()
        else:
            assert "that was the last try: the TPM is now in dictionary-attack lockout" in chain.signer.log_text()

    # Even the right PIN is not asked for, because the TPM would reject it unchecked.
    chain.set_approver_pin(PIN)
    refused = sign_with_ssh_keygen(chain, public_line)
    status = json.loads(chain.tpmsigner("status", "--json").stdout)

    assert refused.returncode != 0, refused.stderr
    assert len(chain.approver_requests()) == MAX_TRIES
    signer_log = chain.signer.log_text()
    assert "the TPM is in dictionary-attack lockout; not asking for a PIN" in signer_log
    assert f"The next try is allowed within {RECOVERY_SECONDS} s" in signer_log
    assert status["dictionary_attack"]["in_lockout"] is True
    assert status["dictionary_attack"]["tries_left"] == 0
    assert "signed with" not in signer_log
    # The rejection is audited with what was asked for, as an approved request would be.
    last = json.loads((chain.signer_home / "audit.jsonl").read_text().splitlines()[-1])
    assert last["outcome"] == "locked_out"
    assert last["key_label"] == "work"
    assert last["purpose"] == "sshsig:file"
    assert last["destination"]["user"] is None


def test_right_pin_works_after_recovery(chain: Chain, swtpm: Swtpm) -> None:
    public_line = start_chain(chain, swtpm)
    chain.set_approver_pin(WRONG_PIN)
    for _ in range(MAX_TRIES):
        sign_with_ssh_keygen(chain, public_line)
    assert getcap_properties(swtpm.tcti)["inLockout"] == 1

    wait_until(
        lambda: getcap_properties(swtpm.tcti)["inLockout"] == 0,
        RECOVERY_SECONDS + 10,
        "the TPM to leave dictionary-attack lockout",
        interval=0.2,
    )
    chain.set_approver_pin(PIN)
    signing = sign_with_ssh_keygen(chain, public_line)

    assert signing.returncode == 0, signing.stderr
    assert "-----BEGIN SSH SIGNATURE-----" in Path(chain.workdir / "message.txt.sig").read_text()
    assert len(chain.approver_requests()) == MAX_TRIES + 1
    assert chain.signer is not None
    assert "signed with 'work'" in chain.signer.log_text()


def assert_status_matches_getcap(status: LockoutStatus, properties: dict[str, int]) -> None:
    assert status.failed_tries == properties["TPM2_PT_LOCKOUT_COUNTER"]
    assert status.max_tries == properties["TPM2_PT_MAX_AUTH_FAIL"]
    assert status.interval == properties["TPM2_PT_LOCKOUT_INTERVAL"]
    assert status.recovery == properties["TPM2_PT_LOCKOUT_RECOVERY"]
    assert status.in_lockout is bool(properties["inLockout"])


def test_lockout_status_matches_tpm2_getcap(swtpm: Swtpm) -> None:
    # A recovery time of ten minutes keeps the counter still while the test runs.
    set_dictionary_attack(swtpm.tcti, 600)
    with Tpm(swtpm.tcti) as tpm:
        blob = tpm.create_key(PIN.encode())
        statuses = [tpm.lockout_status()]
        properties = [getcap_properties(swtpm.tcti)]
        for _ in range(MAX_TRIES):
            with pytest.raises(TpmAuthError):
                tpm.sign_digest(blob, DIGEST, WRONG_PIN.encode())
            statuses.append(tpm.lockout_status())
            properties.append(getcap_properties(swtpm.tcti))

    for status, getcap in zip(statuses, properties):
        assert_status_matches_getcap(status, getcap)
    assert [status.failed_tries for status in statuses] == [0, 1, 2, 3]
    assert statuses[-1].in_lockout is True
    assert statuses[-1].interval == 600
    assert statuses[-1].recovery == LOCKOUT_RECOVERY_SECONDS


def test_library_rejects_pin_during_lockout(swtpm: Swtpm) -> None:
    set_dictionary_attack(swtpm.tcti, 600)
    with Tpm(swtpm.tcti) as tpm:
        blob = tpm.create_key(PIN.encode())
        messages = []
        for _ in range(MAX_TRIES):
            with pytest.raises(TpmAuthError) as wrong:
                tpm.sign_digest(blob, DIGEST, WRONG_PIN.encode())
            messages.append(str(wrong.value))

        with pytest.raises(TpmLockoutError) as locked:
            tpm.sign_digest(blob, DIGEST, PIN.encode())
        after = tpm.lockout_status()

    assert messages == [
        *(f"signing failed: wrong PIN; {left} of {MAX_TRIES} tries left before the TPM locks out" for left in (2, 1)),
        "signing failed: wrong PIN; that was the last try: the TPM is now in dictionary-attack lockout",
    ]
    assert "dictionary-attack lockout" in str(locked.value)
    assert "the next try is allowed within 600 s" in str(locked.value)
    # The right PIN was not sent, so it counted as no further failure.
    assert after.failed_tries == MAX_TRIES
    assert transient_handles(swtpm.tcti) == ""


def test_clear_lockout_restores_signing(chain: Chain, swtpm: Swtpm) -> None:
    chain.keygen("work", PIN)
    set_dictionary_attack(swtpm.tcti, 600)
    store = tpmsigner.KeyStore(chain.signer_home)
    identity = store.get("work")
    with Tpm(swtpm.tcti) as tpm:
        for _ in range(MAX_TRIES):
            with pytest.raises(TpmAuthError):
                tpmsigner.sign_data(tpm, store, identity, b"data", WRONG_PIN.encode())

    subprocess.run(
        ["tpm2_dictionarylockout", "-T", swtpm.tcti, "--clear-lockout"], check=True, capture_output=True, timeout=30
    )
    with Tpm(swtpm.tcti) as tpm:
        signature = tpmsigner.sign_data(tpm, store, identity, b"data", PIN.encode())
        status = tpm.lockout_status()

    assert asyncssh.import_public_key(identity.openssh_line()).verify(b"data", signature)
    assert status.failed_tries == 0
    assert status.in_lockout is False


def test_recent_status_reused_only_when_clear(swtpm: Swtpm) -> None:
    set_dictionary_attack(swtpm.tcti, 600)
    with Tpm(swtpm.tcti) as tpm:
        blob = tpm.create_key(PIN.encode())
        assert tpm.recent_lockout_status() is None      # nothing read yet

        read = tpm.lockout_status()
        assert tpm.recent_lockout_status() == read
        assert tpm.recent_lockout_status(max_age=0.0) is None

        # A wrong PIN changes the counter, so the status read before it no
        # longer stands; the one read to report the tries left does.
        with pytest.raises(TpmAuthError):
            tpm.sign_digest(blob, DIGEST, WRONG_PIN.encode())
        recent = tpm.recent_lockout_status()
        assert recent is not None and recent.failed_tries == read.failed_tries + 1

        for _ in range(MAX_TRIES - 1):
            with pytest.raises(TpmAuthError):
                tpm.sign_digest(blob, DIGEST, WRONG_PIN.encode())
        # A status that shows the lockout is never reused: each request asks the TPM.
        assert tpm.lockout_status().in_lockout is True
        assert tpm.recent_lockout_status() is None
