"""The agent through the asyncssh and paramiko agent clients."""

from __future__ import annotations

import asyncio

import asyncssh
import paramiko
import pytest

from tests.support.chain import Chain
from tpmsigner.signer.server import MAX_PENDING_PER_CONNECTION
from tpmsigner_agent.signer_client import MAX_SIGNS_IN_FLIGHT

PIN = "4711-agent-clients"


@pytest.fixture
def running_chain(chain: Chain) -> tuple[Chain, str]:
    public_line = chain.keygen("work", PIN)
    chain.pair()
    chain.start_signer()
    chain.start_agent()
    return chain, public_line


def test_asyncssh_client_lists_and_signs(running_chain) -> None:
    chain, public_line = running_chain

    async def list_and_sign() -> tuple[list[asyncssh.SSHKeyPair], bytes]:
        async with asyncssh.connect_agent(str(chain.agent_socket)) as agent:
            keys = await agent.get_keys()
            signature = await keys[0].sign_async(b"asyncssh payload")
            return keys, signature

    keys, signature = asyncio.run(asyncio.wait_for(list_and_sign(), 60))

    assert len(keys) == 1
    assert keys[0].get_comment() == "work"
    assert keys[0].public_data == asyncssh.import_public_key(public_line).public_data
    assert asyncssh.import_public_key(public_line).verify(b"asyncssh payload", signature)
    assert chain.approver_requests()[0]["TPMSIGNER_PURPOSE"] == "unknown"


def test_asyncssh_client_sees_refusal_as_error(running_chain) -> None:
    chain, _ = running_chain
    chain.set_decision("deny")

    async def sign() -> bytes:
        async with asyncssh.connect_agent(str(chain.agent_socket)) as agent:
            keys = await agent.get_keys()
            return await keys[0].sign_async(b"refused payload")

    with pytest.raises(ValueError, match="Unable to sign"):
        asyncio.run(asyncio.wait_for(sign(), 60))
    assert len(chain.approver_requests()) == 1


def test_paramiko_client_lists_and_signs(running_chain, monkeypatch) -> None:
    chain, public_line = running_chain
    monkeypatch.setenv("SSH_AUTH_SOCK", str(chain.agent_socket))

    agent = paramiko.Agent()
    try:
        keys = agent.get_keys()
        assert len(keys) == 1
        assert keys[0].comment == "work"
        assert keys[0].asbytes() == asyncssh.import_public_key(public_line).public_data
        signature = keys[0].sign_ssh_data(b"paramiko payload")
    finally:
        agent.close()

    assert asyncssh.import_public_key(public_line).verify(b"paramiko payload", signature)
    assert len(chain.approver_requests()) == 1


def test_many_concurrent_clients_all_get_signatures(running_chain) -> None:
    chain, public_line = running_chain
    clients = 3 * MAX_SIGNS_IN_FLIGHT
    public_key = asyncssh.import_public_key(public_line)

    async def sign(number: int) -> bool:
        async with asyncssh.connect_agent(str(chain.agent_socket)) as agent:
            keys = await agent.get_keys()
            payload = f"concurrent {number}".encode()
            return public_key.verify(payload, await keys[0].sign_async(payload))

    async def sign_all() -> list[bool]:
        return await asyncio.gather(*(sign(number) for number in range(clients)))

    # The agent queues what the signer would refuse as BUSY.
    assert asyncio.run(asyncio.wait_for(sign_all(), 120)) == [True] * clients
    assert len(chain.approver_requests()) == clients


def test_agent_in_flight_limit_matches_signer() -> None:
    assert MAX_SIGNS_IN_FLIGHT == MAX_PENDING_PER_CONNECTION
