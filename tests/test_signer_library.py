"""The signer server embedded in a program, with a callable approver."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncssh

import tpmsigner
from tpmsigner.protocol import channel
from tpmsigner.protocol.messages import (
    Failure,
    FailureCode,
    ListedIdentity,
    ListReply,
    ListRequest,
    ProcessInfo,
    SignReply,
    SignRequest,
    decode_message,
    encode_message,
)
from tpmsigner.signer.devices import DeviceRegistry
from tpmsigner.signer.server import SignerConfig, SignerServer
from tpmsigner.signer.worker import TpmWorker

PIN = b"4711-embedded"


async def run_requests(tcti: str, home: Path, approver, requests) -> tuple[list, list]:
    """Start a SignerServer on a free port, send ``requests`` over Noise, return replies."""
    store = tpmsigner.KeyStore(home)
    agent_key = channel.StaticKey.generate()
    signer_key = channel.StaticKey.generate()
    DeviceRegistry(home / "devices.json").allow("embedded-test", agent_key.public)
    worker = TpmWorker(tpmsigner.Tpm(tcti))
    server = SignerServer(
        store=store,
        worker=worker,
        static_key=signer_key,
        devices=DeviceRegistry(home / "devices.json"),
        approver=tpmsigner.CallableApprover(approver),
        config=SignerConfig(host="127.0.0.1", port=0, approval_timeout=10),
    )
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        secure = await channel.initiate(reader, writer, agent_key, signer_key.public)
        replies = []
        for request in requests:
            await secure.send(encode_message(request))
            replies.append(decode_message(await asyncio.wait_for(secure.receive(), 30)))
        await secure.close()
    finally:
        await server.close()
        worker.close()
    return replies


def test_callable_approver_sees_request_and_approves(swtpm, tmp_path) -> None:
    home = tmp_path / "signer"
    store = tpmsigner.KeyStore(home)
    with tpmsigner.Tpm(swtpm.tcti) as tpm:
        identity = tpmsigner.create_identity(tpm, store, "embedded", PIN)
    seen: list[tpmsigner.ApprovalRequest] = []

    def approve(request: tpmsigner.ApprovalRequest) -> str:
        seen.append(request)
        return PIN.decode()

    process = ProcessInfo(pid=4242, uid=1000, executable="/usr/bin/git", command_line="git commit -S")
    replies = asyncio.run(
        run_requests(
            swtpm.tcti,
            home,
            approve,
            [ListRequest(1), SignRequest(2, identity.public_key_blob, b"embedded payload", 0, process)],
        )
    )

    assert replies[0] == ListReply(1, (ListedIdentity(identity.public_key_blob, "embedded"),))
    assert isinstance(replies[1], SignReply)
    assert asyncssh.import_public_key(identity.openssh_line()).verify(b"embedded payload", replies[1].signature)
    assert len(seen) == 1
    assert seen[0].device == "embedded-test"
    assert seen[0].key_label == "embedded"
    assert seen[0].process == process
    assert seen[0].purpose == "unknown"


def test_callable_returning_none_refuses(swtpm, tmp_path) -> None:
    home = tmp_path / "signer"
    store = tpmsigner.KeyStore(home)
    with tpmsigner.Tpm(swtpm.tcti) as tpm:
        identity = tpmsigner.create_identity(tpm, store, "embedded", PIN)

    replies = asyncio.run(
        run_requests(swtpm.tcti, home, lambda request: None, [SignRequest(7, identity.public_key_blob, b"x", 0)])
    )

    assert isinstance(replies[0], Failure)
    assert replies[0].request_id == 7
    assert replies[0].code == FailureCode.DENIED


def test_unknown_key_is_reported(swtpm, tmp_path) -> None:
    home = tmp_path / "signer"
    replies = asyncio.run(
        run_requests(swtpm.tcti, home, lambda request: "unused", [SignRequest(3, b"no such key", b"x", 0)])
    )
    assert isinstance(replies[0], Failure)
    assert replies[0].code == FailureCode.UNKNOWN_KEY

