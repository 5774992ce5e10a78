"""Faults and limits found by trying to break the chain."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import asyncssh
import pytest
from tpm2_pytss import ESAPI
from tpm2_pytss.constants import TPM2_CAP, TPM2_PT
from tpm2_pytss.TCTILdr import TCTILdr

import tpmsigner
from tpmsigner.protocol.channel import format_public_key
from tpmsigner.tpm import Tpm
from tests.support.chain import Chain
from tests.test_agent_input import RawAgentClient

PIN = "4711-robustness"


def start(chain: Chain, **signer_options) -> str:
    public_line = chain.keygen("work", PIN)
    chain.pair()
    chain.start_signer(**signer_options)
    chain.start_agent()
    return public_line


async def sign_through_agent(chain: Chain, data: bytes) -> bytes:
    async with asyncssh.connect_agent(str(chain.agent_socket)) as agent:
        keys = await agent.get_keys()
        return await keys[0].sign_async(data)


def test_replaced_device_key_cuts_open_connection(chain: Chain) -> None:
    start(chain)
    asyncio.run(asyncio.wait_for(sign_through_agent(chain, b"first"), 30))
    assert len(chain.approver_requests()) == 1

    # The agent's connection stays open; replacing its key must still stop it.
    chain.tpmsigner("allow", "test-laptop", format_public_key(b"\x09" * 32), "--replace")

    with pytest.raises(ValueError):
        asyncio.run(asyncio.wait_for(sign_through_agent(chain, b"second"), 30))
    assert len(chain.approver_requests()) == 1
    assert chain.signer is not None
    assert "is no longer allowed; closing its connection" in chain.signer.log_text()


def test_large_sign_data_crosses_in_fragments(chain: Chain) -> None:
    public_line = start(chain)
    data = bytes(range(256)) * 800   # 204,800 bytes: four Noise messages

    signature = asyncio.run(asyncio.wait_for(sign_through_agent(chain, data), 60))

    assert asyncssh.import_public_key(public_line).verify(data, signature)
    assert chain.approver_requests()[0]["TPMSIGNER_PURPOSE"] == "unknown"
    assert chain.agent is not None
    assert "Traceback" not in chain.agent.log_text()


def test_overlong_pin_is_rejected_without_tpm(chain: Chain, swtpm) -> None:
    start(chain)
    chain.set_approver_pin("x" * 65)
    esapi = ESAPI(TCTILdr.parse(swtpm.tcti))
    try:
        _, data = esapi.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT.LOCKOUT_COUNTER, 1)
        counter_before = int(data.data.tpmProperties[0].value)
    finally:
        esapi.close()

    started = time.monotonic()
    with pytest.raises(ValueError):
        asyncio.run(asyncio.wait_for(sign_through_agent(chain, b"data"), 60))

    assert time.monotonic() - started < 10
    assert chain.signer is not None
    assert "longer than the 32 bytes" in chain.signer.log_text()
    assert "Traceback" not in chain.signer.log_text()
    esapi = ESAPI(TCTILdr.parse(swtpm.tcti))
    try:
        _, data = esapi.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT.LOCKOUT_COUNTER, 1)
        assert int(data.data.tpmProperties[0].value) == counter_before
    finally:
        esapi.close()


def test_keygen_rejects_overlong_pin(chain: Chain) -> None:
    pin_file = chain.workdir / "long.pin"
    pin_file.write_text("p" * 33 + "\n")

    result = chain.tpmsigner("keygen", "work", "--pin-file", str(pin_file), check=False)

    assert result.returncode == 1
    assert "at most 32 bytes" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_on_busy_port_fails_clearly(chain: Chain) -> None:
    chain.keygen("work", PIN)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        port = busy.getsockname()[1]
        result = chain.tpmsigner(
            "serve", "--listen", f"127.0.0.1:{port}", "--approver", f"command:{chain.approver_program}", check=False
        )
    finally:
        busy.close()

    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("timeout", ["nan", "inf", "0", "-5"])
def test_serve_rejects_bad_approval_timeout(chain: Chain, timeout: str) -> None:
    result = chain.tpmsigner(
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--approver",
        f"command:{chain.approver_program}",
        "--approval-timeout",
        timeout,
        check=False,
    )
    assert result.returncode == 1
    assert "--approval-timeout must be a positive, finite number" in result.stderr


def test_home_that_is_a_file_fails_clearly(chain: Chain) -> None:
    not_a_directory = chain.workdir / "file"
    not_a_directory.write_text("x")

    result = chain.tpmsigner_agent("--home", str(not_a_directory), "id", check=False)
    signer_result = chain.tpmsigner("--home", str(not_a_directory), "id", check=False)

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert signer_result.returncode == 1
    assert "is not a directory" in signer_result.stderr


def test_stalled_header_is_closed(chain: Chain) -> None:
    start(chain)
    stalled = RawAgentClient(chain.agent_socket)
    try:
        stalled.sock.sendall(b"\x00\x00")
        stalled.sock.settimeout(20)
        started = time.monotonic()
        assert stalled.sock.recv(1) == b""
        assert time.monotonic() - started < 15
    finally:
        stalled.close()


def test_thousand_identities_are_listed(chain: Chain, swtpm) -> None:
    store = tpmsigner.KeyStore(chain.signer_home)
    with Tpm(swtpm.tcti) as tpm:
        lines = [
            tpmsigner.create_identity(tpm, store, f"key-{number:04d}", PIN.encode()).openssh_line()
            for number in range(1000)
        ]
    chain.set_approver_pin(PIN)
    chain.pair()
    chain.start_signer()
    chain.start_agent()

    listed = chain.ssh_add("-L")
    cli_listing = json.loads(chain.tpmsigner("list", "--json").stdout)

    assert listed.returncode == 0, listed.stderr
    assert sorted(listed.stdout.splitlines()) == sorted(lines)
    assert len(cli_listing) == 1000

    async def sign_with_last() -> bytes:
        async with asyncssh.connect_agent(str(chain.agent_socket)) as agent:
            keys = await agent.get_keys()
            last = next(key for key in keys if key.get_comment() == "key-0999")
            return await last.sign_async(b"data")

    signature = asyncio.run(asyncio.wait_for(sign_with_last(), 60))
    assert asyncssh.import_public_key(lines[-1]).verify(b"data", signature)
