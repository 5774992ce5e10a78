"""Damaged state files in the homes of serve and the agent: clear errors that name the file and the fix."""

from __future__ import annotations

import json

import pytest

from tests.support import wait_until
from tests.support.chain import Chain
from tpmsigner.protocol.channel import format_public_key

PIN = "4711-state-files"
DEVICES_HINT = "correct the file, or move it away and pair the agents again"
SIGNERS_HINT = "correct the file, or move it away and pair the signers again"

# Contents of devices.json and the reason the error gives for each.
BAD_DEVICES_FILES = {
    "empty": ("", "not valid JSON"),
    "list": ("[]", "the file must contain a JSON object"),
    "no devices": ('{"version": 2}', "'devices' must be a JSON object of device names"),
    "devices list": ('{"version": 2, "devices": []}', "'devices' must be a JSON object of device names"),
    "key number": ('{"version": 2, "devices": {"laptop": {"key": 5}}}', "device 'laptop': 'key' must be a string"),
    "version": ('{"version": 9, "devices": {}}', "unsupported version 9"),
}

BAD_SIGNERS_FILES = {
    "list": ("[]", "the file must contain a JSON object"),
    "no signers": ('{"version": 1}', "'signers' must be a JSON object of signer names"),
    "entry number": ('{"version": 1, "signers": {"home": 5}}', "signer 'home': expected an object"),
    "address number": (
        '{"version": 1, "signers": {"home": {"address": 5, "key": "k"}}}',
        "signer 'home': 'address' must be a string",
    ),
}


@pytest.mark.parametrize("case", list(BAD_DEVICES_FILES))
def test_bad_devices_file_names_reason_and_fix(chain: Chain, case: str) -> None:
    content, reason = BAD_DEVICES_FILES[case]
    chain.signer_home.mkdir(parents=True)
    (chain.signer_home / "devices.json").write_text(content)

    result = chain.tpmsigner("devices", check=False)

    assert result.returncode == 1
    assert f"cannot read the trusted devices file {chain.signer_home / 'devices.json'}: {reason}" in result.stderr
    assert DEVICES_HINT in result.stderr
    assert "object has no attribute" not in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("case", list(BAD_SIGNERS_FILES))
def test_bad_signers_file_names_reason_and_fix(chain: Chain, case: str) -> None:
    content, reason = BAD_SIGNERS_FILES[case]
    chain.agent_home.mkdir(parents=True)
    (chain.agent_home / "signers.json").write_text(content)

    result = chain.tpmsigner_agent("signers", check=False)

    assert result.returncode == 1
    assert f"cannot read the trusted signers file {chain.agent_home / 'signers.json'}: {reason}" in result.stderr
    assert SIGNERS_HINT in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_to_start_on_bad_devices_file(chain: Chain) -> None:
    chain.keygen("work", PIN)
    (chain.signer_home / "devices.json").write_text("[]")

    result = chain.tpmsigner(
        "serve", "--listen", f"127.0.0.1:{chain.signer_port}", "--no-mdns",
        "--approver", f"command:{chain.approver_program}", check=False,
    )

    assert result.returncode == 1
    assert f"cannot read the trusted devices file {chain.signer_home / 'devices.json'}" in result.stderr
    assert DEVICES_HINT in result.stderr
    assert "Traceback" not in result.stderr


def test_devices_file_damaged_while_serving(chain: Chain) -> None:
    chain.keygen("work", PIN)
    chain.pair()
    signer = chain.start_signer()
    chain.start_agent()
    devices_file = chain.signer_home / "devices.json"
    intact = devices_file.read_text()
    devices_file.write_text("[]")

    listed = chain.ssh_add("-l")

    assert listed.returncode != 0
    wait_until(lambda: "cannot read the trusted devices file" in signer.log_text(), 10, "serve to log the error")
    log = signer.log_text()
    assert "closing the connection from 127.0.0.1:" in log
    assert "Traceback" not in log
    assert "Unhandled exception" not in log

    devices_file.write_text(intact)
    wait_until(lambda: chain.ssh_add("-l").returncode == 0, 20, "the agent to list keys again")


def test_bad_parent_handle_in_binding_file(chain: Chain) -> None:
    chain.keygen("work", PIN)
    binding = chain.signer_home / "tpm.json"
    record = json.loads(binding.read_text())
    record["parents"]["zz"] = "00"
    binding.write_text(json.dumps(record))

    result = chain.tpmsigner("status", check=False)

    assert result.returncode == 1
    assert f"cannot read the TPM binding file {binding}: invalid parent handle 'zz'" in result.stderr
    assert "Traceback" not in result.stderr


def test_allow_on_devices_directory_fails_clearly(chain: Chain) -> None:
    (chain.signer_home / "devices.json").mkdir(parents=True)

    result = chain.tpmsigner("allow", "laptop", format_public_key(b"\x05" * 32), check=False)

    assert result.returncode == 1
    assert f"cannot read the trusted devices file {chain.signer_home / 'devices.json'}: Is a directory" in result.stderr
    assert "[Errno" not in result.stderr


@pytest.mark.parametrize("content", ["", "{", '{"version": 1}', "[]"])
def test_bad_identity_metadata_names_file_and_fix(chain: Chain, content: str) -> None:
    chain.keygen("work", PIN)
    metadata = chain.signer_home / "keys" / "work.json"
    metadata.write_text(content)

    result = chain.tpmsigner("list", check=False)

    assert result.returncode == 1
    assert str(metadata) in result.stderr
    assert (
        f"restore the file from a backup, or move it and its .tss key file out of {metadata.parent} "
        "to use the other identities"
    ) in result.stderr
    assert "Traceback" not in result.stderr
